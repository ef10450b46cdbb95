"""(1c) The floor: how low a step of custom autograd.Functions goes, beside torch_mlp's.

The bare Functions below hold the derivation's kernels and nothing else: the same forward ops
as torch_mlp's (``addmm``, ``relu``, ``log_softmax`` + ``nll_loss_forward``) and the same
backward ops, with cross-entropy's default options only (index targets, mean, ignore_index
-100, no weight or smoothing), and no argument checks, autocast rules, ``use_native``,
torch.func or torch.compile variants, forward-mode AD or double backward. What the bare step
costs over torch.nn's is what torch's Function mechanism costs; what torch_mlp costs over the
bare step is what its promises cost.

Each is timed against torch.nn in a pair, as in (1), and the pairs alternate between the two,
run after run: in a three-way round robin the positions alone move the ratios by more than
the difference measured here.
"""

from __future__ import annotations

import statistics
from typing import Any

import torch
from torch import nn
from torch.autograd import Function

import torch_mlp

from .common import (
    D_IN,
    N_CLASSES,
    Settings,
    compare,
    interleaved,
    make_batch,
    make_models,
    make_step,
    table,
)

_nll_loss = torch.ops.aten.nll_loss_forward.default
_threshold_backward = torch.ops.aten.threshold_backward.default


class BareLinear(Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        return torch.addmm(bias, x, weight.t())

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        return g.mm(weight) if ctx.needs_input_grad[0] else None, g.t().mm(x), g.sum(0)


class BareReLU(Function):
    @staticmethod
    def forward(ctx, u):
        h = torch.relu(u)
        ctx.save_for_backward(h)
        return h

    @staticmethod
    def backward(ctx, g):
        (h,) = ctx.saved_tensors
        return _threshold_backward(g, h, 0)


class BareCrossEntropy(Function):
    @staticmethod
    def forward(ctx, z, target):
        logp = torch.log_softmax(z, -1)
        loss, d = _nll_loss(logp, target, None, 1, -100)  # mean, ignore_index -100
        ctx.save_for_backward(logp, target, d)
        return loss

    @staticmethod
    def backward(ctx, g):
        logp, target, d = ctx.saved_tensors
        y = target.unsqueeze(-1)
        valid = y != -100
        s = torch.where(valid, g / d, 0)
        y = y.clamp(0, logp.shape[-1] - 1)
        return (logp.exp() * s).scatter_add_(-1, y, -s), None


class _Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return BareLinear.apply(x, self.weight, self.bias)


class _ReLU(nn.ReLU):
    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return BareReLU.apply(u)


class _CrossEntropyLoss(nn.CrossEntropyLoss):
    def forward(self, z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return BareCrossEntropy.apply(z, target)


def bare_model(native: nn.Sequential) -> nn.Sequential:
    """The bare-Function twin of ``native`` (Linear, ReLU, Linear), with a copy of its state."""
    hidden = native[0].out_features
    bare = nn.Sequential(_Linear(D_IN, hidden), _ReLU(), _Linear(hidden, N_CLASSES))
    bare.to(native[0].weight.device).load_state_dict(native.state_dict())
    return bare


def run(s: Settings, hidden: int, batch: list[int], runs: int) -> list[dict[str, Any]]:
    rows = []
    custom, native = make_models(hidden, s.device)
    bare = bare_model(native)
    for B in batch:
        x, y = make_batch(B, s.device)
        base = make_step(native, nn.CrossEntropyLoss(), x, y)
        steps = {"torch_mlp": make_step(custom, torch_mlp.CrossEntropyLoss(), x, y),
                 "bare Functions": make_step(bare, _CrossEntropyLoss(), x, y)}
        medians: dict[str, list[float]] = {k: [] for k in steps}
        for r in range(runs):
            for name in (list(steps) if r % 2 == 0 else list(steps)[::-1]):
                t_native, t = interleaved([base, steps[name]], s)
                medians[name].append(compare(t, t_native)["ratio"])
        for name, m in medians.items():
            row = {"H": hidden, "B": B, "step": name, "ratio": statistics.median(m),
                   "ratio_min": min(m), "ratio_max": max(m), "runs": runs}
            rows.append(row)
            print(f"  floor H={hidden:<5} B={B:<5} {name:<15} ratio {row['ratio']:.3f} "
                  f"({row['ratio_min']:.3f}–{row['ratio_max']:.3f} over {runs} runs)",
                  flush=True)
    return rows


def render(rows: list[dict[str, Any]]) -> str:
    rows = [{**r, "spread": f"{r['ratio_min']:.3f}–{r['ratio_max']:.3f}"} for r in rows]
    return table(rows, [("H", "H", ""), ("B", "B", ""), ("step", "step", ""),
                        ("ratio", "median ratio to torch.nn", ".3f"),
                        ("spread", "min–max over runs", ""), ("runs", "runs", "")])
