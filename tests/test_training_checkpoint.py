"""torch_mlp.training.checkpoint and the shared atomic_write; metrics.csv and verify.png."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

from torch_mlp.data import atomic_write
from torch_mlp.training import checkpoint as CK
from torch_mlp.training.errors import CheckpointError
from torch_mlp.training.metrics import METRIC_FIELDS, write_metrics_csv
from torch_mlp.training.plots import verified_parameters, write_verify


def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path: Path) -> None:
    path = tmp_path / "f.txt"
    atomic_write(path, lambda tmp: tmp.write_text("old"))
    assert path.read_text() == "old" and (path.stat().st_mode & 0o777) == 0o644

    def half(tmp: Path) -> None:
        tmp.write_text("ne")
        raise KeyboardInterrupt  # Ctrl-C in the middle of the write

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, half)
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]  # no temporary left


def _checkpoint() -> dict:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    return CK.make_checkpoint(epoch=1, step=5, sizes=[3, 2], model=model, optimizer=opt,
                              scheduler=None, scaler=None, shuffle=torch.Generator(),
                              device=torch.device("cpu"), args={"lr": 0.1}, history=[])


def test_save_load_restore_round_trip(tmp_path: Path) -> None:
    ck = _checkpoint()
    CK.save_checkpoint(tmp_path / "c.pt", ck)
    back = CK.load_checkpoint(tmp_path / "c.pt")
    assert back["format"] == CK.CHECKPOINT_FORMAT and back["step"] == 5
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    shuffle = torch.Generator().manual_seed(123)
    torch.manual_seed(7)
    CK.restore(back, "c.pt", model=model, optimizer=opt, scheduler=None, scaler=None,
               shuffle=shuffle, device=torch.device("cpu"))
    assert torch.equal(model.weight, ck["model"]["weight"])
    assert torch.equal(torch.get_rng_state(), ck["rng"]["torch"])
    assert torch.equal(shuffle.get_state(), ck["rng"]["shuffle"])
    with pytest.raises(CheckpointError, match=r"checkpoint c\.pt does not fit this run's "
                       r"model/optimizer \(RuntimeError: Error\(s\) in loading"):
        CK.restore(back, "c.pt", model=torch.nn.Linear(4, 2), optimizer=opt, scheduler=None,
                   scaler=None, shuffle=shuffle, device=torch.device("cpu"))


def test_load_refuses_another_format_and_missing_keys(tmp_path: Path) -> None:
    ck = _checkpoint()
    torch.save({**ck, "format": "other/1"}, tmp_path / "a.pt")
    with pytest.raises(CheckpointError, match=r"a\.pt is not a train\.py checkpoint \(format "
                       r"'torch_mlp\.train/1' expected\)"):
        CK.load_checkpoint(tmp_path / "a.pt")
    del ck["rng"], ck["step"]
    torch.save(ck, tmp_path / "b.pt")
    with pytest.raises(CheckpointError, match=r"b\.pt is incomplete: no rng, step"):
        CK.load_checkpoint(tmp_path / "b.pt")
    with pytest.raises(CheckpointError, match=r"c\.pt: no such file"):
        CK.load_checkpoint(tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match=f"^checkpoint {tmp_path}: is a directory, not a "
                       f"checkpoint file"):
        CK.load_checkpoint(tmp_path)


def _history() -> list[dict]:
    rows = []
    for epoch in (1, 2, 3):
        row = {"epoch": epoch, "train_loss": 1.0 / epoch}
        if epoch != 2:  # epoch 2 had no check (e.g. --verify-every larger than an epoch)
            row.update({"verify_ours_err_w": 1e-7 * epoch, "verify_native_err_w": 2e-7,
                        "verify_ours_err_b": 0.0, "verify_native_err_b": 0.0})
        rows.append(row)
    return rows


def test_metrics_csv_has_the_verify_columns(tmp_path: Path) -> None:
    write_metrics_csv(tmp_path / "m.csv", _history())
    with open(tmp_path / "m.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == [*METRIC_FIELDS, "verify_ours_err_w", "verify_native_err_w",
                             "verify_ours_err_b", "verify_native_err_b"]
    assert float(rows[2]["verify_ours_err_w"]) == pytest.approx(3e-7)
    assert rows[1]["verify_ours_err_w"] == ""  # no check: an empty cell, not a zero


def test_verify_png(tmp_path: Path) -> None:
    from PIL import Image

    assert verified_parameters(_history()) == ["w", "b"]
    write_verify(tmp_path / "verify.png", _history())  # zeros (exact) leave gaps on a log axis
    with Image.open(tmp_path / "verify.png") as im:
        im.verify()
        assert im.format == "PNG" and im.size[0] > 100
    with pytest.raises(ValueError, match="write_verify: history has no verify_ours_err_"):
        write_verify(tmp_path / "none.png", [{"epoch": 1, "train_loss": math.nan}])
    assert not (tmp_path / "none.png").exists()


@pytest.mark.parametrize(("field", "value", "message"), [
    ("epoch", "x", "field epoch: must be an integer >= 0, got 'x'"),
    ("epoch", -1, "field epoch: must be an integer >= 0, got -1"),
    ("epoch", True, "field epoch: must be an integer >= 0, got True"),
    ("step", 1.5, "field step: must be an integer >= 0, got 1.5"),
    ("sizes", [3, 0], r"field sizes: must be a list of 2 or more positive integers, got \[3, 0\]"),
    ("sizes", "3-2", "field sizes: must be a list of 2 or more positive integers, got '3-2'"),
    ("model", [], "field model: must be a dict, got list"),
    ("optimizer", None, "field optimizer: must be a dict, got NoneType"),
    ("args", None, "field args: must be a dict, got NoneType"),
    ("history", {}, "field history: must be a list of dicts, got dict"),
    ("rng", {"torch": torch.get_rng_state()},
     "field rng.shuffle: must be a uint8 tensor .*, got NoneType"),
], ids=lambda v: repr(v)[:20])
def test_load_refuses_fields_of_the_wrong_type(field: str, value: object, message: str,
                                               tmp_path: Path) -> None:
    ck = _checkpoint()
    ck[field] = value
    torch.save(ck, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match=f"^checkpoint {tmp_path / 'c.pt'}: {message}"):
        CK.load_checkpoint(tmp_path / "c.pt")
