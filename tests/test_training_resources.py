"""torch_mlp.training.resources: the checks a run passes before it trains (memory, run
directory, data, steps per epoch, --amp) and --threads."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest
import torch

from torch_mlp.data import MNISTTensors
from torch_mlp.training import resources as R
from torch_mlp.training.distributed import Dist
from torch_mlp.training.errors import TrainingError


def _args(**kw: Any) -> argparse.Namespace:
    base = {"hidden": [32], "batch_size": 100, "optimizer": "sgd", "momentum": 0.9,
            "out": None, "resume": None, "data_dir": "data", "quiet": True, "limit": None}
    return argparse.Namespace(**{**base, **kw})


def test_memory_needed_counts_parameters_state_and_activations() -> None:
    # 784-32-10: 785·32 + 33·10 = 25450 parameters; x(weights, grads, momentum) + 3·100·826.
    assert R.memory_needed([784, 32, 10], 100, 1) == 4 * (25450 * 3 + 3 * 100 * 826)
    assert R.memory_needed([784, 32, 10], 100, 2) - R.memory_needed([784, 32, 10], 100, 1) \
        == 4 * 25450


def test_check_memory_refuses_a_model_that_cannot_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(R, "memory_available", lambda device: 2**30)
    args = _args(hidden=[16384, 16384])
    with pytest.raises(TrainingError, match=r"^--hidden 16384 16384: the model needs at least "
                       r"[\d.]+ GiB \(parameters, gradients, optimizer state, activations\), "
                       r"and cpu has 1\.0 GiB available$"):
        R.check_memory(args, torch.device("cpu"), [784, 16384, 16384, 10], 2000)
    R.check_memory(_args(), torch.device("cpu"), [784, 32, 10], 2000)  # small: fits
    monkeypatch.setattr(R, "memory_available", lambda device: None)  # unknown: no refusal
    R.check_memory(args, torch.device("cpu"), [784, 16384, 16384, 10], 2000)


def test_memory_available_on_this_machine() -> None:
    free = R.memory_available(torch.device("cpu"))
    assert free is None or free > 0


def test_check_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    args = _args()
    out = R.check_out(args, Dist())
    assert out.parent == Path("runs") and args.out == str(out) and not out.exists()
    (tmp_path / "old").mkdir()
    torch.save({}, tmp_path / "old" / "checkpoint.pt")
    with pytest.raises(TrainingError, match=r"old already holds a checkpoint\.pt of another "
                       r"run: continue it with --resume .*, or choose another --out"):
        R.check_out(_args(out=str(tmp_path / "old")), Dist())
    # Its own checkpoint (--resume) is no clash, and the run directory defaults to its folder.
    resumed = _args(resume=str(tmp_path / "old" / "checkpoint.pt"))
    assert R.check_out(resumed, Dist()) == tmp_path / "old"
    # Only rank 0 writes, so only rank 0 checks.
    R.check_out(_args(out=str(tmp_path / "old")), Dist(rank=1, world_size=2))
    (tmp_path / "file").write_text("x")
    with pytest.raises(TrainingError, match=r"--out .*file: exists and is not a directory"):
        R.check_out(_args(out=str(tmp_path / "file")), Dist())


def _tensors(n: int) -> MNISTTensors:
    g = torch.Generator().manual_seed(0)
    return MNISTTensors(torch.randn(n, 784, generator=g), torch.arange(n) % 10,
                        torch.randn(7, 784, generator=g), torch.arange(7) % 10)


def test_load_data_applies_limit_then_creates_the_run_directory(tmp_path: Path) -> None:
    data = _tensors(50)
    got = R.load_data(_args(limit=20), Dist(), torch.device("cpu"), tmp_path / "a" / "run", data)
    assert torch.equal(got.x_train, data.x_train[:20]) and len(got.y_test) == 7
    assert (tmp_path / "a" / "run").is_dir()
    R.load_data(_args(), Dist(rank=1, world_size=2), torch.device("cpu"), tmp_path / "b", data)
    assert not (tmp_path / "b").exists()  # rank 0 creates it


def test_load_data_error_names_the_flag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def unreadable(*_: Any, **__: Any) -> None:
        raise PermissionError("permission denied: x")

    monkeypatch.setattr(R, "prepare_mnist", unreadable)
    with pytest.raises(TrainingError, match=r"^--data-dir d: cannot read MNIST there "
                       r"\(PermissionError: permission denied: x\)$"):
        R.load_data(_args(data_dir="d"), Dist(), torch.device("cpu"), tmp_path / "run", None)
    assert not (tmp_path / "run").exists()


def test_steps_per_epoch() -> None:
    assert R.steps_per_epoch(_args(), Dist(), 1000) == 10
    assert R.steps_per_epoch(_args(), Dist(), 1001) == 11  # the last batch is smaller
    assert R.steps_per_epoch(_args(batch_size=4), Dist(world_size=2), 9) == 2  # 8 of 9 used
    with pytest.raises(TrainingError, match=r"^--batch-size 3 must be divisible by the number "
                       r"of processes \(2\)$"):
        R.steps_per_epoch(_args(batch_size=3), Dist(world_size=2), 100)
    with pytest.raises(TrainingError, match=r"^--limit 1: 1 training image\(s\) give no step "
                       r"over 2 processes .*use --limit >= 2$"):
        R.steps_per_epoch(_args(batch_size=2, limit=1), Dist(world_size=2), 1)


def test_amp_dtype() -> None:
    assert R.amp_dtype(False, torch.device("mps")) is None
    assert R.amp_dtype(True, torch.device("cpu")) == torch.bfloat16
    assert R.amp_dtype(True, torch.device("cuda")) == torch.float16
    with pytest.raises(TrainingError, match=r"^--amp supports cpu and cuda, not mps$"):
        R.amp_dtype(True, torch.device("mps"))


def test_num_threads_is_restored() -> None:
    before = torch.get_num_threads()
    with R.num_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(KeyError), R.num_threads(1):
        raise KeyError("x")  # restored whatever happens
    assert torch.get_num_threads() == before
    with R.num_threads(0):  # 0: torch's choice, untouched
        assert torch.get_num_threads() == before
