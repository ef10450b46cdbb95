"""A run directory, one run's alone (:func:`take`); checkpoints with the SHA-256 of their
content; every file written atomically (:func:`write`)."""

from __future__ import annotations

import csv
import errno
import fcntl
import hashlib
import os
import socket
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

from ..data import atomic_write
from .config import TrainingError

FORMAT = "torch_mlp.train/2"
LOCK = ".torch_mlp.lock"  # its presence marks a run directory; flock on it, the run's own


def take(out: Path, resume: str | None, name: str = "--out") -> IO[str]:
    """Lock ``out`` until the returned file is closed; refuse a directory another run holds, a
    non-empty one that is no run directory, and another run's (unless ``resume``'s own)."""
    if out.exists() and not out.is_dir():
        raise TrainingError(f"{name} {out} is a file: choose a directory with --out")
    if out.is_dir() and any(out.iterdir()) and not (out / LOCK).is_file():
        raise TrainingError(f"{name} {out} is not empty and is not a torch_mlp run directory: "
                            f"choose a new or empty directory with --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = open(out / LOCK, "a+")  # noqa: SIM115 (held open for the run's lifetime)
    except OSError as e:
        raise TrainingError(f"{name} {out}: cannot create the run directory ({e.strerror}): "
                            f"choose another with --out") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        holder = lock.read().strip() or "another run"
        lock.close()
        raise TrainingError(f"{name} {out} is in use by {holder}: wait for that run to end, or "
                            f"choose another --out") from None
    own = resume is not None and Path(resume).resolve().parent == out.resolve()
    others = sorted(p.name for p in out.iterdir() if p.name != LOCK)
    if others and not own:  # checked under the lock: no other run can write here any more
        lock.close()
        ck = out / "checkpoint.pt"
        hint = f"continue it with --resume {ck}, or" if ck.is_file() else "delete it or"
        raise TrainingError(f"{name} {out} holds another run ({', '.join(others[:4])}): {hint} "
                            f"choose another --out")
    lock.truncate(0)  # "a+": the write goes to the end, now the start
    print(f"pid {os.getpid()} on {socket.gethostname()}", file=lock, flush=True)
    return lock


def write(path: Path, write_to: Callable[[Path], None], kept: str) -> None:
    """``write_to(tmp)``, then renamed onto ``path`` (:func:`torch_mlp.data.atomic_write`); an
    OSError, or torch.save's RuntimeError, is one line naming the file and ``kept``."""
    try:
        atomic_write(path, write_to)
    except (OSError, RuntimeError) as e:
        full = getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT)
        why = getattr(e, "strerror", None) or f"{str(e).splitlines()[0]}: is the disk full?"
        raise TrainingError(f"cannot write {path} ({why}){': free some space' if full else ''}; "
                            f"{kept}") from None


def digest(obj: Any) -> str:
    """SHA-256 of the dtype, shape and bytes of every tensor in ``obj``, the repr of the rest."""
    h = hashlib.sha256()

    def feed(where: str, v: Any) -> None:
        if isinstance(v, (dict, list, tuple)):  # an empty one too: its key and type count
            h.update(f"{where}:{type(v).__name__}[{len(v)}]".encode())
            for k, x in v.items() if isinstance(v, dict) else enumerate(v):
                feed(f"{where}/{k!r}", x)
        elif isinstance(v, torch.Tensor):
            h.update(f"{where}:{v.dtype}{list(v.shape)}".encode())
            h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        else:
            h.update(f"{where}={v!r}".encode())

    feed("", obj)
    return h.hexdigest()


def save_checkpoint(path: Path, checkpoint: dict[str, Any], kept: str) -> None:
    """``torch.save`` of ``checkpoint`` and its digest, atomically (:func:`write`)."""
    signed = {**checkpoint, "format": FORMAT}
    signed["sha256"] = digest(signed)
    write(path, lambda tmp: torch.save(signed, tmp), kept)


def load_checkpoint(path: str) -> dict[str, Any]:
    """The checkpoint at ``path``, read with ``weights_only=True`` onto the CPU and checked
    against its digest: damage anywhere, in the zip records or the bytes they hold, is one line."""
    if not Path(path).is_file():
        what = "not a file" if Path(path).exists() else "no such file"
        raise TrainingError(f"checkpoint {path}: {what}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # what a damaged file makes torch say: one line below
        try:
            ck = torch.load(path, map_location="cpu", weights_only=True)
            form = ck.get("format") if isinstance(ck, dict) else type(ck).__name__
            why = f"format {form!r}" if form != FORMAT else "its content does not match its SHA-256"
            ok = form == FORMAT and ck.pop("sha256", None) == digest(ck)
        except Exception as e:  # whatever a damaged zip or pickle makes torch.load raise
            first = str(e).split(". ")[0].splitlines()[:1]  # not torch's advice to load unsafely
            why, ok = ": ".join([type(e).__name__, *first]), False
    if not ok:
        raise TrainingError(f"checkpoint {path} is damaged, or not one this torch_mlp.train "
                            f"writes ({why}): use another copy, or start a new run")
    return ck


def write_metrics(path: Path, history: list[dict[str, Any]], kept: str) -> None:
    """metrics.csv: one row per epoch, an empty cell where an epoch lacks a column."""
    fields = list(dict.fromkeys(k for row in history for k in row))

    def write_to(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(history)

    write(path, write_to, kept)
