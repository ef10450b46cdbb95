"""The exceptions a training run stops with; each message is one line that says what to do."""

from __future__ import annotations

__all__ = ["CheckpointError", "NonFiniteLossError", "TrainingError", "VerifyError"]


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
