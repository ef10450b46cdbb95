"""The run's pictures, written atomically: curves.png (loss and accuracy), weights.png (the
first layer's units), verify.png (our gradients' error against float64 beside native
autograd's), and --evaluate's confusion.png and mistakes.png.

matplotlib is used through its Agg canvas, without pyplot (no global state, no display).
Without matplotlib the pictures are skipped with one warning line.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..data import MEAN, STD, MNISTTensors
from .rundir import write


def _no_matplotlib() -> str | None:
    """The warning to print instead of the pictures when matplotlib is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        return f"warning: no pictures ({e}); pip install matplotlib"
    return None


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
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
    _save(fig, path, kept)


def write_weights(path: Path, weight: Tensor, kept: str, max_units: int = 1024) -> None:
    """weights.png: each first-layer unit's 784 weights as a 28×28 image, in a grid; red is
    positive, blue negative, white zero, each unit scaled to its own max |w|."""
    from matplotlib import colormaps

    w = weight.detach().float().cpu()[:max_units]  # (n, 784)
    w = w / w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)  # in [-1, 1]
    n, cols = len(w), math.ceil(math.sqrt(len(w)))
    grid = torch.full((math.ceil(n / cols) * 29 + 1, cols * 29 + 1), math.nan)  # NaN: grey lines
    for k in range(n):
        r, c = divmod(k, cols)
        grid[1 + r * 29: 29 + r * 29, 1 + c * 29: 29 + c * 29] = w[k].reshape(28, 28)
    fig = _figure(grid.shape[1] / 50, grid.shape[0] / 50)  # 2 pixels a weight at dpi 100
    fig.figimage(grid.repeat_interleave(2, 0).repeat_interleave(2, 1).numpy(), vmin=-1, vmax=1,
                 cmap=colormaps["bwr"].with_extremes(bad="0.6"))
    _save(fig, path, kept)


def write_plots(out: Path, history: list[dict[str, Any]], first_weight: Tensor,
                kept: str) -> str | None:
    """A run's curves.png, weights.png and (when ``history`` has verify columns) verify.png;
    returns the warning to print when matplotlib is missing."""
    if _no_matplotlib():
        return _no_matplotlib()
    write_curves(out / "curves.png", history, kept)
    write_weights(out / "weights.png", first_weight, kept)
    if any(k.startswith("verify_ours_err_") for h in history for k in h):
        write_verify(out / "verify.png", history, kept)
    return None


def write_evaluation(out: Path, confusion: list[list[int]], logits: Tensor, data: MNISTTensors,
                     kept: str, count: int = 24) -> str | None:
    """--evaluate's confusion.png (mistakes per true and predicted class) and mistakes.png (the
    ``count`` misclassified test digits the model was surest of, each titled with its true and
    predicted label); returns the warning to print when matplotlib is missing."""
    if _no_matplotlib():
        return _no_matplotlib()
    c = torch.tensor(confusion)
    mistakes = c - torch.diag(c.diag())
    fig = _figure(6.5, 5.5)
    ax = fig.subplots()
    fig.colorbar(ax.imshow(mistakes.numpy(), cmap="Reds"), ax=ax, label="mistakes")
    for (t, p), n in zip(torch.cartesian_prod(torch.arange(10), torch.arange(10)).tolist(),
                         c.flatten().tolist()):  # white text on the darker half of the scale
        color = "grey" if t == p else "w" if n > mistakes.max() / 2 else "k"
        ax.text(p, t, n, ha="center", va="center", fontsize=7, color=color)
    ax.set(xlabel="predicted", ylabel="true", xticks=range(10), yticks=range(10),
           title=f"confusion matrix: {int(mistakes.sum())} mistakes in {int(c.sum())}")
    _save(fig, out / "confusion.png", kept)
    sure, predicted = logits.softmax(-1).max(-1)
    wrong = (predicted != data.y_test).nonzero().flatten()
    worst = wrong[sure[wrong].argsort(descending=True)][:count].tolist()
    fig = _figure(12, 2.3 * math.ceil(count / 8))
    for ax, i in zip(fig.subplots(math.ceil(count / 8), 8, squeeze=False).flat, worst):
        ax.imshow((data.x_test[i] * STD + MEAN).reshape(28, 28).cpu().numpy(), cmap="gray_r")
        ax.set_title(f"true {data.y_test[i]}, predicted {predicted[i]}\n({sure[i]:.0%} sure)",
                     fontsize=8)
    for ax in fig.axes:
        ax.axis("off")
    _save(fig, out / "mistakes.png", kept)
    return None
