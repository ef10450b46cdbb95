"""MNIST unpacked once per test session, shared by test_data.py and test_train.py.

Set TORCH_MLP_TEST_DATA to an MNIST root (holding MNIST/raw/) to reuse one across sessions;
otherwise the bundled copy is unpacked into a session temporary folder (about a second).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from torch_mlp.data import prepare_mnist

_root: Path | None = None


def mnist_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    global _root
    if _root is None:
        env = os.environ.get("TORCH_MLP_TEST_DATA")
        root = Path(env) if env else tmp_path_factory.mktemp("mnist")
        prepare_mnist(root)
        _root = root
    return _root
