"""Checkpoints of a training run: one file, written atomically, read back with every check.

The file is ``torch.save`` of a dict of tensors and plain containers (so ``weights_only=True``
reads it), with ``"format": CHECKPOINT_FORMAT``. :func:`save_checkpoint` writes it through
:func:`torch_mlp.data.atomic_write`; :func:`load_checkpoint` checks the zip records' CRCs, the
format key and the required keys; :func:`restore` puts a loaded one back into the objects of a
run, RNG streams included, so a resumed CPU run is bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import os
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import atomic_write
from .errors import CheckpointError

__all__ = ["CHECKPOINT_FORMAT", "REQUIRED_KEYS", "check_sizes", "checkpoint_to_resume",
           "first_line", "load_checkpoint", "make_checkpoint", "path_problem", "restore",
           "save_checkpoint"]

CHECKPOINT_FORMAT = "torch_mlp.train/1"
REQUIRED_KEYS = frozenset({"epoch", "step", "sizes", "model", "optimizer", "rng", "args"})


def first_line(e: BaseException) -> str:
    """``Type: first line of the message`` (an exception's message may be empty)."""
    lines = str(e).splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def make_checkpoint(*, epoch: int, step: int, sizes: list[int], model: nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any,
                    shuffle: torch.Generator, device: torch.device, args: dict[str, Any],
                    history: list[dict[str, Any]]) -> dict[str, Any]:
    """Everything a run needs to continue exactly where it is, as a plain dict."""
    return {
        "format": CHECKPOINT_FORMAT, "epoch": epoch, "step": step, "sizes": sizes,
        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "shuffle": shuffle.get_state(),
        },
        "args": args, "history": history, "torch_version": str(torch.__version__),
    }


def save_checkpoint(path: str | os.PathLike[str], checkpoint: dict[str, Any]) -> None:
    """``torch.save`` to ``path`` atomically: an interruption leaves the previous file whole."""
    atomic_write(Path(path), lambda tmp: torch.save(checkpoint, tmp))


def path_problem(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` cannot be a checkpoint file to read, or None."""
    path = Path(path)
    if path.is_dir():
        inside = path / "checkpoint.pt"
        hint = f" (did you mean {inside}?)" if inside.is_file() else ""
        return f"is a directory, not a checkpoint file{hint}"
    if not path.exists():
        return "no such file"
    return None if path.is_file() else "not a regular file"


def load_checkpoint(path: str | os.PathLike[str], map_location: Any = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``; CheckpointError if unreadable."""
    path = Path(path)
    problem = path_problem(path)
    if problem:
        raise CheckpointError(f"checkpoint {path}: {problem}")
    # torch.load does not check the zip records' CRCs: a flipped byte in a tensor loads silently.
    bad: str | None = None
    with contextlib.suppress(zipfile.BadZipFile, OSError, EOFError, ValueError), \
            zipfile.ZipFile(path) as z:
        bad = z.testzip()
    if bad is not None:
        raise CheckpointError(
            f"checkpoint {path} is corrupted: its record {bad} fails the CRC check (the file "
            f"changed after it was written). Resume from another copy or start a new run."
        )
    try:
        ck = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path}: no such file") from None
    except Exception as e:
        raise CheckpointError(
            f"cannot read checkpoint {path} ({first_line(e)}). It is corrupted or truncated, "
            f"or not a checkpoint written by train.py. Resume from another copy or start a new "
            f"run."
        ) from e
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} is not a train.py checkpoint (format {CHECKPOINT_FORMAT!r} expected)"
        )
    missing = REQUIRED_KEYS - ck.keys()
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: no {', '.join(sorted(missing))}")
    problem = _field_problem(ck)
    if problem:
        raise CheckpointError(
            f"checkpoint {path}: {problem}. It was edited or damaged: resume from another copy "
            f"or start a new run.")
    return ck


def _is_int(v: Any, lo: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo


def _field_problem(ck: dict[str, Any]) -> str | None:
    """What is wrong with the type or range of one of ``ck``'s fields, or None."""
    for key in ("epoch", "step"):
        if not _is_int(ck[key], 0):
            return f"field {key}: must be an integer >= 0, got {ck[key]!r}"
    sizes = ck["sizes"]
    if not (isinstance(sizes, list) and len(sizes) >= 2 and all(_is_int(s, 1) for s in sizes)):
        return f"field sizes: must be a list of 2 or more positive integers, got {sizes!r}"
    for key in ("model", "optimizer", "args", "rng"):
        if not isinstance(ck[key], dict):
            return f"field {key}: must be a dict, got {type(ck[key]).__name__}"
    history = ck.get("history", [])
    if not (isinstance(history, list) and all(isinstance(r, dict) for r in history)):
        return f"field history: must be a list of dicts, got {type(history).__name__}"
    for key, optional in (("torch", False), ("shuffle", False), ("cuda", True)):
        state = ck["rng"].get(key)
        if not (optional and state is None) and not (
                isinstance(state, torch.Tensor) and state.dtype == torch.uint8):
            got = state.dtype if isinstance(state, torch.Tensor) else type(state).__name__
            return f"field rng.{key}: must be a uint8 tensor (an RNG state), got {got}"
    return None


def check_sizes(ck: dict[str, Any], path: str | os.PathLike[str], sizes: list[int]) -> None:
    """Refuse a checkpoint whose MLP layer sizes are not ``sizes``."""
    if list(ck["sizes"]) != sizes:
        raise CheckpointError(
            f"checkpoint {path} holds an MLP {'-'.join(map(str, ck['sizes']))}, "
            f"this run builds {'-'.join(map(str, sizes))}: another architecture")


def checkpoint_to_resume(out: str | None, resume: str | None) -> str | None:
    """After an interruption: the run directory's checkpoint.pt, else (none written yet) the
    one the run resumed from, else None."""
    ck = Path(out) / "checkpoint.pt" if out is not None else None
    if ck is None or not ck.is_file():
        ck = Path(resume) if resume is not None else None
    return str(ck) if ck is not None else None


def restore(ck: dict[str, Any], path: str | os.PathLike[str], *, model: nn.Module,
            optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any,
            shuffle: torch.Generator, device: torch.device
            ) -> tuple[int, int, list[dict[str, Any]]]:
    """Load ``ck`` (from :func:`load_checkpoint`) into a run's objects and RNG streams;
    return where the run stands: (epoch, step, history)."""
    try:
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(ck["scheduler"])
        if scaler is not None and ck.get("scaler") is not None:
            scaler.load_state_dict(ck["scaler"])
        torch.set_rng_state(ck["rng"]["torch"].cpu())
        if device.type == "cuda" and ck["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(ck["rng"]["cuda"].cpu(), device)
        shuffle.set_state(ck["rng"]["shuffle"].cpu())
    except (RuntimeError, KeyError, ValueError, TypeError, AttributeError) as e:
        raise CheckpointError(
            f"checkpoint {path} does not fit this run's model/optimizer ({first_line(e)})"
        ) from e
    return ck["epoch"], ck["step"], list(ck.get("history", []))
