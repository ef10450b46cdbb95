"""torch_mlp.training.guards.LossWatch: the NaN/inf stop, checked a window at a time."""

from __future__ import annotations

import math

import pytest
import torch

from torch_mlp.training.distributed import Dist
from torch_mlp.training.errors import NonFiniteLossError
from torch_mlp.training.guards import LossWatch


def test_finite_losses_are_reported_once_per_window() -> None:
    watch = LossWatch(Dist(), 3, "advice")
    got = [watch.add(torch.tensor(float(i)), step=i, epoch=1, batch=i) for i in range(7)]
    assert got == [None, None, 2.0, None, None, 5.0, None]
    assert watch.add(torch.tensor(7.0), step=7, epoch=1, batch=7, last=True) == 7.0  # epoch end


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_names_the_first_non_finite_step_of_the_window(bad: float) -> None:
    watch = LossWatch(Dist(), 4, "training diverged; try a lower --lr.")
    # Steps 10..13 are batches 0..3 of epoch 2; the window holds all four, 11 and 12 are bad.
    losses = [1.0, bad, math.nan, 2.0]
    for i, v in enumerate(losses[:3]):
        assert watch.add(torch.tensor(v), step=10 + i, epoch=2, batch=i) is None
    with pytest.raises(NonFiniteLossError, match=rf"^loss is {bad} at step 11 \(epoch 2, batch "
                       r"1\): training diverged; try a lower --lr\.$"):
        watch.add(torch.tensor(losses[3]), step=13, epoch=2, batch=3)


def test_every_step_when_every_is_one() -> None:
    watch = LossWatch(Dist(), 1, "stop.")
    assert watch.add(torch.tensor(0.5), step=0, epoch=1, batch=0) == 0.5
    with pytest.raises(NonFiniteLossError, match=r"^loss is nan at step 1 \(epoch 1, batch 1\)"):
        watch.add(torch.tensor(math.nan), step=1, epoch=1, batch=1)
