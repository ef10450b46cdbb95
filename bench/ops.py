"""(2) Per-op forward + backward: torch_mlp.functional against torch.nn.functional; and the
Python tax: one forward call on a tiny input (1×8 x, 4×8 W) with one thread.

The small shapes show the cost of ``Function.apply`` and the wrappers' Python; the large ones
show compute.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as TF

import torch_mlp.functional as F

from .common import Settings, compare, interleaved, spread, table

Case = tuple[str, str, Callable[..., torch.Tensor], Callable[..., torch.Tensor],
             Callable[[], tuple[Any, ...]]]


def cases(device: torch.device, quick: bool) -> list[Case]:
    gen = torch.Generator().manual_seed(0)

    def randn(*shape: int, grad: bool = True) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device).requires_grad_(grad)

    def target(n: int, c: int) -> torch.Tensor:
        return torch.randint(0, c, (n,), generator=gen).to(device)

    small_lin = (1, 16, 8)  # (N, D, H)
    large_lin = (128, 784, 1024) if quick else (1024, 784, 1024)
    small_act = (1, 16)
    large_act = (128, 1024) if quick else (1024, 4096)
    small_ce = (1, 10)
    large_ce = (128, 1000) if quick else (1024, 1000)
    out: list[Case] = []
    for size, (n, d, h) in (("small", small_lin), ("large", large_lin)):
        out.append(("linear", f"{size} ({n}×{d})·({h}×{d})ᵀ", F.linear, TF.linear,
                    lambda n=n, d=d, h=h: (randn(n, d), randn(h, d), randn(h))))
    for size, (n, h) in (("small", small_act), ("large", large_act)):
        out.append(("relu", f"{size} ({n}×{h})", F.relu, TF.relu, lambda n=n, h=h: (randn(n, h),)))
    for size, (n, c) in (("small", small_ce), ("mnist", (128, 10)), ("large", large_ce)):
        out.append(("cross_entropy", f"{size} ({n}×{c})", F.cross_entropy, TF.cross_entropy,
                    lambda n=n, c=c: (randn(n, c), target(n, c))))
    return out


def fwd_bwd(fn: Callable[..., torch.Tensor], args: tuple[Any, ...]) -> Callable[[], None]:
    diff = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]

    def call() -> None:
        out = fn(*args)
        grad = torch.ones_like(out) if out.dim() else None
        torch.autograd.grad(out, diff, grad)

    return call


def run(s: Settings, quick: bool) -> list[dict[str, Any]]:
    rows = []
    for op, shape, ours, ref, make_args in cases(s.device, quick):
        args = make_args()
        ta, tb = interleaved([fwd_bwd(ours, args), fwd_bwd(ref, args)], s)
        row = {"op": op, "shape": shape, **compare(ta, tb)}
        row["custom_us"] = row["custom_ms"] * 1e3
        row["native_us"] = row["native_ms"] * 1e3
        rows.append(row)
        print(f"  {op:<13} {shape:<26} custom {row['custom_us']:9.1f} µs  native "
              f"{row['native_us']:9.1f} µs  ratio {row['ratio']:.3f} ({spread(row)})", flush=True)
    return rows


def render(rows: list[dict[str, Any]]) -> str:
    rows = [{**r, "spread": spread(r)} for r in rows]
    return table(rows, [("op", "op", ""), ("shape", "shape", ""),
                        ("custom_us", "torch_mlp µs", ".1f"), ("native_us", "torch.nn µs", ".1f"),
                        ("ratio", "ratio", ".3f"), ("spread", "ratio min–max", "")])


def tax_cases() -> list[tuple[str, Callable[[], torch.Tensor], Callable[[], torch.Tensor]]]:
    """One forward call per op on a tiny input: what a call costs beyond its arithmetic."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 8, generator=gen)
    w = torch.randn(4, 8, generator=gen).requires_grad_()
    b = torch.randn(4, generator=gen).requires_grad_()
    z, y = torch.randn(1, 4, generator=gen).requires_grad_(), torch.tensor([1])
    return [
        ("linear", lambda: F.linear(x, w, b), lambda: TF.linear(x, w, b)),
        ("relu", lambda: F.relu(z), lambda: TF.relu(z)),
        ("cross_entropy", lambda: F.cross_entropy(z, y), lambda: TF.cross_entropy(z, y)),
        ("l2_penalty", lambda: F.l2_penalty([w], 1e-4),
         lambda: 0.5 * 1e-4 * sum(t.square().sum() for t in [w])),  # the native formula
    ]


def run_tax(s: Settings) -> list[dict[str, Any]]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = []
        for op, ours, ref in tax_cases():
            row = {"op": op, **compare(*interleaved([ours, ref], s))}
            row["custom_us"], row["native_us"] = row["custom_ms"] * 1e3, row["native_ms"] * 1e3
            rows.append(row)
            print(f"  tax {op:<13} custom {row['custom_us']:6.1f} µs  native "
                  f"{row['native_us']:6.1f} µs  ratio {row['ratio']:.2f} ({spread(row)})",
                  flush=True)
        return rows
    finally:
        torch.set_num_threads(threads)


def render_tax(rows: list[dict[str, Any]]) -> str:
    rows = [{**r, "spread": spread(r)} for r in rows]
    return table(rows, [("op", "op", ""), ("custom_us", "torch_mlp µs", ".1f"),
                        ("native_us", "torch.nn µs", ".1f"), ("ratio", "ratio", ".2f"),
                        ("spread", "ratio min–max", "")])
