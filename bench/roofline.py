"""(4) Roofline: the training step against its matrix products alone, on the same shapes.

A step of MLP 784-H-10 at batch B does five GEMMs: the two forward ``addmm`` (bias fused),
then in backward dL/dw = gᵀ·h (10×B·B×H), dL/dh = g·w (B×10·10×H) and dL/dW = gᵀ·x
(H×B·B×784); dL/dx is not needed, x being data. What the step spends beyond them is the rest:
Python, autograd, elementwise work (ReLU, softmax, the SGD update) and memory traffic.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import torch_mlp

from .common import (
    D_IN,
    N_CLASSES,
    Settings,
    gemm_call,
    gemm_flops,
    interleaved,
    make_batch,
    make_models,
    make_step,
    table,
)


def gemms(H: int, B: int, device: torch.device) -> tuple[Callable[[], None], float]:
    """The step's five GEMMs on fresh outputs, as the step allocates them; and their GFLOP."""
    sizes = [D_IN, H, N_CLASSES]
    return gemm_call(sizes, B, str(device)), gemm_flops(sizes, B) / 1e9


def run(s: Settings, hidden: list[int], batch: list[int]) -> list[dict[str, Any]]:
    rows = []
    for H in hidden:
        custom, native = make_models(H, s.device)
        for B in batch:
            x, y = make_batch(B, s.device)
            a = make_step(custom, torch_mlp.CrossEntropyLoss(), x, y)
            b = make_step(native, nn.CrossEntropyLoss(), x, y)
            g, gflop = gemms(H, B, s.device)
            ta, tb, tg = interleaved([a, b, g], s)
            med = [sorted(t)[len(t) // 2] for t in (ta, tb, tg)]
            row = {
                "H": H, "B": B,
                "custom_ms": med[0] * 1e3, "native_ms": med[1] * 1e3, "gemm_ms": med[2] * 1e3,
                "gemm_frac_custom": med[2] / med[0], "gemm_frac_native": med[2] / med[1],
                "gemm_gflops": gflop / med[2],
            }
            rows.append(row)
            print(f"  roofline H={H:<5} B={B:<5} GEMMs {row['gemm_ms']:8.3f} ms "
                  f"({row['gemm_gflops']:6.1f} GFLOP/s) = {100 * row['gemm_frac_custom']:5.1f}% "
                  f"of the torch_mlp step, {100 * row['gemm_frac_native']:5.1f}% of torch.nn's",
                  flush=True)
    return rows


def render(rows: list[dict[str, Any]]) -> str:
    view = [{**r, "fc": 100 * r["gemm_frac_custom"], "fn": 100 * r["gemm_frac_native"]}
            for r in rows]
    return table(view, [("H", "H", ""), ("B", "B", ""), ("gemm_ms", "GEMMs ms", ".3f"),
                        ("gemm_gflops", "GEMM GFLOP/s", ".1f"),
                        ("custom_ms", "torch_mlp step ms", ".3f"),
                        ("fc", "GEMM % torch_mlp", ".1f"),
                        ("native_ms", "torch.nn step ms", ".3f"),
                        ("fn", "GEMM % torch.nn", ".1f")])
