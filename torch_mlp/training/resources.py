"""What a run needs from the machine, checked before it trains: memory for the model, a run
directory it may write, the data on the device, at least one step per epoch, an autocast dtype;
and :func:`num_threads` for --threads.

Each check raises :class:`~torch_mlp.training.errors.TrainingError` with one line naming the
flag and the problem, before anything is written (a refused run leaves no run directory).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from ..data import MNISTTensors, load_mnist, prepare_mnist
from .checkpoint import first_line
from .config import out_problem
from .distributed import Dist
from .errors import TrainingError

__all__ = ["amp_dtype", "check_memory", "check_out", "load_data", "memory_available",
           "memory_needed", "num_threads", "steps_per_epoch"]


def memory_available(device: torch.device) -> int | None:
    """Bytes free on ``device`` (cuda: the driver's count; cpu: MemAvailable), None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with contextlib.suppress(OSError, ValueError, IndexError):  # Linux: free + reclaimable
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    with contextlib.suppress(ValueError, OSError, AttributeError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return None


def memory_needed(sizes: Sequence[int], batch_size: int, optimizer_states: int) -> int:
    """Bytes (float32) of parameters, gradients, ``optimizer_states`` copies of the parameters
    and one batch's activations (three per unit) of an MLP with layer ``sizes``."""
    params = sum((a + 1) * b for a, b in zip(sizes, sizes[1:]))
    return 4 * (params * (2 + optimizer_states) + 3 * batch_size * sum(sizes))


def check_memory(args: argparse.Namespace, device: torch.device, sizes: Sequence[int],
                 eval_batch: int) -> None:
    """Refuse a model that cannot fit in the memory ``device`` has available."""
    states = 2 if args.optimizer == "adam" else int(args.momentum > 0)
    need = memory_needed(sizes, max(args.batch_size, eval_batch), states)
    free = memory_available(device)
    if free is not None and need > free:
        raise TrainingError(
            f"--hidden {' '.join(map(str, args.hidden))}: the model needs at least "
            f"{need / 2**30:,.1f} GiB (parameters, gradients, optimizer state, activations), "
            f"and {device} has {free / 2**30:,.1f} GiB available")


def check_out(args: argparse.Namespace, dd: Dist) -> Path:
    """The run directory (sets ``args.out`` if unset), checked by rank 0; not created yet, so
    that a data error leaves none behind."""
    if args.out is None:
        args.out = str(Path(args.resume).parent if args.resume is not None
                       else Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    out = Path(args.out)
    if dd.is_main:
        problem = out_problem(out)
        if problem:
            raise TrainingError(f"--out {out}: {problem}")
        ck = out / "checkpoint.pt"
        if ck.exists() and (args.resume is None or Path(args.resume).resolve() != ck.resolve()):
            raise TrainingError(f"{out} already holds a checkpoint.pt of another run: continue "
                                f"it with --resume {ck}, or choose another --out")
    return out


def load_data(args: argparse.Namespace, dd: Dist, device: torch.device, out: Path,
              data: MNISTTensors | None) -> MNISTTensors:
    """MNIST on ``device`` with --limit applied (rank 0 unpacks or checks it first, unless
    ``data`` is given), then the run directory is created."""
    if data is None:
        try:
            if dd.is_main:
                prepare_mnist(args.data_dir, log=not args.quiet)
            dd.barrier()
            data = load_mnist(args.data_dir, device)
        except OSError as e:
            raise TrainingError(f"--data-dir {args.data_dir}: cannot read MNIST there "
                                f"({first_line(e)})") from e
    if dd.is_main:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TrainingError(f"--out {out}: cannot create it ({first_line(e)})") from e
    n = args.limit
    return MNISTTensors(data.x_train[:n].to(device), data.y_train[:n].to(device),
                        data.x_test.to(device), data.y_test.to(device))


def steps_per_epoch(args: argparse.Namespace, dd: Dist, n_train: int) -> int:
    """Optimizer steps in an epoch of ``n_train`` images: every process takes an equal share
    of each (global) batch, the remainder of ``n_train`` over the processes is left out."""
    if args.batch_size % dd.world_size:
        raise TrainingError(f"--batch-size {args.batch_size} must be divisible by the number "
                            f"of processes ({dd.world_size})")
    steps = math.ceil((n_train - n_train % dd.world_size) / args.batch_size)
    if steps == 0:
        raise TrainingError(
            f"--limit {args.limit}: {n_train} training image(s) give no step over "
            f"{dd.world_size} processes (each takes an equal share); use --limit >= "
            f"{dd.world_size}")
    return steps


def amp_dtype(amp: bool, device: torch.device) -> torch.dtype | None:
    """--amp's autocast dtype on ``device`` (bfloat16 on cpu, float16 on cuda), None without."""
    if not amp:
        return None
    dtype = {"cpu": torch.bfloat16, "cuda": torch.float16}.get(device.type)
    if dtype is None:
        raise TrainingError(f"--amp supports cpu and cuda, not {device.type}")
    return dtype


@contextlib.contextmanager
def num_threads(n: int) -> Iterator[None]:
    """``torch.set_num_threads(n)`` inside the block (0 keeps torch's choice); torch's thread
    count is restored after it, whatever happens."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
