"""(1) and (6): one training step, torch_mlp against torch.nn, eager or compiled."""

from __future__ import annotations

import time
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
    sync,
    table,
)


def run(s: Settings, hidden: list[int], batch: list[int]) -> list[dict[str, Any]]:
    if not s.compile:
        return _run(s, hidden, batch)
    # Compile times are cold ones: without inductor's and AOTAutograd's on-disk caches, which
    # would otherwise serve a graph compiled by an earlier run (or the other model) in ~0.2 s.
    # One throwaway compile first pays the one-time imports, so neither model is charged them.
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        for model, loss in zip(make_models(8, s.device), (torch_mlp.CrossEntropyLoss(),
                                                          nn.CrossEntropyLoss())):
            torch._dynamo.reset()
            make_step(model, loss, *make_batch(2, s.device), compile=True)()
        return _run(s, hidden, batch)


def _run(s: Settings, hidden: list[int], batch: list[int]) -> list[dict[str, Any]]:
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
            first = {}
            if s.compile:  # the first call compiles: its time is the compile time (+ one step)
                first = {"compile_s_custom": _first_call_s(a, s), "compile_s_native":
                         _first_call_s(b, s)}
            ta, tb = interleaved([a, b], s)
            row = {"H": H, "B": B, **compare(ta, tb), **first}
            rows.append(row)
            print(f"  step{' (compiled)' if s.compile else ''} H={H:<5} B={B:<5} "
                  f"custom {row['custom_ms']:8.3f} ms  native {row['native_ms']:8.3f} ms  "
                  f"ratio {row['ratio']:.3f} ({spread(row)})"
                  + (f"  compile {first['compile_s_custom']:.1f} s / "
                     f"{first['compile_s_native']:.1f} s" if first else ""), flush=True)
    return rows


def _first_call_s(step: Any, s: Settings) -> float:
    sync(s.device)
    t0 = time.perf_counter()
    step()
    sync(s.device)
    return time.perf_counter() - t0


def add_speedup(compiled: list[dict[str, Any]], eager: list[dict[str, Any]]) -> None:
    """Per shape, eager ms / compiled ms (> 1: compiling pays), for torch_mlp and torch.nn."""
    by_shape = {(r["H"], r["B"]): r for r in eager}
    for r in compiled:
        e = by_shape.get((r["H"], r["B"]))
        if e is not None:
            r["speedup_custom"] = e["custom_ms"] / r["custom_ms"]
            r["speedup_native"] = e["native_ms"] / r["native_ms"]


def render(rows: list[dict[str, Any]]) -> str:
    rows = [{**r, "spread": spread(r)} for r in rows]
    columns = [("H", "H", ""), ("B", "B", ""), ("custom_ms", "torch_mlp ms", ".3f"),
               ("native_ms", "torch.nn ms", ".3f"), ("ratio", "ratio", ".3f"),
               ("spread", "ratio min–max", "")]
    if rows and "compile_s_custom" in rows[0]:
        columns += [("compile_s_custom", "compile s torch_mlp", ".1f"),
                    ("compile_s_native", "compile s torch.nn", ".1f"),
                    ("speedup_custom", "vs eager torch_mlp", ".2f"),
                    ("speedup_native", "vs eager torch.nn", ".2f")]
    return table(rows, columns)
