#!/usr/bin/env python
"""Train an MLP on MNIST with torch_mlp's hand-derived backward passes, checked against native
autograd while it trains.

Examples::

    python train.py                                  # the default run (make train)
    python train.py --hidden 512 256 --epochs 5      # two hidden layers
    python train.py --native                         # the same network with torch.nn + autograd
    python train.py --limit 2000 --epochs 2          # a smoke run on 2000 training images
    python train.py --resume runs/<run>/checkpoint.pt
    torchrun --nproc_per_node=2 train.py             # DistributedDataParallel, 2 processes

Importable: :func:`train` (a whole run from parsed arguments), :func:`evaluate` (loss and
accuracy of a model on tensors) and :func:`main` (parse + train; returns the final metrics).

Every ``--verify-every`` steps (default: the first step of every epoch) the gradients the
optimizer is about to use are compared with those of a native twin: ``torch.nn`` modules holding
the very same Parameters, with ``F.cross_entropy`` and an explicit ``½λΣW²``. A difference above
the dtype's tolerance stops the run.

Under torchrun (``WORLD_SIZE`` > 1) the model is wrapped in DistributedDataParallel (gloo on CPU,
NCCL on CUDA). ``--batch-size`` is the GLOBAL batch: each of the W processes takes batch-size/W
samples of it, its own shard of the epoch's shuffled indices, so a DDP run follows the same
trajectory as a single process, up to float rounding. Only rank 0 prints and writes.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# OMP_WAIT_POLICY is left to you. torch's default (OpenMP threads spin a while before they
# sleep) is the fast one on an idle CPU: 4.6 s per epoch here against 6.0 s with PASSIVE. On a
# CPU shared with other jobs, spinning threads starve each other, and OMP_WAIT_POLICY=PASSIVE
# is much faster (a step took 140 ms with the default and 19 ms with PASSIVE at load ~4).
import torch
import torch.distributed as dist
import torch.nn.functional as TF
from torch import Tensor, nn

import torch_mlp
from torch_mlp import functional as MF
from torch_mlp.data import MNISTTensors, load_mnist, prepare_mnist, shuffled_batches

# ----------------------------------------------------------------------------------------------
# Defaults, chosen by tools/sweep_defaults.py (README, "How the defaults were chosen"): the
# cheapest configuration whose 3 seeds all reached 98.78%; 58-66 s for the whole run on 2 CPU
# cores, against the 90 s budget. Change them here and only here.
# ----------------------------------------------------------------------------------------------
DEFAULTS: dict[str, Any] = {
    "hidden": [1024],
    "epochs": 13,
    "batch_size": 256,
    "optimizer": "sgd",
    "momentum": 0.9,
    "nesterov": True,
    "schedule": "onecycle",
    "l2": 2e-4,
    "label_smoothing": 0.1,
    "seed": 0,
}
# --lr's default depends on the optimizer.
LR_DEFAULTS: dict[str, float] = {"sgd": 0.4, "adam": 1e-3}

IN_FEATURES, NUM_CLASSES = 784, 10
EVAL_BATCH = 2000
CHECKPOINT_FORMAT = "torch_mlp.train/1"
# Flags that change what is trained. A resumed run takes them from the checkpoint; giving one
# with another value on the command line is an error (start a new run instead).
TRAJECTORY_KEYS = (
    "hidden", "epochs", "batch_size", "lr", "momentum", "nesterov", "optimizer", "schedule",
    "l2", "label_smoothing", "seed", "limit", "native", "amp",
)
# --verify-every's tolerance. For each parameter's gradient (and for the loss), with g_ours and
# g_native computed in the training dtype and g_64 the same math in float64:
#
#     max|g_ours − g_native| ≤ rtol · max|g_native| + K · max|g_native − g_64|
#
# rtol is the dtype's (torch.testing's defaults). The second term is native autograd's own
# rounding error on this very batch, times K. It is needed: near convergence a gradient is a
# small difference of large terms (p − q, all the more with label smoothing), so any fixed
# relative tolerance fails in the end while both implementations merely round differently.
# Measured (CPU, 320 checks over a 20-epoch run): our error against float64 stayed within 3×
# native's, while max|g_ours − g_native| / max|g_native| grew from 2e-7 to 1.1e-5. A real bug,
# such as a dropped 1/N, is off by about the gradient itself, ~1e5× the tolerance.
VERIFY_RTOL: dict[torch.dtype, float] = {
    torch.float64: 1e-7,
    torch.float32: 1.3e-6,
    torch.bfloat16: 1.6e-2,
    torch.float16: 1e-3,
}
VERIFY_K = 10.0
# The loss VALUE is one scalar, so native's rounding error on it is a single draw that can be
# ~0 by luck (a sum rounded in another order, e.g. ½λ·W·W against ½λ·ΣW², may then look wrong).
# Its tolerance also has a floor: the rounding error the compute dtype allows in this loss, the
# probabilistic bound for a float sum of n terms, u·√n·Σ|terms| (u = eps/2), over the terms the
# loss adds up: per (sample, class) |logsumexp| and smoothed |logit| terms, and the L2's W².


class TrainingError(RuntimeError):
    """A run stopped for a reason the message explains (base of the errors below)."""


class NonFiniteLossError(TrainingError):
    """The loss became NaN or inf; the message names the step."""


class VerifyError(TrainingError):
    """The hand-derived loss value or gradients differ from native autograd's beyond tolerance."""


class CheckpointError(TrainingError):
    """A checkpoint cannot be read, or is not one this run can continue."""


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def _int_at_least(lo: int, what: str) -> Callable[[str], int]:
    """An argparse type: an int >= lo, else an error saying it must be ``what``."""

    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {s!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be {what}, got {v}")
        return v

    return parse


_positive_int = _int_at_least(1, "a positive integer")
_nonnegative_int = _int_at_least(0, ">= 0")
SEED_MAX = 2**64 - 1  # torch.manual_seed's range


def _seed(s: str) -> int:
    v = _nonnegative_int(s)
    if v > SEED_MAX:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**64 - 1], got {v}")
    return v


# Above this an --lr or --l2 overflows float32 within a few steps: a typo, not a setting
# (1e6 still runs, and diverges, for the NaN check's sake).
FLOAT_FLAG_MAX = 1e6


def _float_in(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False):
    def parse(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid float value: {s!r}") from None
        ok = (lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi)
        if not ok:  # also refuses NaN
            left, right = "(" if lo_open else "[", ")" if hi_open else "]"
            raise argparse.ArgumentTypeError(f"must be in {left}{lo}, {hi}{right}, got {s}")
        return v

    return parse


def _device(s: str) -> str:
    if s in ("auto", "cpu", "cuda", "mps") or (s.startswith("cuda:") and s[5:].isdigit()):
        return s
    raise argparse.ArgumentTypeError(
        f"invalid choice: {s!r} (choose from 'auto', 'cpu', 'cuda', 'cuda:N', 'mps')"
    )


def build_parser(with_defaults: bool = True) -> argparse.ArgumentParser:
    """The command-line parser. ``with_defaults=False`` leaves out every default, so that
    parsing tells which flags were given (used by --resume)."""
    d = DEFAULTS

    def default(key: str, value: Any = None) -> dict[str, Any]:
        if not with_defaults:
            return {"default": argparse.SUPPRESS}
        return {"default": d[key] if value is None and key in d else value}

    p = argparse.ArgumentParser(
        prog="train.py",
        description="Train an MLP on MNIST with torch_mlp's hand-derived backward passes, "
        "checked against native autograd while it trains.",
    )
    m = p.add_argument_group("model and optimisation")
    m.add_argument("--hidden", type=_positive_int, nargs="+", metavar="H", **default("hidden"),
                   help="hidden layer sizes, one or more "
                   f"(default: {' '.join(map(str, d['hidden']))})")
    m.add_argument("--epochs", type=_positive_int, **default("epochs"),
                   help=f"number of epochs (default: {d['epochs']})")
    m.add_argument("--batch-size", type=_positive_int, **default("batch_size"),
                   help=f"global batch size; under DDP split over the processes "
                   f"(default: {d['batch_size']})")
    m.add_argument("--optimizer", choices=("sgd", "adam"), **default("optimizer"),
                   help=f"optimizer (default: {d['optimizer']})")
    m.add_argument("--lr", type=_float_in(0, FLOAT_FLAG_MAX, lo_open=True),
                   **default("lr", None),
                   help="learning rate; the peak one with --schedule onecycle "
                   f"(default: {LR_DEFAULTS['sgd']} for sgd, {LR_DEFAULTS['adam']} for adam)")
    m.add_argument("--momentum", type=_float_in(0, 1, hi_open=True), **default("momentum"),
                   help=f"SGD momentum; Adam's beta1 (default: {d['momentum']})")
    m.add_argument("--nesterov", action=argparse.BooleanOptionalAction, **default("nesterov"),
                   help=f"Nesterov momentum for SGD (default: {d['nesterov']})")
    m.add_argument("--schedule", choices=("onecycle", "cosine", "none"), **default("schedule"),
                   help="learning-rate schedule, stepped every batch: onecycle (30%% warm-up "
                   "to --lr, then cosine down), cosine (from --lr to 0) or none "
                   f"(default: {d['schedule']})")
    m.add_argument("--l2", type=_float_in(0, FLOAT_FLAG_MAX), **default("l2"),
                   help="the derivation's lambda: adds ½·λ·ΣW² over the weight matrices "
                   "(not biases) to the loss, through l2_penalty, not the optimizer's "
                   f"weight_decay (default: {d['l2']})")
    m.add_argument("--label-smoothing", type=_float_in(0, 1), **default("label_smoothing"),
                   help=f"label smoothing of the cross-entropy (default: {d['label_smoothing']})")
    m.add_argument("--seed", type=_seed, **default("seed"),
                   help="seed of the initialisation and the batch shuffling "
                   f"(default: {d['seed']})")
    m.add_argument("--native", action="store_true", **default("native", False),
                   help="train the same network with torch.nn modules, native autograd and "
                   "F.cross_entropy instead of torch_mlp (default: off)")
    m.add_argument("--limit", type=_positive_int, metavar="N", **default("limit", None),
                   help="train on the first N training images only, for a fast smoke run; "
                   "the test set stays whole (default: all 60000)")

    r = p.add_argument_group("run")
    r.add_argument("--device", type=_device, **default("device", "auto"),
                   help="auto, cpu, cuda[:N] or mps; auto takes cuda, then mps, then cpu "
                   "(default: auto)")
    r.add_argument("--data-dir", **default("data_dir", "data"),
                   help="MNIST root: files in <data-dir>/MNIST/raw, unpacked there from the "
                   "bundled copy on first use (default: ./data)")
    r.add_argument("--out", metavar="DIR", **default("out", None),
                   help="run directory for metrics.csv, curves.png, weights.png, config.json "
                   "and checkpoint.pt (default: runs/<date-time>, or the --resume checkpoint's "
                   "directory)")
    r.add_argument("--resume", metavar="CHECKPOINT", **default("resume", None),
                   help="continue the run saved in this checkpoint.pt; its flags are taken from "
                   "it (default: start a new run)")
    r.add_argument("--verify-every", type=_nonnegative_int, metavar="N",
                   **default("verify_every", None),
                   help="every N steps, compare the step's loss and gradients with a native "
                   "torch.nn twin holding the same parameters, and stop if they differ; 0 turns "
                   "it off (default: once per epoch, at its first step)")
    r.add_argument("--compile", action="store_true", **default("compile", False),
                   help="torch.compile the forward and loss (default: off)")
    r.add_argument("--amp", action="store_true", **default("amp", False),
                   help="mixed precision with torch.autocast: bfloat16 on cpu, float16 with a "
                   "GradScaler on cuda (default: off)")
    r.add_argument("--threads", type=_nonnegative_int, **default("threads", 0),
                   help="CPU threads for torch (torch.set_num_threads); 0 keeps torch's choice, "
                   "one per core. On a CPU shared with other jobs, fewer threads can be much "
                   "faster (default: 0)")
    r.add_argument("--quiet", action="store_true", **default("quiet", False),
                   help="no progress bars; the per-epoch summary lines stay (default: off)")
    return p


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` → cuda (this process's GPU under torchrun), else mps, else cpu."""
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    if name == "cuda" and torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device(name)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and check the command line; errors exit like argparse's (status 2).

    The namespace also carries ``explicit``: the flags given on the command line.
    """
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.explicit = sorted(vars(build_parser(with_defaults=False).parse_args(argv)))
    if args.lr is None:
        args.lr = LR_DEFAULTS[args.optimizer]
    dev = args.device.split(":")[0]
    if dev == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available on this machine")
    if dev == "cuda" and ":" in args.device \
            and int(args.device.split(":")[1]) >= torch.cuda.device_count():
        parser.error(f"--device {args.device}: this machine has "
                         f"{torch.cuda.device_count()} CUDA device(s)")
    if dev == "mps" and not torch.backends.mps.is_available():
        parser.error("--device mps: MPS is not available on this machine")
    if args.amp and dev == "mps":
        parser.error("--amp supports cpu (bfloat16) and cuda (float16), not mps")
    if args.amp and dev == "auto" and not torch.cuda.is_available() \
            and torch.backends.mps.is_available():
        parser.error("--amp supports cpu (bfloat16) and cuda (float16), not mps: add --device cpu")
    if args.resume is not None and not Path(args.resume).is_file():
        parser.error(f"--resume {args.resume}: no such file")
    data_dir = Path(args.data_dir)
    if data_dir.exists() and not data_dir.is_dir():
        parser.error(f"--data-dir {args.data_dir}: not a directory")
    if data_dir.is_dir() and not os.access(data_dir, os.R_OK | os.X_OK):
        parser.error(f"--data-dir {args.data_dir}: permission denied (not readable)")
    if args.out is not None:
        problem = _out_problem(Path(args.out))
        if problem:
            parser.error(f"--out {args.out}: {problem}")
    cpus = os.cpu_count() or 1
    if args.threads > cpus:
        print(f"train.py: warning: --threads {args.threads} is more than this machine's {cpus} "
              f"CPUs; the extra threads only compete for them", file=sys.stderr)
    return args


def _out_problem(out: Path) -> str | None:
    """Why ``out`` cannot be the run directory, or None. Creates nothing that stays: a
    directory or file that does exist is probed by making (and removing) a temporary one."""
    if out.exists() and not out.is_dir():
        return "exists and is not a directory"
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"permission denied: {existing} is not writable"
    try:  # root passes os.access everywhere; /proc and read-only mounts refuse the write itself
        os.rmdir(tempfile.mkdtemp(prefix=".train-probe-", dir=existing))
    except OSError as e:
        return f"cannot create files in {existing} ({e.strerror or type(e).__name__})"
    return None


# ----------------------------------------------------------------------------------------------
# Model, loss, native twin
# ----------------------------------------------------------------------------------------------
def build_model(hidden: Sequence[int], native: bool = False) -> nn.Module:
    """MLP 784-hidden-10 from torch_mlp's modules, or (``native``) the very same network, same
    initial values, made of torch.nn modules."""
    model = torch_mlp.MLP(IN_FEATURES, list(hidden), NUM_CLASSES)
    if native:
        return nn.Sequential(*torch_mlp.convert(model, to_native=True))
    return model


def _linear_weights(model: nn.Module) -> list[Tensor]:
    return [m.weight for m in model.modules() if isinstance(m, (nn.Linear, torch_mlp.Linear))]


def native_loss(logits: Tensor, y: Tensor, weights: Sequence[Tensor], l2: float,
                label_smoothing: float) -> Tensor:
    """F.cross_entropy + ½λΣ‖W‖², all in native autograd."""
    loss = TF.cross_entropy(logits, y, label_smoothing=label_smoothing)
    if l2 > 0:
        loss = loss + 0.5 * l2 * sum(w.square().sum() for w in weights)
    return loss


def custom_loss(logits: Tensor, y: Tensor, weights: Sequence[Tensor], l2: float,
                label_smoothing: float) -> Tensor:
    """torch_mlp's cross_entropy + l2_penalty: the hand-derived backward passes."""
    loss = MF.cross_entropy(logits, y, label_smoothing=label_smoothing)
    if l2 > 0:
        loss = loss + MF.l2_penalty(list(weights), l2)
    return loss


def native_twin(model: nn.Module) -> nn.Module:
    """torch.nn modules holding ``model``'s very Parameters (no copy, so always in sync)."""
    if isinstance(model, nn.Sequential):
        return nn.Sequential(*[torch_mlp.convert(m, to_native=True) for m in model])
    raise TypeError(f"native_twin: expected an nn.Sequential MLP, got {type(model).__name__}")


@torch.no_grad()
def _eval_sums(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = EVAL_BATCH) -> Tensor:
    """[Σ cross-entropy, number correct] over (x, y), as a float64 tensor on x's device."""
    sums = torch.zeros(2, dtype=torch.float64, device=x.device)
    for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
        logits = model(xb).float()
        sums[0] += TF.cross_entropy(logits, yb, reduction="sum")
        sums[1] += (logits.argmax(-1) == yb).sum()
    return sums


def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = EVAL_BATCH
             ) -> dict[str, float]:
    """Mean cross-entropy (no smoothing, no L2) and accuracy of ``model`` on (x, y)."""
    was_training = model.training
    model.eval()
    try:
        loss_sum, correct = _eval_sums(model, x, y, batch_size).tolist()
    finally:
        model.train(was_training)
    n = max(len(y), 1)
    return {"loss": loss_sum / n, "acc": correct / n}


# ----------------------------------------------------------------------------------------------
# Verification against the native twin
# ----------------------------------------------------------------------------------------------
@dataclass
class VerifyStats:
    """What --verify-every saw in one epoch."""

    checks: int = 0
    skipped: int = 0
    max_rel: float = 0.0  # max |g_ours − g_native| / max |g_native|, over parameters and checks
    max_used: float = 0.0  # max |g_ours − g_native| / tolerance
    seconds: float = 0.0
    last: dict[str, dict[str, float]] = field(default_factory=dict)

    def summary(self) -> str:
        if self.checks == 0 and self.skipped == 0:
            return "verify off"
        s = (f"verify ok ({self.checks} check{'s' * (self.checks != 1)}, max rel diff "
             f"{self.max_rel:.1e}, {100 * self.max_used:.0f}% of tolerance, {self.seconds:.2f} s)")
        return s + (f", {self.skipped} skipped (non-finite loss or fp16 grads)"
                    if self.skipped else "")


def compare_gradient(ours: Tensor, native: Tensor, exact: Tensor, rtol: float
                     ) -> dict[str, float]:
    """How far ``ours`` is from ``native``, against the tolerance ``rtol·max|native| +
    K·max|native − exact|`` (``exact``: the same quantity in float64); see VERIFY_RTOL."""
    ours, native, exact = ours.double(), native.double(), exact.double()
    diff = (ours - native).abs().max().item()
    scale = native.abs().max().item()
    native_err = (native - exact).abs().max().item()
    tol = rtol * scale + VERIFY_K * native_err
    return {"abs": diff, "rel": diff / scale if scale > 0 else diff, "native_err": native_err,
            "tol": tol, "used": diff / tol if tol > 0 else (0.0 if diff == 0 else math.inf)}


def loss_rounding_floor(logits64: Tensor, y: Tensor, weights64: Sequence[Tensor], l2: float,
                        label_smoothing: float, dtype: torch.dtype) -> float:
    """The rounding error ``dtype`` arithmetic allows in the loss (see VERIFY_K): u·√n·Σ|terms|
    for the cross-entropy's (B, C) terms and for the L2's ΣW², from the float64 values."""
    u = torch.finfo(dtype).eps / 2
    with torch.no_grad():
        z = logits64.detach()  # (B, C)
        n, c = z.shape
        # Per sample: |logsumexp| + Σ_c q_c|z_c|, q the smoothed one-hot target.
        q = torch.full_like(z, label_smoothing / c)
        q[torch.arange(n), y] += 1 - label_smoothing
        ce = (z.logsumexp(1).abs() + (q * z.abs()).sum(1)).mean().item() if n else 0.0
        floor = u * math.sqrt(z.numel()) * ce
        if l2 > 0:
            numel = sum(w.numel() for w in weights64)
            sq = sum(w.detach().double().square().sum().item() for w in weights64)
            floor += u * math.sqrt(numel) * 0.5 * l2 * sq
    return floor


def compare_loss(ours: Tensor, native: Tensor, exact: Tensor, rtol: float, floor: float
                 ) -> dict[str, float]:
    """How far the loss value ``ours`` is from the float64 ``exact``, against ``rtol·|exact| +
    K·max(|native − exact|, floor)``: native's own rounding error, at least ``floor``."""
    ours_v, native_v, exact_v = (float(t.detach().double()) for t in (ours, native, exact))
    diff = abs(ours_v - exact_v)
    native_err = abs(native_v - exact_v)
    tol = rtol * abs(exact_v) + VERIFY_K * max(native_err, floor)
    return {"abs": diff, "rel": diff / abs(exact_v) if exact_v else diff,
            "native_err": native_err, "tol": tol,
            "used": diff / tol if tol > 0 else (0.0 if diff == 0 else math.inf)}


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------
def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """write(tmp) then os.replace(tmp, path): a reader sees the old file or the new, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def load_checkpoint(path: str | os.PathLike[str], map_location: Any = "cpu") -> dict[str, Any]:
    """Read a train.py checkpoint with ``weights_only=True``; CheckpointError if unreadable."""
    path = Path(path)
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
            f"cannot read checkpoint {path} ({_first_line(e)}). It "
            f"is corrupted or truncated, or not a checkpoint written by train.py. Resume from "
            f"another copy or start a new run."
        ) from e
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} is not a train.py checkpoint (format {CHECKPOINT_FORMAT!r} expected)"
        )
    missing = {"epoch", "step", "sizes", "model", "optimizer", "rng", "args"} - ck.keys()
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: no {', '.join(sorted(missing))}")
    return ck


def _first_line(e: BaseException) -> str:
    """``Type: first line of the message`` (an exception's message may be empty)."""
    lines = str(e).splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _merge_resume_args(args: argparse.Namespace, ck: dict[str, Any], path: str) -> None:
    """Take the checkpoint's trajectory flags; refuse ones given with another value."""
    saved = ck["args"]
    explicit = set(getattr(args, "explicit", TRAJECTORY_KEYS))
    clashes = []
    for key in TRAJECTORY_KEYS:
        want = saved.get(key)
        if key in explicit and getattr(args, key) != want:
            clashes.append(f"{_flag(key)} {getattr(args, key)} (checkpoint: {want})")
        setattr(args, key, want)
    if clashes:
        what = "another architecture" if any(c.startswith("--hidden") for c in clashes) \
            else "other settings"
        raise CheckpointError(
            f"checkpoint {path} is from a run with {what}: {'; '.join(clashes)}. --resume "
            f"continues the same run, with the checkpoint's flags; start a new run to change them."
        )


# ----------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------
METRIC_FIELDS = ("epoch", "step", "lr", "train_loss", "train_acc", "test_loss", "test_acc",
                 "seconds", "train_seconds", "samples_per_s", "verify_checks",
                 "verify_max_rel_diff", "verify_tolerance_used", "verify_seconds")


def write_metrics_csv(path: Path, history: Sequence[dict[str, Any]]) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=METRIC_FIELDS, extrasaction="ignore")
            w.writeheader()
            w.writerows(history)

    _atomic_write(path, write)


def write_curves(path: Path, history: Sequence[dict[str, Any]]) -> None:
    """curves.png: loss and accuracy by epoch, train and test (matplotlib, Agg, no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    ep = [h["epoch"] for h in history]
    fig = Figure(figsize=(11, 4))
    FigureCanvasAgg(fig)
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
    _atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))


def write_weights(path: Path, weight: Tensor, max_units: int = 1024, zoom: int = 2) -> None:
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
    _atomic_write(path, lambda tmp: Image.fromarray(pixels).save(tmp, format="PNG"))


# ----------------------------------------------------------------------------------------------
# Distributed
# ----------------------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, t: Tensor, op: Any = None) -> Tensor:
        if self.enabled:
            dist.all_reduce(t, op=dist.ReduceOp.SUM if op is None else op)
        return t

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def _init_distributed(device_name: str) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        cuda = device_name.startswith("cuda") or (device_name == "auto"
                                                  and torch.cuda.is_available())
        if cuda:
            torch.cuda.set_device(local % torch.cuda.device_count())
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return Dist(rank, world, local)


def _all_mean(dd: Dist, tensors: Sequence[Tensor]) -> list[Tensor]:
    """The mean over the processes of each tensor (one all_reduce for all of them)."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dd.all_reduce(flat).div_(dd.world_size)
    return [f.view_as(t) for f, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
def _noop(*_: Any, **__: Any) -> None:
    pass


def _kept(last_good: tuple[Path, int] | None) -> str:
    if last_good is None:
        return "no checkpoint was written"
    return f"the last good checkpoint, {last_good[0]} (after epoch {last_good[1]}), is kept"


def _memory_needed(args: argparse.Namespace, sizes: Sequence[int]) -> int:
    """Bytes the run holds at least (float32): parameters, their gradients, the optimizer's
    state (1 buffer for SGD with momentum, 2 for Adam), and a batch's activations."""
    params = sum((a + 1) * b for a, b in zip(sizes, sizes[1:]))
    state = 2 if args.optimizer == "adam" else int(args.momentum > 0)
    rows = max(args.batch_size, EVAL_BATCH)
    return 4 * (params * (2 + state) + 3 * rows * sum(sizes))


def _memory_available(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with contextlib.suppress(OSError, ValueError, IndexError):  # Linux: free + reclaimable
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    with contextlib.suppress(ValueError, OSError, AttributeError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return None


def train(args: argparse.Namespace, data: MNISTTensors | None = None) -> dict[str, Any]:
    """One whole run, from :func:`parse_args`'s namespace; returns the final metrics.

    ``data`` lets a caller pass MNIST already loaded (on the run's device). A
    KeyboardInterrupt leaves with ``checkpoint`` set: the path to resume from, or None.
    """
    try:
        return _train(args, data)
    except KeyboardInterrupt as e:
        ck = Path(args.out) / "checkpoint.pt" if args.out is not None else None
        if ck is None or not ck.is_file():  # none written yet: the one resumed from, if any
            ck = Path(args.resume) if args.resume is not None else None
        e.checkpoint = str(ck) if ck is not None else None  # type: ignore[attr-defined]
        raise


def _train(args: argparse.Namespace, data: MNISTTensors | None) -> dict[str, Any]:
    t_start = time.perf_counter()
    dd = _init_distributed(args.device)
    device = resolve_device(args.device, dd.local_rank)
    say = print if dd.is_main else _noop

    ck = None
    if args.resume is not None:
        ck = load_checkpoint(args.resume, map_location=device)
        _merge_resume_args(args, ck, args.resume)
        sizes = [IN_FEATURES, *args.hidden, NUM_CLASSES]
        if list(ck["sizes"]) != sizes:
            raise CheckpointError(
                f"checkpoint {args.resume} holds an MLP {'-'.join(map(str, ck['sizes']))}, "
                f"this run builds {'-'.join(map(str, sizes))}: another architecture"
            )
    if args.out is None:
        if args.resume is not None:
            args.out = str(Path(args.resume).parent)
        else:
            args.out = str(Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    out = Path(args.out)
    sizes = [IN_FEATURES, *args.hidden, NUM_CLASSES]
    need, free = _memory_needed(args, sizes), _memory_available(device)
    if free is not None and need > free:
        raise TrainingError(
            f"--hidden {' '.join(map(str, args.hidden))}: the model needs at least "
            f"{need / 2**30:,.1f} GiB (parameters, gradients, optimizer state, activations), "
            f"and {device} has {free / 2**30:,.1f} GiB available"
        )
    if dd.is_main:
        problem = _out_problem(out)
        if problem:
            raise TrainingError(f"--out {out}: {problem}")
        if (out / "checkpoint.pt").exists() and (
            args.resume is None or Path(args.resume).resolve() != (out / "checkpoint.pt").resolve()
        ):
            raise TrainingError(
                f"{out} already holds a checkpoint.pt of another run: continue it with --resume "
                f"{out / 'checkpoint.pt'}, or choose another --out"
            )

    # ---- data: rank 0 unpacks (or checks) first, then every rank loads its tensors ----
    if data is None:
        try:
            if dd.is_main:
                prepare_mnist(args.data_dir, log=not args.quiet)
            dd.barrier()
            data = load_mnist(args.data_dir, device)
        except OSError as e:
            raise TrainingError(f"--data-dir {args.data_dir}: cannot read MNIST there "
                                f"({_first_line(e)})") from e
    if dd.is_main:  # only now: a data error leaves no empty run directory behind
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TrainingError(f"--out {out}: cannot create it ({_first_line(e)})") from e
    x_train, y_train = data.x_train.to(device), data.y_train.to(device)
    x_test, y_test = data.x_test.to(device), data.y_test.to(device)
    if args.limit is not None:
        x_train, y_train = x_train[: args.limit], y_train[: args.limit]
    n_train = len(y_train)
    if args.batch_size % dd.world_size:
        raise TrainingError(f"--batch-size {args.batch_size} must be divisible by the number "
                            f"of processes ({dd.world_size})")
    usable = n_train - n_train % dd.world_size
    steps_per_epoch = math.ceil(usable / args.batch_size)
    if steps_per_epoch == 0:
        raise TrainingError(
            f"--limit {args.limit}: {n_train} training image(s) give no step over "
            f"{dd.world_size} processes (each takes an equal share); use --limit >= "
            f"{dd.world_size}"
        )
    total_steps = steps_per_epoch * args.epochs
    verify_every = steps_per_epoch if args.verify_every is None else args.verify_every
    if args.native:
        verify_every = 0  # native against native would check nothing

    # ---- model, optimizer, schedule ----
    torch.manual_seed(args.seed)
    module = build_model(args.hidden, args.native).to(device)
    weights = _linear_weights(module)
    sizes = [IN_FEATURES, *args.hidden, NUM_CLASSES]
    if args.optimizer == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(
            module.parameters(), lr=args.lr, momentum=args.momentum,
            nesterov=args.nesterov and args.momentum > 0)
    else:
        optimizer = torch.optim.Adam(module.parameters(), lr=args.lr,
                                     betas=(args.momentum, 0.999))
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    if args.schedule == "onecycle":
        # Momentum is not cycled: --momentum means what it says.
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=args.lr, total_steps=total_steps, cycle_momentum=False)
    elif args.schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    amp_dtype = None
    if args.amp:
        amp_dtype = {"cpu": torch.bfloat16, "cuda": torch.float16}.get(device.type)
        if amp_dtype is None:
            raise TrainingError(f"--amp supports cpu and cuda, not {device.type}")
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    compute_dtype = amp_dtype or weights[0].dtype

    shuffle = torch.Generator().manual_seed(args.seed)
    history: list[dict[str, Any]] = []
    start_epoch, step = 0, 0
    if ck is not None:
        try:
            module.load_state_dict(ck["model"])
            optimizer.load_state_dict(ck["optimizer"])
            if scheduler is not None:
                scheduler.load_state_dict(ck["scheduler"])
            if scaler is not None and ck.get("scaler") is not None:
                scaler.load_state_dict(ck["scaler"])
            torch.set_rng_state(ck["rng"]["torch"].cpu())
            if device.type == "cuda" and ck["rng"].get("cuda") is not None:
                torch.cuda.set_rng_state(ck["rng"]["cuda"].cpu(), device)
            shuffle.set_state(ck["rng"]["shuffle"].cpu())
        except (RuntimeError, KeyError, ValueError, TypeError) as e:
            raise CheckpointError(
                f"checkpoint {args.resume} does not fit this run's model/optimizer "
                f"({_first_line(e)})"
            ) from e
        start_epoch, step = int(ck["epoch"]), int(ck["step"])
        history = list(ck.get("history", []))
        say(f"resuming {args.resume} after epoch {start_epoch} (step {step})")
    # The checkpoint a divergence falls back to: the one resumed from, then each one written.
    last_good: tuple[Path, int] | None = (Path(args.resume), start_epoch) if ck else None
    # --resume keeps the checkpoint's flags (a changed --lr is refused): advise what works.
    lower_lr = ("start a new run with a lower --lr (--resume keeps the checkpoint's)"
                if ck is not None else "try a lower --lr")

    model: nn.Module = module
    if dd.enabled:
        model = nn.parallel.DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None)
    loss_fn = native_loss if args.native else custom_loss
    twin = native_twin(module) if verify_every else None

    def forward_loss(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        logits = model(x)  # (B, 10)
        return loss_fn(logits, y, weights, args.l2, args.label_smoothing), logits

    step_fn = forward_loss
    if args.compile:
        # Under DDP, DDPOptimizer splits the graph at bucket boundaries: no fullgraph there.
        step_fn = torch.compile(forward_loss, fullgraph=not dd.enabled)

    def autocast() -> contextlib.AbstractContextManager[Any]:
        if amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=amp_dtype)

    # ---- outputs known before training ----
    n_params = sum(p.numel() for p in module.parameters())
    config = {
        **{k: v for k, v in vars(args).items() if k != "explicit"},
        "resolved": {
            "device": str(device), "world_size": dd.world_size, "steps_per_epoch": steps_per_epoch,
            "verify_every": verify_every, "train_size": n_train, "test_size": len(y_test),
            "sizes": sizes, "parameters": n_params, "amp_dtype": str(amp_dtype),
            "torch": str(torch.__version__),
        },
    }
    if dd.is_main:
        _atomic_write(out / "config.json",
                      lambda tmp: tmp.write_text(json.dumps(config, indent=2) + "\n"))
        kind = "torch.nn + native autograd" if args.native else "torch_mlp (hand-derived backward)"
        say(f"MLP {'-'.join(map(str, sizes))} ({n_params:,} parameters), {kind}, on {device}"
            f"{f' x{dd.world_size} processes (DDP)' if dd.enabled else ''}; "
            f"{n_train} training images, {steps_per_epoch} steps/epoch; run dir {out}")

    try:
        from tqdm.auto import tqdm
    except ImportError:  # progress bars are optional
        tqdm = None
    # NaN/inf check: every step on CPU (free); on an accelerator or under DDP every few steps
    # (a sync), naming the first bad step of the window all the same.
    check_every = 1 if device.type == "cpu" and not dd.enabled else 10

    weight_names = [f"{n}.weight" for n, m in module.named_modules()
                    if isinstance(m, (nn.Linear, torch_mlp.Linear))]

    def verify(x: Tensor, y: Tensor, loss: Tensor, stats: VerifyStats) -> None:
        """Compare this step's loss and gradients (already in .grad) with the native twin's
        on the same batch and parameters, and with float64; raise VerifyError if off."""
        assert twin is not None
        t0 = time.perf_counter()
        names = [n for n, _ in module.named_parameters()]
        params = [p for _, p in module.named_parameters()]
        if scaler is not None:
            scaler.unscale_(optimizer)  # compare true gradients; step() knows they are unscaled
        ours = [p.grad for p in params]
        # A non-finite loss is reported by the NaN check, naming the step; with fp16, non-finite
        # gradients are an overflow that GradScaler skips. Neither is a verdict on the backward.
        finite = torch.isfinite(loss.detach()).float().reshape(1)
        if scaler is not None:
            finite = finite * torch.stack([torch.isfinite(g).all() for g in ours]).all()
        if dd.enabled:
            dd.all_reduce(finite, dist.ReduceOp.MIN)
        if finite.item() < 1:
            stats.skipped += 1
            stats.seconds += time.perf_counter() - t0
            return
        # The native twin: torch.nn modules on the very same Parameters, same autocast.
        scale = 1.0 if scaler is None else float(scaler.get_scale())
        with autocast():
            native_l = native_loss(twin(x), y, _linear_weights(twin), args.l2,
                                   args.label_smoothing)
        native = [g / scale for g in torch.autograd.grad(native_l * scale, params)]
        # The same math in float64, to measure native's own rounding error.
        p64 = {n: p.detach().double().requires_grad_() for n, p in zip(names, params)}
        logits64 = torch.func.functional_call(twin, p64, (x.double(),))
        w64 = [p64[n] for n in weight_names]
        exact_l = native_loss(logits64, y, w64, args.l2, args.label_smoothing)
        exact = torch.autograd.grad(exact_l, list(p64.values()))
        if dd.enabled:  # DDP averaged ours over the processes; do the same with the others
            native, exact = (_all_mean(dd, gs) for gs in (native, exact))
        rtol = VERIFY_RTOL[compute_dtype]
        floor = loss_rounding_floor(logits64, y, w64, args.l2, args.label_smoothing,
                                    compute_dtype)
        # The loss is this process's own (DDP averages gradients, not loss values).
        report = {"loss": compare_loss(loss, native_l, exact_l, rtol, floor)}
        for name, g, gn, ge in zip(names, ours, native, exact):
            report[name] = compare_gradient(g, gn, ge, rtol)
        # Every process must reach the same verdict (else some would wait for the others).
        worst = torch.tensor([max(r["used"] for r in report.values()),
                              max(r["rel"] for r in report.values())],
                             dtype=torch.float64, device=device)
        if dd.enabled:
            dd.all_reduce(worst, dist.ReduceOp.MAX)
        used, rel = worst.tolist()
        stats.checks += 1
        stats.seconds += time.perf_counter() - t0
        stats.last = report
        stats.max_used = max(stats.max_used, used)
        stats.max_rel = max(stats.max_rel, rel)
        if not used <= 1:  # `not <=`: NaN fails too
            name, r = max(report.items(), key=lambda kv: kv[1]["used"])
            if not r["used"] > 1 and not math.isnan(r["used"]):
                name = "(another process's)"
            table = "; ".join(f"{n}: abs {r['abs']:.2e} rel {r['rel']:.2e} tol {r['tol']:.2e}"
                              for n, r in report.items())
            grads_ok = all(r2["used"] <= 1 for n, r2 in report.items() if n != "loss")
            if name == "loss":
                # A wrong VALUE is a forward's fault; the gradients are judged on their own.
                raise VerifyError(
                    f"--verify-every: at step {step} the hand-derived loss value differs from "
                    f"the float64 loss: abs diff {r['abs']:.3e} (rel {r['rel']:.3e}) > "
                    f"tolerance {r['tol']:.3e} = {rtol:.1e}·|loss| + {VERIFY_K:g}·max(native's "
                    f"own rounding error {r['native_err']:.2e}, {compute_dtype} rounding "
                    f"{floor:.2e}). All: {table}. The forward (value) of torch_mlp's "
                    f"cross_entropy or l2_penalty is wrong"
                    f"{'; every gradient is within tolerance' if grads_ok else ''}."
                )
            raise VerifyError(
                f"--verify-every: at step {step} the hand-derived {name} gradient differs from "
                f"native autograd's: max abs diff {r['abs']:.3e} (max rel diff {r['rel']:.3e}) "
                f"> tolerance {r['tol']:.3e} = {rtol:.1e}·max|native| + {VERIFY_K:g}·native's "
                f"own rounding error {r['native_err']:.2e} ({compute_dtype}). All: {table}. "
                f"The backward of a torch_mlp Function is wrong for {name}."
            )

    result: dict[str, Any] = {}
    for epoch in range(start_epoch + 1, args.epochs + 1):
        t_epoch = time.perf_counter()
        model.train()
        batches = shuffled_batches(n_train, args.batch_size, shuffle, rank=dd.rank,
                                   world_size=dd.world_size, device=device)
        running = torch.zeros(3, dtype=torch.float64, device=device)  # Σ loss·n, Σ correct, n
        stats = VerifyStats()
        window: list[Tensor] = []
        bar = None
        if tqdm is not None and dd.is_main and not args.quiet:
            bar = tqdm(total=usable, unit="img", unit_scale=True, leave=False, mininterval=0.5,
                       desc=f"epoch {epoch}/{args.epochs}", dynamic_ncols=True)
        for b, idx in enumerate(batches):
            x, y = x_train[idx], y_train[idx]  # (b, 784), (b,)
            with autocast():
                loss, logits = step_fn(x, y)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
            else:
                loss.backward()
            if verify_every and step % verify_every == 0:
                verify(x, y, loss, stats)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            if scheduler is not None:
                scheduler.step()
            lo = loss.detach()
            running[0] += lo * len(y)
            running[1] += (logits.detach().argmax(-1) == y).sum()
            running[2] += len(y)
            window.append(lo)
            step += 1
            if len(window) == check_every or b == len(batches) - 1:
                losses = torch.stack(window).float()
                bad = (~torch.isfinite(losses)).float()
                if dd.enabled:  # all processes stop together, or none does
                    dd.all_reduce(bad, dist.ReduceOp.MAX)
                if bad.any():
                    first = int(bad.argmax())
                    bad_step = step - len(window) + first
                    raise NonFiniteLossError(
                        f"loss is {losses[first].item()} at step {bad_step} (epoch {epoch}, "
                        f"batch {b - len(window) + 1 + first}): training diverged; {lower_lr}. "
                        f"Stopped; {_kept(last_good)}."
                    )
                window.clear()
                if bar is not None:
                    bar.set_postfix(loss=f"{losses[-1].item():.4f}", refresh=False)
            if bar is not None:
                bar.update(len(y) * dd.world_size)
        if bar is not None:
            bar.close()
        train_seconds = time.perf_counter() - t_epoch
        dd.all_reduce(running)
        model.eval()
        test = dd.all_reduce(_eval_sums(module, x_test[dd.rank::dd.world_size],
                                        y_test[dd.rank::dd.world_size]))
        train_loss, train_correct, seen = running.tolist()
        row = {
            "epoch": epoch, "step": step, "lr": optimizer.param_groups[0]["lr"],
            "train_loss": train_loss / seen, "train_acc": train_correct / seen,
            "test_loss": test[0].item() / len(y_test), "test_acc": test[1].item() / len(y_test),
            "train_seconds": train_seconds, "samples_per_s": seen / train_seconds,
            "verify_checks": stats.checks, "verify_max_rel_diff": stats.max_rel,
            "verify_tolerance_used": stats.max_used, "verify_seconds": stats.seconds,
        }
        row["seconds"] = time.perf_counter() - t_epoch  # training + evaluation
        # An epoch that ends on non-finite weights or test loss is no good checkpoint.
        finite = torch.tensor([float(math.isfinite(row["test_loss"]) and all(
            bool(torch.isfinite(p).all()) for p in module.parameters()))], device=device)
        if dd.all_reduce(finite, dist.ReduceOp.MIN).item() < 1:
            raise NonFiniteLossError(
                f"after epoch {epoch} (step {step}) the weights or the test loss "
                f"({row['test_loss']}) are not finite: training diverged; {lower_lr}. This "
                f"epoch is not saved; {_kept(last_good)}."
            )
        history.append(row)
        if dd.is_main:
            ck_out = {
                "format": CHECKPOINT_FORMAT, "epoch": epoch, "step": step, "sizes": sizes,
                "model": module.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "scaler": scaler.state_dict() if scaler is not None else None,
                "rng": {
                    "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                    "shuffle": shuffle.get_state(),
                },
                "args": {k: v for k, v in vars(args).items() if k != "explicit"},
                "history": history, "torch_version": str(torch.__version__),
            }
            _atomic_write(out / "checkpoint.pt", lambda tmp, c=ck_out: torch.save(c, tmp))
        last_good = (out / "checkpoint.pt", epoch)
        if dd.is_main:
            write_metrics_csv(out / "metrics.csv", history)
        say(f"epoch {epoch:>2}/{args.epochs}  train loss {row['train_loss']:.4f} acc "
            f"{100 * row['train_acc']:.2f}%  test loss {row['test_loss']:.4f} acc "
            f"{100 * row['test_acc']:.2f}%  {row['seconds']:.1f} s "
            f"({row['samples_per_s']:,.0f} img/s)  {stats.summary()}", flush=True)

    if not history:  # resumed a finished run: report what it reached
        test_m = evaluate(module, x_test, y_test)
        history = [{"epoch": start_epoch, "test_loss": test_m["loss"], "test_acc": test_m["acc"]}]
    if dd.is_main and "train_loss" in history[-1]:
        write_weights(out / "weights.png", weights[0])
        try:
            write_curves(out / "curves.png", history)
        except ImportError as e:
            say(f"warning: no curves.png ({e}); pip install matplotlib")
    result = dict(history[-1])
    train_time = sum(h.get("seconds", 0.0) for h in history)
    verify_time = sum(h.get("verify_seconds", 0.0) for h in history)
    result.update({
        "out": str(out), "wall_seconds": time.perf_counter() - t_start,
        "verify_overhead": verify_time / train_time if train_time else 0.0,
        "history": history,
    })
    if dd.is_main and "train_loss" in history[-1]:
        say(f"done: test accuracy {100 * result['test_acc']:.2f}% after {result['epoch']} "
            f"epochs, {result['wall_seconds']:.1f} s in train(); verify took "
            f"{100 * result['verify_overhead']:.2f}% of the epochs' time; outputs in {out}")
    return result


def main(argv: Sequence[str] | None = None, *, data: MNISTTensors | None = None
         ) -> dict[str, Any]:
    """Parse ``argv`` (default: sys.argv[1:]), train, and return the final metrics: the last
    epoch's row of metrics.csv plus ``out``, ``wall_seconds``, ``verify_overhead`` and
    ``history``. ``data``: MNIST already loaded (tests, notebooks); default: load it."""
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return train(args, data)
    finally:
        torch.set_num_threads(threads)
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    from torch_mlp.data import MNISTIntegrityError

    try:
        main()
    except (TrainingError, MNISTIntegrityError) as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as err:
        ck_path = getattr(err, "checkpoint", None)
        print("train.py: interrupted; " + (f"continue with --resume {ck_path}" if ck_path else
              "no checkpoint was written yet, so start the run again"), file=sys.stderr)
        sys.exit(130)
