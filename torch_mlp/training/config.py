"""train.py's command line: the defaults table, the parser built from it, and the checks that
turn a bad flag into one argparse error line (status 2) before anything loads.

Every flag's ``(default: …)`` in ``--help`` is generated from :data:`DEFAULTS`,
:data:`RUN_DEFAULTS` and :data:`LR_DEFAULTS`, the values the parser really uses, so the help
cannot drift from the code.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..data import atomic_write
from .checkpoint import path_problem
from .errors import CheckpointError

__all__ = ["DEFAULTS", "DEFAULT_TEXT", "LR_DEFAULTS", "RUN_DEFAULTS", "TRAJECTORY_KEYS",
           "build_parser", "flag_values", "format_default", "merge_resume_args", "out_problem",
           "parse_args", "resolve_device", "write_config"]

# Defaults, chosen by tools/sweep_defaults.py (README, "How the defaults were chosen"): the
# cheapest configuration whose 3 seeds all reached 98.78%; 58-66 s for the whole run on 2 CPU
# cores, against the 90 s budget. Change them here and only here.
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
# The other flags: how a run is carried out, not what it trains (except native and limit).
RUN_DEFAULTS: dict[str, Any] = {
    "lr": None, "native": False, "limit": None, "device": "auto", "data_dir": "data",
    "out": None, "resume": None, "verify_every": None, "compile": False, "amp": False,
    "threads": 0, "quiet": False,
}
# What "(default: …)" says where the default is resolved later (None in the parser).
DEFAULT_TEXT: dict[str, str] = {
    "lr": ", ".join(f"{v} for {k}" for k, v in LR_DEFAULTS.items()),
    "limit": "all 60000",
    "out": "runs/<date-time>, or the --resume checkpoint's directory",
    "resume": "start a new run",
    "verify_every": "once per epoch, at its first step",
}
# Flags that change what is trained. A resumed run takes them from the checkpoint; giving one
# with another value on the command line is an error (start a new run instead).
TRAJECTORY_KEYS = (
    "hidden", "epochs", "batch_size", "lr", "momentum", "nesterov", "optimizer", "schedule",
    "l2", "label_smoothing", "seed", "limit", "native", "amp",
)
SEED_MAX = 2**64 - 1  # torch.manual_seed's range
# Above this an --lr or --l2 overflows float32 within a few steps: a typo, not a setting
# (1e6 still runs, and diverges, for the NaN check's sake).
FLOAT_FLAG_MAX = 1e6


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


def _seed(s: str) -> int:
    v = _nonnegative_int(s)
    if v > SEED_MAX:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**64 - 1], got {v}")
    return v


def _float_in(lo: float, hi: float, *, lo_open: bool = False,
              hi_open: bool = False) -> Callable[[str], float]:
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


def _path(s: str) -> str:
    # Path("") is the current directory: an empty value is an unset variable, not a choice.
    if not s:
        raise argparse.ArgumentTypeError("must not be empty")
    return s


def _device(s: str) -> str:
    if s in ("auto", "cpu", "cuda", "mps") or (s.startswith("cuda:") and s[5:].isdigit()):
        return s
    raise argparse.ArgumentTypeError(
        f"invalid choice: {s!r} (choose from 'auto', 'cpu', 'cuda', 'cuda:N', 'mps')"
    )


def format_default(value: Any) -> str:
    """How ``--help`` writes a default: lists space-separated, booleans on/off."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value))
    return str(value)


# (flag, add_argument keywords, help without the default); the default comes from the tables.
_MODEL_FLAGS: list[tuple[str, dict[str, Any], str]] = [
    ("--hidden", {"type": _positive_int, "nargs": "+", "metavar": "H"},
     "hidden layer sizes, one or more"),
    ("--epochs", {"type": _positive_int}, "number of epochs"),
    ("--batch-size", {"type": _positive_int},
     "global batch size; under DDP split over the processes"),
    ("--optimizer", {"choices": ("sgd", "adam")}, "optimizer"),
    ("--lr", {"type": _float_in(0, FLOAT_FLAG_MAX, lo_open=True)},
     "learning rate; the peak one with --schedule onecycle"),
    ("--momentum", {"type": _float_in(0, 1, hi_open=True)}, "SGD momentum; Adam's beta1"),
    ("--nesterov", {"action": argparse.BooleanOptionalAction}, "Nesterov momentum for SGD"),
    ("--schedule", {"choices": ("onecycle", "cosine", "none")},
     "learning-rate schedule, stepped every batch: onecycle (30%% warm-up to --lr, then cosine "
     "down), cosine (from --lr to 0) or none"),
    ("--l2", {"type": _float_in(0, FLOAT_FLAG_MAX)},
     "the derivation's lambda: adds ½·λ·ΣW² over the weight matrices (not biases) to the loss, "
     "through l2_penalty, not the optimizer's weight_decay"),
    ("--label-smoothing", {"type": _float_in(0, 1)}, "label smoothing of the cross-entropy"),
    ("--seed", {"type": _seed}, "seed of the initialisation and the batch shuffling"),
    ("--native", {"action": "store_true"},
     "train the same network with torch.nn modules, native autograd and F.cross_entropy "
     "instead of torch_mlp; --verify-every is off then (native is the reference)"),
    ("--limit", {"type": _positive_int, "metavar": "N"},
     "train on the first N training images only, for a fast smoke run; the test set stays "
     "whole"),
]
_RUN_FLAGS: list[tuple[str, dict[str, Any], str]] = [
    ("--device", {"type": _device},
     "auto, cpu, cuda[:N] or mps; auto takes cuda, then mps, then cpu"),
    ("--data-dir", {"type": _path},
     "MNIST root: files in <data-dir>/MNIST/raw, unpacked there from the bundled copy on "
     "first use"),
    ("--out", {"type": _path, "metavar": "DIR"},
     "run directory for metrics.csv, curves.png, weights.png, verify.png, config.json and "
     "checkpoint.pt"),
    ("--resume", {"type": _path, "metavar": "CHECKPOINT"},
     "continue the run saved in this checkpoint.pt; its flags are taken from it"),
    ("--verify-every", {"type": _nonnegative_int, "metavar": "N"},
     "every N steps, compare the step's loss and gradients with native autograd's and "
     "float64's (torch_mlp.verify), and stop if they differ; 0 turns it off"),
    ("--compile", {"action": "store_true"}, "torch.compile the forward and loss"),
    ("--amp", {"action": "store_true"},
     "mixed precision with torch.autocast: bfloat16 on cpu, float16 with a GradScaler on cuda"),
    ("--threads", {"type": _nonnegative_int},
     "CPU threads for torch (torch.set_num_threads); 0 keeps torch's choice, one per core. On "
     "a CPU shared with other jobs, fewer threads can be much faster"),
    ("--quiet", {"action": "store_true"},
     "no progress bars; the per-epoch summary lines stay"),
]


def build_parser(with_defaults: bool = True) -> argparse.ArgumentParser:
    """The command-line parser. ``with_defaults=False`` leaves out every default, so that
    parsing tells which flags were given (used by --resume)."""
    p = argparse.ArgumentParser(
        prog="train.py",
        description="Train an MLP on MNIST with torch_mlp's hand-derived backward passes, "
        "checked against native autograd while it trains.",
    )
    table = {**DEFAULTS, **RUN_DEFAULTS}
    for title, flags in (("model and optimisation", _MODEL_FLAGS), ("run", _RUN_FLAGS)):
        group = p.add_argument_group(title)
        for flag, kwargs, text in flags:
            key = flag[2:].replace("-", "_")
            shown = DEFAULT_TEXT.get(key, format_default(table[key]))
            group.add_argument(flag, **kwargs, help=f"{text} (default: {shown})",
                               default=table[key] if with_defaults else argparse.SUPPRESS)
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


def _device_problem(device: str, amp: bool) -> str | None:
    dev = device.split(":")[0]
    if dev == "cuda" and not torch.cuda.is_available():
        return f"--device {device}: CUDA is not available on this machine"
    if dev == "cuda" and ":" in device and int(device[5:]) >= torch.cuda.device_count():
        return f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)"
    if dev == "mps" and not torch.backends.mps.is_available():
        return "--device mps: MPS is not available on this machine"
    if amp and dev == "mps":
        return "--amp supports cpu (bfloat16) and cuda (float16), not mps"
    if amp and dev == "auto" and not torch.cuda.is_available() \
            and torch.backends.mps.is_available():
        return "--amp supports cpu (bfloat16) and cuda (float16), not mps: add --device cpu"
    return None


def _path_problem(args: argparse.Namespace) -> str | None:
    problem = args.resume is not None and path_problem(args.resume)
    if problem:
        return f"--resume {args.resume}: {problem}"
    data_dir = Path(args.data_dir)
    if data_dir.exists() and not data_dir.is_dir():
        return f"--data-dir {args.data_dir}: not a directory"
    if data_dir.is_dir() and not os.access(data_dir, os.R_OK | os.X_OK):
        return f"--data-dir {args.data_dir}: permission denied (not readable)"
    if args.out is not None:
        problem = out_problem(Path(args.out))
        if problem:
            return f"--out {args.out}: {problem}"
    return None


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
    problem = _device_problem(args.device, args.amp) or _path_problem(args)
    if problem:
        parser.error(problem)
    cpus = os.cpu_count() or 1
    if args.threads > cpus:
        print(f"train.py: warning: --threads {args.threads} is more than this machine's {cpus} "
              f"CPUs; the extra threads only compete for them", file=sys.stderr)
    return args


def out_problem(out: Path) -> str | None:
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


def _saved_value(key: str, value: Any) -> Any:
    """``value`` of flag ``key`` read from a checkpoint, checked as the command line checks
    it; argparse.ArgumentTypeError if the flag would refuse it."""
    kwargs = next(kw for flag, kw, _ in _MODEL_FLAGS + _RUN_FLAGS if flag[2:] == key.replace(
        "_", "-"))
    if "action" in kwargs:  # a switch
        if not isinstance(value, bool):
            raise argparse.ArgumentTypeError(f"must be true or false, got {value!r}")
        return value
    if value is None and {**DEFAULTS, **RUN_DEFAULTS}[key] is None and key != "lr":
        return None  # --limit not given
    if "choices" in kwargs:
        if value not in kwargs["choices"]:
            raise argparse.ArgumentTypeError(f"invalid choice: {value!r} (choose from "
                                             f"{', '.join(map(repr, kwargs['choices']))})")
        return value
    if kwargs.get("nargs") == "+":
        if not (isinstance(value, list) and value):
            raise argparse.ArgumentTypeError(
                f"must be a non-empty list of integers, got {value!r}")
        return [kwargs["type"](str(v)) for v in value]
    return kwargs["type"](str(value))


def merge_resume_args(args: argparse.Namespace, ck: dict[str, Any], path: str) -> None:
    """Take the checkpoint's trajectory flags, checked as flags are; refuse ones given on the
    command line with another value."""
    saved = dict(ck["args"])
    missing = [key for key in TRAJECTORY_KEYS if key not in saved]
    if missing:
        raise CheckpointError(
            f"checkpoint {path} lacks its run's arguments (args has no {', '.join(missing)}): it "
            f"was not written by train.py, or it is damaged. Resume from another copy or start a "
            f"new run.")
    for key in TRAJECTORY_KEYS:
        try:
            saved[key] = _saved_value(key, saved[key])
        except argparse.ArgumentTypeError as e:
            raise CheckpointError(
                f"checkpoint {path}: field args.{key}: {e}. It was edited or damaged: resume "
                f"from another copy or start a new run.") from None
    explicit = set(getattr(args, "explicit", TRAJECTORY_KEYS))
    clashes = []
    for key in TRAJECTORY_KEYS:
        want = saved[key]
        if key in explicit and getattr(args, key) != want:
            clashes.append(f"--{key.replace('_', '-')} {getattr(args, key)} (checkpoint: {want})")
        setattr(args, key, want)
    if clashes:
        what = "another architecture" if any(c.startswith("--hidden") for c in clashes) \
            else "other settings"
        raise CheckpointError(
            f"checkpoint {path} is from a run with {what}: {'; '.join(clashes)}. --resume "
            f"continues the same run, with the checkpoint's flags; start a new run to change them."
        )


def flag_values(args: argparse.Namespace) -> dict[str, Any]:
    """The flags of a run as config.json and the checkpoint keep them: every parsed value,
    without the parser's bookkeeping of which were given explicitly."""
    return {k: v for k, v in vars(args).items() if k != "explicit"}


def write_config(path: str | os.PathLike[str], args: argparse.Namespace, **resolved: Any) -> None:
    """config.json: the flags, and under ``"resolved"`` what they resolved to (``resolved``,
    then the torch version)."""
    config = {**flag_values(args),
              "resolved": {**resolved, "torch": str(torch.__version__)}}
    atomic_write(Path(path), lambda tmp: tmp.write_text(json.dumps(config, indent=2) + "\n"))
