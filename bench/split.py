"""(1b) Where the step's time goes: the model and the loss swapped one at a time.

Four steps on one batch, with two models that start from the same parameters: torch_mlp's
model and loss, torch_mlp's model with torch.nn's loss, torch.nn's model with torch_mlp's loss,
and torch.nn's model and loss. Each step's time is split into its phases (zero_grad + forward,
loss, backward, SGD step), and each step's total is compared with torch.nn's, round by round,
as in (1). The two mixed rows say how much of torch_mlp's extra time the model brings and how
much the loss does. The phase timers add the same few µs to all four steps, which pulls these
ratios slightly towards 1: the step section (1) is the reference for the ratios themselves.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import torch_mlp

from .common import Settings, make_batch, make_models, round_robin, sync, table

PHASES = ("forward", "loss", "backward", "step")
DEFAULT_SHAPES = ((256, 1), (256, 128), (1024, 128))


def parse_shape(text: str) -> tuple[int, int]:
    """``"256x128"`` -> (H, B) = (256, 128)."""
    try:
        h, b = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"expected a shape HxB such as 256x128, got {text!r}") from None
    if h < 1 or b < 1:
        raise ValueError(f"expected positive H and B in {text!r}")
    return h, b


def phased_step(model: nn.Module, loss_fn: nn.Module, x: torch.Tensor, y: torch.Tensor,
                timer: Callable[[], float], device: torch.device
                ) -> tuple[Callable[[], None], list[float]]:
    """A training step that adds each phase's seconds into the returned list, in PHASES order."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    acc = [0.0] * len(PHASES)

    def step() -> None:
        t0 = timer()
        opt.zero_grad(set_to_none=True)
        z = model(x)
        sync(device)
        t1 = timer()
        loss = loss_fn(z, y)
        sync(device)
        t2 = timer()
        loss.backward()
        sync(device)
        t3 = timer()
        opt.step()
        sync(device)
        t4 = timer()
        acc[0] += t1 - t0
        acc[1] += t2 - t1
        acc[2] += t3 - t2
        acc[3] += t4 - t3

    return step, acc


def _phase_means(accs: list[list[float]]) -> Callable[[int, Callable[[], None], int], list[float]]:
    """A :func:`round_robin` turn for phased steps: each phase's seconds per call, this turn's
    calls only (``accs[k]`` is step k's accumulator, from :func:`phased_step`)."""
    def measure(k: int, fn: Callable[[], None], n: int) -> list[float]:
        acc = accs[k]
        acc[:] = [0.0] * len(PHASES)
        for _ in range(n):
            fn()
        return [t / n for t in acc]

    return measure


def run(s: Settings, shapes: list[tuple[int, int]]) -> list[dict[str, Any]]:
    rows = []
    for H, B in shapes:
        custom, native = make_models(H, s.device)
        x, y = make_batch(B, s.device)
        combos = {
            ("torch_mlp", "torch_mlp"): (custom, torch_mlp.CrossEntropyLoss()),
            ("torch_mlp", "torch.nn"): (custom, nn.CrossEntropyLoss()),
            ("torch.nn", "torch_mlp"): (native, torch_mlp.CrossEntropyLoss()),
            ("torch.nn", "torch.nn"): (native, nn.CrossEntropyLoss()),
        }
        steps = [phased_step(m, lf, x, y, s.timer, s.device) for m, lf in combos.values()]
        per_combo = round_robin([fn for fn, _ in steps], s, _phase_means([a for _, a in steps]))
        phases = dict(zip(combos, per_combo))
        base = [sum(p) for p in phases[("torch.nn", "torch.nn")]]
        for (model_impl, loss_impl), per_round in phases.items():
            ratios = [sum(p) / b for p, b in zip(per_round, base)]
            row: dict[str, Any] = {"H": H, "B": B, "model": model_impl, "loss": loss_impl}
            for i, name in enumerate(PHASES):
                row[f"{name}_ms"] = statistics.median(p[i] for p in per_round) * 1e3
            row["total_ms"] = statistics.median(sum(p) for p in per_round) * 1e3
            row.update(ratio=statistics.median(ratios), ratio_min=min(ratios),
                       ratio_max=max(ratios), pairs=len(ratios))
            rows.append(row)
            print(f"  split H={H:<5} B={B:<5} model {model_impl:<9} loss {loss_impl:<9} "
                  + "  ".join(f"{name} {row[f'{name}_ms']:7.3f}" for name in PHASES)
                  + f"  ms  ratio {row['ratio']:.3f}", flush=True)
    return rows


def render(rows: list[dict[str, Any]]) -> str:
    rows = [{**r, "spread": f"{r['ratio_min']:.2f}–{r['ratio_max']:.2f}"} for r in rows]
    return table(rows, [("H", "H", ""), ("B", "B", ""), ("model", "model", ""),
                        ("loss", "loss", ""), ("forward_ms", "forward ms", ".3f"),
                        ("loss_ms", "loss ms", ".3f"), ("backward_ms", "backward ms", ".3f"),
                        ("step_ms", "SGD ms", ".3f"), ("total_ms", "total ms", ".3f"),
                        ("ratio", "ratio to torch.nn", ".3f"), ("spread", "ratio min–max", "")])
