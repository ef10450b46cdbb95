"""What a run tells its user beyond the epoch lines: the advice a divergence error gives, a
verify failure on one line, and the progress bar (tqdm, when installed and wanted)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..verify import VerifyError

__all__ = ["NoBar", "diverged", "kept_checkpoint", "lower_lr", "progress_bar", "verify_one_line"]


def lower_lr(resumed: bool) -> str:
    """What to do after a divergence; --resume keeps the checkpoint's --lr, so say what works."""
    if resumed:
        return "start a new run with a lower --lr (--resume keeps the checkpoint's)"
    return "try a lower --lr"


def kept_checkpoint(last_good: tuple[Path, int] | None) -> str:
    """Which checkpoint a stopped run leaves to resume from: ``(path, epoch)`` or None."""
    if last_good is None:
        return "no checkpoint was written"
    path, epoch = last_good
    return f"the last good checkpoint, {path} (after epoch {epoch}), is kept"


def diverged(resumed: bool, last_good: tuple[Path, int] | None, done: str = "Stopped") -> str:
    """The end of a divergence error: what to do, ``done`` (what became of the run), and
    which checkpoint is left."""
    return f"training diverged; {lower_lr(resumed)}. {done}; {kept_checkpoint(last_good)}."


def verify_one_line(err: VerifyError) -> str:
    """The verdict's first line and every row's numbers, on one line (one CLI error line)."""
    head = str(err).splitlines()[0].removeprefix("verify: ")
    rows = "; ".join(f"{r.name}: abs {r.abs:.2e} rel {r.rel:.2e} tol {r.tol:.2e}"
                     for r in err.report.rows)
    return f"{head} All: {rows}."


class NoBar:
    """What :func:`progress_bar` returns when there is none to show: every call does nothing."""

    def update(self, n: float = 1) -> None:
        pass

    def set_postfix(self, *a: Any, **k: Any) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(show: bool, total: int, desc: str) -> Any:
    """A tqdm bar counting ``total`` images; a :class:`NoBar` if ``show`` is false or tqdm is
    not installed."""
    if not show:
        return NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # progress bars are optional
        return NoBar()
    return tqdm(total=total, unit="img", unit_scale=True, leave=False, mininterval=0.5,
                desc=desc, dynamic_ncols=True)
