"""Shared test set-up: every test starts from the same RNG state."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_rng() -> None:
    # Every test is reproducible on its own, whatever ran before it.
    torch.manual_seed(0)
