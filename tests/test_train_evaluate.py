"""--evaluate: evaluation.json (accuracy, per-class precision and recall, the confusion matrix),
confusion.png and mistakes.png of a finished run's checkpoint."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

import torch_mlp.training as T
from torch_mlp.data import MNISTTensors
from torch_mlp.training import rundir
from torch_mlp.training.config import TrainingError

TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_class_report_against_a_hand_computation() -> None:
    # 3 classes; true 0 0 0 1 1 2, predicted 0 0 1 1 0 0: class 2 is never predicted.
    y = torch.tensor([0, 0, 0, 1, 1, 2])
    logits = torch.nn.functional.one_hot(torch.tensor([0, 0, 1, 1, 0, 0]), 3).float()
    report = T.class_report(logits, y)
    assert report["confusion"] == [[2, 1, 0], [1, 1, 0], [1, 0, 0]]
    assert report["accuracy"] == 3 / 6
    # precision: of those predicted k, the share truly k; recall: of those truly k, found.
    assert report["precision"] == [2 / 4, 1 / 2, None]
    assert report["recall"] == [2 / 3, 1 / 2, 0.0]
    assert T.class_report(logits[:5], y[:5])["recall"] == [2 / 3, 1 / 2, None]  # no class 2


@pytest.fixture(scope="module")
def finished(data_dir: Path, mnist: MNISTTensors,
             tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("evaluate") / "run"
    return T.main(["--data-dir", str(data_dir), "--out", str(out), "--hidden", "32", "--limit",
                   "1000", "--batch-size", "100", "--epochs", "2", "--lr", "0.2", "--quiet",
                   "--threads", "1"], data=mnist)


def test_evaluation_json(finished: dict[str, Any], data_dir: Path, mnist: MNISTTensors) -> None:
    ck = Path(finished["out"]) / "checkpoint.pt"
    returned = T.main(["--evaluate", str(ck), "--data-dir", str(data_dir), "--quiet"],
                      data=mnist)
    report = json.loads((ck.parent / "evaluation.json").read_text())
    assert report == returned and report["epoch"] == 2
    c = torch.tensor(report["confusion"])
    assert c.sum(1).tolist() == TEST_COUNTS  # each row: every test image of that class
    assert report["accuracy"] == c.trace().item() / c.sum().item()
    assert report["accuracy"] == finished["test_acc"]  # what the run measured at its end
    for k in range(10):
        assert report["precision"][k] == pytest.approx(c[k, k].item() / c[:, k].sum().item())
        assert report["recall"][k] == pytest.approx(c[k, k].item() / c[k].sum().item())


def test_the_pictures(finished: dict[str, Any], data_dir: Path, mnist: MNISTTensors,
                      monkeypatch: pytest.MonkeyPatch) -> None:
    from matplotlib.axes import Axes
    from PIL import Image

    titles: list[str] = []
    real = Axes.set_title
    monkeypatch.setattr(Axes, "set_title", lambda ax, t, **k: (titles.append(t), real(ax, t, **k)))
    ck = Path(finished["out"]) / "checkpoint.pt"
    T.main(["--evaluate", str(ck), "--data-dir", str(data_dir), "--quiet"], data=mnist)
    for png in ("confusion.png", "mistakes.png"):
        with Image.open(ck.parent / png) as im:
            im.verify()
            assert im.format == "PNG" and im.size[0] > 300
    # mistakes.png: the 24 misclassified test digits the model was surest of, most sure first.
    model = T.build_model([32])
    model.load_state_dict(torch.load(ck, weights_only=True)["model"])
    sure, predicted = T.predict(model, mnist.x_test).softmax(-1).max(-1)
    wrong = (predicted != mnist.y_test).nonzero().flatten()
    worst = wrong[sure[wrong].argsort(descending=True)][:24]
    assert titles[0].startswith("confusion matrix: ")
    assert titles[1:] == [f"true {mnist.y_test[i]}, predicted {predicted[i]}\n"
                          f"({sure[i]:.0%} sure)" for i in worst]


def test_evaluate_refuses_in_one_line(finished: dict[str, Any], data_dir: Path,
                                      mnist: MNISTTensors, tmp_path: Path) -> None:
    ck = Path(finished["out"]) / "checkpoint.pt"
    with rundir.take(ck.parent, str(ck)), pytest.raises(  # a run still writing there
            TrainingError, match=f"is in use by pid {os.getpid()}"):
        T.main(["--evaluate", str(ck), "--data-dir", str(data_dir)], data=mnist)
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(TrainingError, match=r"bad\.pt is damaged"):
        T.main(["--evaluate", str(tmp_path / "bad.pt"), "--data-dir", str(data_dir)], data=mnist)
    with pytest.raises(SystemExit):
        T.main(["--evaluate", str(ck), "--resume", str(ck)])


@pytest.mark.parametrize("flags", [["--hidden", "999"], ["--epochs", "50", "--amp"],
                                   ["--native"], ["--compile"], ["--resume", "x.pt"]])
def test_evaluate_refuses_training_flags(flags: list[str], capsys: pytest.CaptureFixture[str]
                                         ) -> None:
    with pytest.raises(SystemExit) as exc:
        T.main(["--evaluate", "ck.pt", *flags])
    given = " ".join(sorted(f for f in flags if f.startswith("--")))
    assert exc.value.code == 2
    assert capsys.readouterr().err.endswith(f"error: --evaluate takes no training flags: "
                                            f"{given}\n")


def test_a_checkpoint_outside_a_run_directory_does_not_blame_out(
        finished: dict[str, Any], data_dir: Path, mnist: MNISTTensors, tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (models / "notes.txt").write_text("mine")
    (models / "mnist.pt").write_bytes((Path(finished["out"]) / "checkpoint.pt").read_bytes())
    with pytest.raises(TrainingError, match=f"^the checkpoint's folder {models} is not empty "
                       f"and is not a torch_mlp run directory: choose a new or empty directory "
                       f"with --out$"):
        T.main(["--evaluate", str(models / "mnist.pt"), "--data-dir", str(data_dir)], data=mnist)
    report = T.main(["--evaluate", str(models / "mnist.pt"), "--data-dir", str(data_dir),
                     "--out", str(tmp_path / "ev"), "--quiet"], data=mnist)
    assert (tmp_path / "ev" / "evaluation.json").is_file() and report["epoch"] >= 1
    assert sorted(p.name for p in models.iterdir()) == ["mnist.pt", "notes.txt"]
