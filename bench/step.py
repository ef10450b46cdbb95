"""(1) and (6): one training step, torch_mlp against torch.nn, eager or compiled."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import torch_mlp

from .common import (
    Settings,
    compare,
    interleaved,
    make_batch,
    make_models,
    make_step,
    spread,
    table,
)


def run(s: Settings, hidden: list[int], batch: list[int]) -> list[dict[str, Any]]:
    rows = []
    for H in hidden:
        custom, native = make_models(H, s.device)
        for B in batch:
            x, y = make_batch(B, s.device)
            if s.compile:
                # A fresh start for each shape: every step's forward_loss shares one code object
                # and Dynamo stops compiling one after a few recompiles (it would run eagerly).
                torch._dynamo.reset()
            a = make_step(custom, torch_mlp.CrossEntropyLoss(), x, y, compile=s.compile)
            b = make_step(native, nn.CrossEntropyLoss(), x, y, compile=s.compile)
            ta, tb = interleaved([a, b], s)
            row = {"H": H, "B": B, **compare(ta, tb)}
            rows.append(row)
            print(f"  step{' (compiled)' if s.compile else ''} H={H:<5} B={B:<5} "
                  f"custom {row['custom_ms']:8.3f} ms  native {row['native_ms']:8.3f} ms  "
                  f"ratio {row['ratio']:.3f} ({spread(row)})", flush=True)
    return rows


def render(rows: list[dict[str, Any]]) -> str:
    rows = [{**r, "spread": spread(r)} for r in rows]
    return table(rows, [("H", "H", ""), ("B", "B", ""), ("custom_ms", "torch_mlp ms", ".3f"),
                        ("native_ms", "torch.nn ms", ".3f"), ("ratio", "ratio", ".3f"),
                        ("spread", "ratio min–max", "")])
