"""The NaN/inf stop of a training loop, without a device sync every step.

:class:`LossWatch` collects each step's loss as a tensor and checks a window of them at once
(one sync; over all processes under DDP), naming the first step whose loss is not finite.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from .distributed import Dist
from .errors import NonFiniteLossError

__all__ = ["LossWatch"]


class LossWatch:
    """Checks the losses every ``every`` steps; ``advice`` ends the error's message."""

    def __init__(self, dd: Dist, every: int, advice: str) -> None:
        self.dd, self.every, self.advice = dd, every, advice
        self.window: list[Tensor] = []

    def add(self, loss: Tensor, step: int, epoch: int, batch: int, last: bool = False
            ) -> float | None:
        """Record the loss of ``step`` (``batch`` of ``epoch``). When the window is full, or
        at the ``last`` batch, check it: raise NonFiniteLossError naming the first non-finite
        step of any process, else return the window's last loss (None until then)."""
        self.window.append(loss.detach())
        if len(self.window) < self.every and not last:
            return None
        losses = torch.stack(self.window).float()
        self.window = []
        bad = self.dd.all_reduce((~torch.isfinite(losses)).float(), dist.ReduceOp.MAX)
        if bad.any():
            first = int(bad.argmax())
            back = len(losses) - 1 - first  # how many steps before this one
            raise NonFiniteLossError(
                f"loss is {losses[first].item()} at step {step - back} (epoch {epoch}, batch "
                f"{batch - back}): {self.advice}")
        return losses[-1].item()
