"""The run's pictures, written atomically: curves.png (loss and accuracy), weights.png (the
first layer's units), verify.png (our gradients' error against float64 beside native
autograd's).

matplotlib is used through its Agg canvas, without pyplot (no global state, no display).
Without matplotlib the pictures are skipped with one warning line.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .rundir import write

__all__ = ["write_plots"]


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path, kept: str) -> None:
    write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100), kept)


def write_curves(path: Path, history: list[dict[str, Any]], kept: str) -> None:
    """curves.png: loss and accuracy by epoch, train and test."""
    ep = [h["epoch"] for h in history]
    fig = _figure(11, 4)
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(ep, [h["train_loss"] for h in history], "o-", label="train (objective, running)")
    ax1.plot(ep, [h["test_loss"] for h in history], "o-", label="test (cross-entropy)")
    ax1.set(xlabel="epoch", ylabel="loss", title="loss", yscale="log")
    ax2.plot(ep, [100 * h["train_acc"] for h in history], "o-", label="train (running)")
    ax2.plot(ep, [100 * h["test_acc"] for h in history], "o-", label="test")
    ax2.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.subplots_adjust(left=0.085, right=0.98, bottom=0.13, top=0.92, wspace=0.22)
    _save(fig, path, kept)


def write_verify(path: Path, history: list[dict[str, Any]], kept: str) -> None:
    """verify.png: per parameter, max|g − g_float64| by epoch for our gradient (solid) and
    native autograd's (dashed), on a log axis: ours on or under native's means as accurate."""
    prefix = "verify_ours_err_"
    names = list(dict.fromkeys(k[len(prefix):] for h in history for k in h
                               if k.startswith(prefix)))
    fig = _figure(8, 4.5)
    ax = fig.subplots()
    for i, name in enumerate(names):
        rows = [h for h in history if prefix + name in h]
        # A zero error (exact) has no place on a log axis: a gap.
        for who, style in (("ours", "o-"), ("native", "x--")):
            ax.plot([h["epoch"] for h in rows],
                    [h[f"verify_{who}_err_{name}"] or math.nan for h in rows], style,
                    color=f"C{i % 10}", label=f"{name}: {'torch_mlp' if who == 'ours' else who}")
    ax.set(xlabel="epoch", ylabel="max |grad − grad in float64|", yscale="log",
           title="gradient error against float64 (max over the epoch's checks)")
    ax.grid(alpha=0.3, which="both")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize="small", ncol=2)
    fig.subplots_adjust(left=0.12, right=0.98, bottom=0.12, top=0.92)
    _save(fig, path, kept)


def write_weights(path: Path, weight: Tensor, kept: str, max_units: int = 1024) -> None:
    """weights.png: each first-layer unit's 784 weights as a 28×28 image, in a grid; red is
    positive, blue negative, white zero, each unit scaled to its own max |w|."""
    w = weight.detach().float().cpu()[:max_units]  # (n, 784)
    n = w.shape[0]
    cols = math.ceil(math.sqrt(n))
    w = w / w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)  # in [-1, 1]
    pos, neg = w.clamp(min=0), (-w).clamp(min=0)
    rgb = torch.stack([1 - neg, 1 - pos - neg, 1 - pos], dim=-1).reshape(n, 28, 28, 3)
    grid = torch.full((math.ceil(n / cols) * 29 + 1, cols * 29 + 1, 3), 0.6)  # grey lines
    for k in range(n):
        r, c = divmod(k, cols)
        grid[1 + r * 29: 29 + r * 29, 1 + c * 29: 29 + c * 29] = rgb[k]
    fig = _figure(grid.shape[1] / 50, grid.shape[0] / 50)  # 2 pixels a weight at dpi 100
    fig.figimage(grid.repeat_interleave(2, 0).repeat_interleave(2, 1).numpy())
    _save(fig, path, kept)


def write_plots(out: Path, history: list[dict[str, Any]], first_weight: Tensor,
                kept: str) -> str | None:
    """A run's curves.png, weights.png and (when ``history`` has verify columns) verify.png;
    returns the warning to print when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        return f"warning: no pictures ({e}); pip install matplotlib"
    write_curves(out / "curves.png", history, kept)
    write_weights(out / "weights.png", first_weight, kept)
    if any(k.startswith("verify_ours_err_") for h in history for k in h):
        write_verify(out / "verify.png", history, kept)
    return None
