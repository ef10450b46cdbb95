"""The trainer's command line: the defaults, the parser built from them (each ``(default: …)``
in ``--help`` is the parser's), and the flags a resume takes from its checkpoint."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

N_TRAIN = 60000  # MNIST's training set: the most --batch-size and --limit can use
# Chosen by tools/sweep_defaults.py (docs/training.md, "How the defaults were chosen"): the
# cheapest configuration whose 3 seeds all reached 98.78%. Change them here only.
DEFAULTS: dict[str, Any] = {
    "hidden": [1024], "epochs": 13, "batch_size": 256, "optimizer": "sgd", "momentum": 0.9,
    "nesterov": True, "schedule": "onecycle", "l2": 2e-4, "label_smoothing": 0.1, "seed": 0,
}
LR_DEFAULTS: dict[str, float] = {"sgd": 0.4, "adam": 1e-3}  # --lr's depends on --optimizer
# The other flags: how a run is carried out, not what it trains (except native and limit).
RUN_DEFAULTS: dict[str, Any] = {
    "lr": None, "native": False, "limit": None, "device": "auto", "data_dir": "data",
    "out": None, "resume": None, "evaluate": None, "verify_every": None, "compile": False,
    "amp": False, "threads": 0, "quiet": False,
}
# What "(default: …)" says where the default is resolved later (None in the parser).
DEFAULT_TEXT: dict[str, str] = {
    "lr": ", ".join(f"{v} for {k}" for k, v in LR_DEFAULTS.items()),
    "limit": f"all {N_TRAIN}",
    "out": "runs/<date-time>-<pid>, or the --resume checkpoint's directory",
    "resume": "start a new run",
    "evaluate": "train",
    "verify_every": "once per epoch, at its first step",
}
# Flags that change what is trained: a resume takes them from the checkpoint, and refuses one
# given on the command line with another value.
TRAJECTORY_KEYS = ("hidden", "epochs", "batch_size", "lr", "momentum", "nesterov", "optimizer",
                   "schedule", "l2", "label_smoothing", "seed", "limit", "native", "amp")
# Flags of how the run goes, not what it trains: a resume takes them from the checkpoint unless
# given (other threads or compile round differently; another --verify-every checks otherwise).
CARRIED_KEYS = ("threads", "compile", "verify_every")
EVALUATE_FLAGS = ("evaluate", "data_dir", "out", "threads", "quiet")  # the rest: not with it
FLOAT_MAX = 1e6  # an --lr or --l2 above overflows float32 in a few steps: a typo, not a setting


class TrainingError(RuntimeError):
    """A run refused or stopped for a reason its one-line message explains."""


def _number(kind: type, lo: float, hi: float = 2**31 - 1, *, open_lo: bool = False,
            open_hi: bool = False) -> Callable[[str], Any]:
    """An argparse type: an int or a float in the interval [lo, hi], or (lo, hi), ..."""

    def parse(s: str) -> Any:
        try:
            v = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {kind.__name__} value: {s!r}") from None
        if not ((lo < v if open_lo else lo <= v) and (v < hi if open_hi else v <= hi)):  # NaN too
            interval = f"{'(' if open_lo else '['}{lo}, {hi}{')' if open_hi else ']'}"
            raise argparse.ArgumentTypeError(f"must be in {interval}, got {s}")
        return v

    return parse


def _path(s: str) -> str:
    if not s:  # Path("") is the current directory: an empty value is an unset variable
        raise argparse.ArgumentTypeError("must not be empty")
    return s


def _device(s: str) -> str:
    if s in ("auto", "cpu", "cuda", "mps") or (s.startswith("cuda:") and s[5:].isdigit()):
        return s
    raise argparse.ArgumentTypeError(
        f"invalid choice: {s!r} (choose from 'auto', 'cpu', 'cuda', 'cuda:N', 'mps')")


def format_default(value: Any) -> str:
    """How ``--help`` writes a default: lists space-separated, booleans on/off."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


# (flag, add_argument keywords, help without the default); the default comes from the tables.
_MODEL_FLAGS: list[tuple[str, dict[str, Any], str]] = [
    ("--hidden", {"type": _number(int, 1), "nargs": "+", "metavar": "H"},
     "hidden layer sizes, one or more"),
    ("--epochs", {"type": _number(int, 1)}, "number of epochs"),
    ("--batch-size", {"type": _number(int, 1, N_TRAIN)},
     "global batch size; under DDP split over the processes"),
    ("--optimizer", {"choices": ("sgd", "adam")}, "optimizer"),
    ("--lr", {"type": _number(float, 0, FLOAT_MAX, open_lo=True)},
     "learning rate; the peak one with --schedule onecycle"),
    ("--momentum", {"type": _number(float, 0, 1, open_hi=True)}, "SGD momentum; Adam's beta1"),
    ("--nesterov", {"action": argparse.BooleanOptionalAction}, "Nesterov momentum for SGD"),
    ("--schedule", {"choices": ("onecycle", "cosine", "none")},
     "learning-rate schedule, stepped every batch: onecycle (30%% warm-up to --lr, then cosine "
     "down), cosine (from --lr to 0) or none"),
    ("--l2", {"type": _number(float, 0, FLOAT_MAX)},
     "the derivation's lambda: adds ½·λ·ΣW² over the weight matrices (not biases) to the loss, "
     "through l2_penalty, not the optimizer's weight_decay"),
    ("--label-smoothing", {"type": _number(float, 0, 1)}, "label smoothing of the cross-entropy"),
    ("--seed", {"type": _number(int, 0, 2**64 - 1)}, "seed of the initialisation and shuffling"),
    ("--native", {"action": "store_true"},
     "train the same network with torch.nn modules, native autograd and F.cross_entropy "
     "instead of torch_mlp; --verify-every is off then (native is the reference)"),
    ("--limit", {"type": _number(int, 1, N_TRAIN), "metavar": "N"},
     "train on the first N training images only, for a fast smoke run; the test set stays whole"),
]
_RUN_FLAGS: list[tuple[str, dict[str, Any], str]] = [
    ("--device", {"type": _device}, "auto, cpu, cuda[:N] or mps; auto takes cuda, mps, then cpu"),
    ("--data-dir", {"type": _path},
     "MNIST root: files in <data-dir>/MNIST/raw, unpacked there from the bundled copy"),
    ("--out", {"type": _path, "metavar": "DIR"},
     "run directory, new or empty, for metrics.csv, curves.png, weights.png, verify.png, "
     "config.json and checkpoint.pt; locked while the run lasts"),
    ("--resume", {"type": _path, "metavar": "CHECKPOINT"},
     "continue the run saved in this checkpoint.pt, with the flags it was started with"),
    ("--evaluate", {"type": _path, "metavar": "CHECKPOINT"},
     "train nothing: evaluate this checkpoint on the test set, and write evaluation.json, "
     "confusion.png and mistakes.png next to it"),
    ("--verify-every", {"type": _number(int, 0), "metavar": "N"},
     "every N steps, compare the step's loss and gradients with native autograd's and "
     "float64's (torch_mlp.verify), and stop if they differ; 0 turns it off"),
    ("--compile", {"action": "store_true"}, "torch.compile the forward and loss"),
    ("--amp", {"action": "store_true"},
     "mixed precision with torch.autocast: bfloat16 on cpu, float16 with a GradScaler on cuda"),
    ("--threads", {"type": _number(int, 0, os.cpu_count() or 1)},
     "CPU threads for torch (torch.set_num_threads), at most this machine's CPUs; 0 keeps "
     "torch's choice. On a CPU shared with other jobs, fewer threads can be much faster"),
    ("--quiet", {"action": "store_true"}, "print nothing but errors"),
]


def build_parser(with_defaults: bool = True) -> argparse.ArgumentParser:
    """The parser; ``with_defaults=False`` leaves out every default, so that parsing tells
    which flags were given (what a resume must check against its checkpoint)."""
    p = argparse.ArgumentParser(description="Train an MLP on MNIST with torch_mlp's "
                                "hand-derived backward passes, checked against native autograd "
                                "while it trains.")
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
        name = "cuda" if torch.cuda.is_available() else \
            "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda":
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device(name)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and check the command line (errors exit with status 2, as argparse's); resolve
    --lr and --out, and list in ``explicit`` the flags given."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.explicit = sorted(vars(build_parser(with_defaults=False).parse_args(argv)))
    extra = [f"--{k.replace('_', '-')}" for k in args.explicit if k not in EVALUATE_FLAGS]
    if args.evaluate is not None and extra:  # what it evaluates is the checkpoint's, as saved
        parser.error(f"--evaluate takes no training flags: {' '.join(extra)}")
    kind = args.device.split(":")[0]
    if (kind == "cuda" and not torch.cuda.is_available()) or \
            (kind == "mps" and not torch.backends.mps.is_available()):
        parser.error(f"--device {args.device}: {kind.upper()} is not available on this machine")
    if args.amp and resolve_device(args.device).type == "mps":
        parser.error("--amp supports cpu (bfloat16) and cuda (float16), not mps")
    if args.lr is None:
        args.lr = LR_DEFAULTS[args.optimizer]
    if args.out is None:
        given = args.resume or args.evaluate  # a run directory to continue, or to add to
        fresh = Path("runs", f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")  # unique
        args.out = str(Path(given).parent if given else fresh)
    return args


def merge_resume_args(args: argparse.Namespace, saved: dict[str, Any], path: str) -> None:
    """Take the checkpoint's flags that change what is trained (``saved``), and those of how it
    runs unless given; refuse a flag of the first kind given with another value."""
    clashes = [f"--{key.replace('_', '-')} {format_default(getattr(args, key))} (checkpoint: "
               f"{format_default(saved[key])})" for key in TRAJECTORY_KEYS
               if key in args.explicit and getattr(args, key) != saved[key]]
    if clashes:
        raise TrainingError(
            f"checkpoint {path} is from a run with other settings: {'; '.join(clashes)}. --resume "
            f"continues the same run, with the checkpoint's flags; start a new run to change them.")
    for key in TRAJECTORY_KEYS + tuple(k for k in CARRIED_KEYS if k not in args.explicit):
        setattr(args, key, saved[key])
