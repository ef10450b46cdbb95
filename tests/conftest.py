"""Shared test set-up: every test starts from the same RNG state; MNIST unpacked once."""

from pathlib import Path

import pytest
import torch
from mnist_fixture import mnist_root

from torch_mlp.data import MNISTTensors, load_mnist


@pytest.fixture(autouse=True)
def _seed_rng() -> None:
    # Every test is reproducible on its own, whatever ran before it.
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return mnist_root(tmp_path_factory)


@pytest.fixture(scope="session")
def mnist(data_dir: Path) -> MNISTTensors:
    return load_mnist(data_dir)
