"""The exceptions a training run stops with; each message is one line that says what to do.
:func:`run_cli` turns them into that one line on stderr when train.py runs as a command."""

from __future__ import annotations

import sys
from collections.abc import Callable

__all__ = ["CheckpointError", "NonFiniteLossError", "TrainingError", "VerifyError", "run_cli"]


class TrainingError(RuntimeError):
    """A run stopped for a reason the message explains (base of the errors below)."""


class NonFiniteLossError(TrainingError):
    """The loss became NaN or inf; the message names the step."""


class VerifyError(TrainingError):
    """The hand-derived loss value or gradients differ from native autograd's beyond tolerance;
    ``.report`` is :class:`torch_mlp.verify.Report` with every number."""

    def __init__(self, message: str, report: object = None) -> None:
        super().__init__(message)
        self.report = report


class CheckpointError(TrainingError):
    """A checkpoint cannot be read, or is not one this run can continue."""


def run_cli(main: Callable[[], object], prog: str = "train.py") -> None:
    """Call ``main()`` as a command: a TrainingError or MNISTIntegrityError is one ``prog:
    error:`` line and exit status 1; Ctrl-C says what to resume from (the interrupt's
    ``checkpoint`` attribute) and exits with 130."""
    from ..data import MNISTIntegrityError

    try:
        main()
    except (TrainingError, MNISTIntegrityError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as err:
        ck_path = getattr(err, "checkpoint", None)
        print(f"{prog}: interrupted; " + (f"continue with --resume {ck_path}" if ck_path else
              "no checkpoint was written yet, so start the run again"), file=sys.stderr)
        sys.exit(130)
