"""torch_mlp.training.messages, errors.run_cli, and the small run helpers of checkpoint,
config, metrics and plots that train.py calls."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

import torch_mlp.verify
from torch_mlp.training import checkpoint as CK
from torch_mlp.training import messages as M
from torch_mlp.training.config import write_config
from torch_mlp.training.errors import CheckpointError, NonFiniteLossError, run_cli
from torch_mlp.training.metrics import keep_max_verify_errors, run_result
from torch_mlp.training.plots import write_plots


def test_diverged_advice() -> None:
    assert M.diverged(False, None) == (
        "training diverged; try a lower --lr. Stopped; no checkpoint was written.")
    assert M.diverged(True, (Path("r/checkpoint.pt"), 3), "This epoch is not saved") == (
        "training diverged; start a new run with a lower --lr (--resume keeps the "
        "checkpoint's). This epoch is not saved; the last good checkpoint, r/checkpoint.pt "
        "(after epoch 3), is kept.")


def test_verify_one_line() -> None:
    rows = [SimpleNamespace(name="loss", abs=1e-9, rel=2e-9, tol=1e-6),
            SimpleNamespace(name="0.weight", abs=0.5, rel=0.01, tol=1e-5)]
    err = torch_mlp.verify.VerifyError("verify: the gradient of 0.weight differs.\nrow table",
                                       SimpleNamespace(rows=rows))  # type: ignore[arg-type]
    assert M.verify_one_line(err) == (
        "the gradient of 0.weight differs. All: loss: abs 1.00e-09 rel 2.00e-09 tol 1.00e-06; "
        "0.weight: abs 5.00e-01 rel 1.00e-02 tol 1.00e-05.")


def test_progress_bar_off_does_nothing() -> None:
    bar = M.progress_bar(False, 100, "epoch 1/1")
    assert isinstance(bar, M.NoBar)
    bar.set_postfix(loss="1.0", refresh=False)
    bar.update(10)
    bar.close()


def test_run_cli_one_line_and_status(capsys: pytest.CaptureFixture[str]) -> None:
    def fails() -> None:
        raise NonFiniteLossError("loss is nan at step 3")

    with pytest.raises(SystemExit) as exc:
        run_cli(fails)
    assert exc.value.code == 1
    assert capsys.readouterr().err == "train.py: error: loss is nan at step 3\n"

    def interrupted(checkpoint: str | None) -> Any:
        def main() -> None:
            e = KeyboardInterrupt()
            e.checkpoint = checkpoint  # type: ignore[attr-defined]
            raise e
        return main

    for ck, said in (("r/checkpoint.pt", "continue with --resume r/checkpoint.pt"),
                     (None, "no checkpoint was written yet, so start the run again")):
        with pytest.raises(SystemExit) as exc:
            run_cli(interrupted(ck))
        assert exc.value.code == 130
        assert capsys.readouterr().err == f"train.py: interrupted; {said}\n"

    def bug() -> None:
        raise ValueError("a bug")

    with pytest.raises(ValueError, match="a bug"):  # anything else keeps its traceback
        run_cli(bug)


def test_check_sizes_and_checkpoint_to_resume(tmp_path: Path) -> None:
    CK.check_sizes({"sizes": [784, 32, 10]}, "c.pt", [784, 32, 10])
    with pytest.raises(CheckpointError, match=r"^checkpoint c\.pt holds an MLP 784-32-10, this "
                       r"run builds 784-64-10: another architecture$"):
        CK.check_sizes({"sizes": [784, 32, 10]}, "c.pt", [784, 64, 10])
    assert CK.checkpoint_to_resume(None, None) is None
    assert CK.checkpoint_to_resume(str(tmp_path), "old/checkpoint.pt") == "old/checkpoint.pt"
    (tmp_path / "checkpoint.pt").write_bytes(b"")
    assert CK.checkpoint_to_resume(str(tmp_path), "old/checkpoint.pt") == \
        str(tmp_path / "checkpoint.pt")


def test_write_config(tmp_path: Path) -> None:
    args = argparse.Namespace(hidden=[32], lr=0.2, explicit=["lr"])
    write_config(tmp_path / "config.json", args, device="cpu", sizes=[784, 32, 10])
    config = json.loads((tmp_path / "config.json").read_text())
    assert config == {"hidden": [32], "lr": 0.2, "resolved": {
        "device": "cpu", "sizes": [784, 32, 10], "torch": str(torch.__version__)}}
    assert list(config["resolved"]) == ["device", "sizes", "torch"]


def test_keep_max_verify_errors_and_run_result() -> None:
    errors: dict[str, float] = {}
    loss = SimpleNamespace(name="loss", ours_err=9.0, native_err=9.0)
    keep_max_verify_errors(errors, [loss, SimpleNamespace(name="w", ours_err=2.0, native_err=1.0)])
    keep_max_verify_errors(errors, [loss, SimpleNamespace(name="w", ours_err=1.0, native_err=3.0)])
    assert errors == {"verify_ours_err_w": 2.0, "verify_native_err_w": 3.0}  # no loss columns
    history = [{"epoch": 1, "seconds": 3.0, "verify_seconds": 0.3},
               {"epoch": 2, "seconds": 1.0, "verify_seconds": 0.1, "test_acc": 0.9}]
    result = run_result(history, Path("r"), 5.0)
    assert result["epoch"] == 2 and result["test_acc"] == 0.9 and result["out"] == "r"
    assert result["history"] is history and result["wall_seconds"] == 5.0
    assert result["verify_overhead"] == pytest.approx(0.1)
    assert run_result([{"epoch": 0, "test_acc": 0.5}], "r", 1.0)["verify_overhead"] == 0.0


def test_write_plots(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    w = torch.randn(4, 784, generator=torch.Generator().manual_seed(0))
    history = [{"epoch": 1, "train_loss": 1.0, "test_loss": 1.1, "train_acc": 0.5,
                "test_acc": 0.4}]
    (tmp_path / "b").mkdir()
    assert write_plots(tmp_path / "b", history, w) is None
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["curves.png", "weights.png"]
    history[0].update({"verify_ours_err_w": 1e-7, "verify_native_err_w": 2e-7})
    assert write_plots(tmp_path / "b", history, w) is None
    assert (tmp_path / "b" / "verify.png").is_file()
