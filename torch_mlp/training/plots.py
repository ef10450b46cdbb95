"""The run's pictures: curves.png (loss and accuracy), weights.png (first-layer units) and
verify.png (our gradients' error against float64 beside native autograd's), written atomically.

matplotlib is used through its Agg canvas, without pyplot (no global state, no display).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..data import atomic_write
from .metrics import VERIFY_ERR_PREFIXES

__all__ = ["verified_parameters", "write_curves", "write_plots", "write_verify", "write_weights"]


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | os.PathLike[str]) -> None:
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=100))


def write_curves(path: str | os.PathLike[str], history: Sequence[dict[str, Any]]) -> None:
    """curves.png: loss and accuracy by epoch, train and test."""
    from matplotlib.ticker import MaxNLocator

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
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.subplots_adjust(left=0.085, right=0.98, bottom=0.13, top=0.92, wspace=0.22)
    _save(fig, path)


def verified_parameters(history: Sequence[dict[str, Any]]) -> list[str]:
    """The parameter names that have verify error columns in ``history``, in order."""
    ours = VERIFY_ERR_PREFIXES[0]
    names: list[str] = []
    for row in history:
        names += [k[len(ours):] for k in row if k.startswith(ours) and k[len(ours):] not in names]
    return names


def write_verify(path: str | os.PathLike[str], history: Sequence[dict[str, Any]]) -> None:
    """verify.png: per parameter, max|g − g_float64| by epoch for our gradient (solid) and
    native autograd's (dashed), on a log axis: ours on or under native's means as accurate."""
    from matplotlib.ticker import MaxNLocator

    names = verified_parameters(history)
    if not names:
        raise ValueError("write_verify: history has no verify_ours_err_<parameter> columns")
    fig = _figure(8, 4.5)
    ax = fig.subplots()
    colors = [f"C{i % 10}" for i in range(len(names))]
    for name, color in zip(names, colors):
        ep, ours, native = [], [], []
        for h in history:
            if f"{VERIFY_ERR_PREFIXES[0]}{name}" in h:
                ep.append(h["epoch"])
                # A zero error (exact) has no place on a log axis: leave a gap.
                ours.append(h[f"{VERIFY_ERR_PREFIXES[0]}{name}"] or math.nan)
                native.append(h[f"{VERIFY_ERR_PREFIXES[1]}{name}"] or math.nan)
        ax.plot(ep, ours, "o-", color=color, label=f"{name}: torch_mlp")
        ax.plot(ep, native, "x--", color=color, alpha=0.7, label=f"{name}: native autograd")
    ax.set(xlabel="epoch", ylabel="max |grad − grad in float64|", yscale="log",
           title="gradient error against float64 (max over the epoch's checks)")
    ax.grid(alpha=0.3, which="both")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize="small", ncol=2)
    fig.subplots_adjust(left=0.12, right=0.98, bottom=0.12, top=0.92)
    _save(fig, path)


def write_weights(path: str | os.PathLike[str], weight: Tensor, max_units: int = 1024,
                  zoom: int = 2) -> None:
    """weights.png: each first-layer unit's 784 weights as a 28×28 image, in a grid.

    Red is positive, blue negative, white zero; each unit is scaled to its own max |w|.
    """
    from PIL import Image

    w = weight.detach().float().cpu()[:max_units]  # (n, 784)
    n = w.shape[0]
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    w = w / w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)  # in [-1, 1]
    pos, neg = w.clamp(min=0), (-w).clamp(min=0)
    # Diverging map: white at 0, to red (1, 0, 0) at +1 and to blue (0, 0, 1) at -1.
    rgb = torch.stack([1 - neg, 1 - pos - neg, 1 - pos], dim=1).reshape(n, 3, 28, 28)
    grid = torch.full((3, rows * 29 + 1, cols * 29 + 1), 0.6)  # grey lines between units
    for k in range(n):
        r, c = divmod(k, cols)
        grid[:, 1 + r * 29: 29 + r * 29, 1 + c * 29: 29 + c * 29] = rgb[k]
    grid = grid.repeat_interleave(zoom, 1).repeat_interleave(zoom, 2)
    pixels = (grid * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    atomic_write(Path(path), lambda tmp: Image.fromarray(pixels).save(tmp, format="PNG"))


def write_plots(out: str | os.PathLike[str], history: Sequence[dict[str, Any]],
                first_weight: Tensor) -> str | None:
    """A run's weights.png, curves.png and (when ``history`` has verify columns) verify.png in
    ``out``; without matplotlib, only weights.png, and the warning to print is returned."""
    out = Path(out)
    write_weights(out / "weights.png", first_weight)
    try:
        write_curves(out / "curves.png", history)
        if any(k.startswith(VERIFY_ERR_PREFIXES) for h in history for k in h):
            write_verify(out / "verify.png", history)
    except ImportError as e:
        return f"warning: no curves.png or verify.png ({e}); pip install matplotlib"
    return None
