"""The trainer under torchrun (2 processes, gloo): a refusal decided on rank 0 ends every process
cleanly, and a resume is exact or refused when the world size changes. Each test starts
torchrun and its processes (tens of seconds on 2 cores): marked slow."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ddp_worker import free_port

import torch_mlp.training as T
from torch_mlp.training import rundir

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
FLAGS = ["--hidden", "16", "--batch-size", "100", "--epochs", "2", "--quiet", "--lr", "0.2"]


def _torchrun(args: list[str], cwd: Path) -> tuple[int, list[str]]:
    """torchrun --nproc_per_node=2 train.py ``args``: its status and each process's stderr."""
    logs = cwd / "logs"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", "--log-dir", str(logs),
           "--redirects", "3", str(ROOT / "train.py"), *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    errs = [next(logs.glob(f"**/attempt_0/{rank}/stderr.log")).read_text() for rank in (0, 1)]
    return proc.returncode, errs


def test_a_refusal_on_rank_0_ends_every_process_in_one_line(data_dir: Path,
                                                            tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("not a run")
    rc, (err0, err1) = _torchrun(["--data-dir", str(data_dir), "--out", "mine", *FLAGS],
                                 tmp_path)
    assert rc != 0
    assert err0 == ("train.py: error: --out mine is not empty and is not a torch_mlp run "
                    "directory: choose a new or empty directory with --out\n"), err0
    assert err1 == "", err1  # no gloo traceback: rank 1 was told, and left quietly


def _interrupted_single_process_run(data_dir: Path, out: Path, limit: str,
                                    monkeypatch: pytest.MonkeyPatch) -> Path:
    real = rundir.save_checkpoint

    def save(*args: object) -> None:
        real(*args)
        raise KeyboardInterrupt  # Ctrl-C right after epoch 1's checkpoint

    with monkeypatch.context() as m:
        m.setattr(rundir, "save_checkpoint", save)
        with pytest.raises(KeyboardInterrupt):
            T.main(["--data-dir", str(data_dir), "--out", str(out), "--limit", limit, *FLAGS,
                    "--threads", "1"])
    return out / "checkpoint.pt"


def test_resume_over_another_world_size_is_refused_when_the_epoch_would_change(
        data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # 1001 images: one process takes them all in 11 steps, two would take 1000 in 10.
    ck = _interrupted_single_process_run(data_dir, tmp_path / "run", "1001", monkeypatch)
    rc, (err0, err1) = _torchrun(["--resume", str(ck), "--data-dir", str(data_dir)], tmp_path)
    assert rc != 0 and err1 == "", err1
    assert err0 == (f"train.py: error: --resume {ck}: over 2 process(es) an epoch would take "
                    f"1000 images, its run took 1001 over 1: resume it over 1 process(es), so "
                    f"that its schedule stays the same\n"), err0
    assert torch.load(ck, weights_only=True)["epoch"] == 1


def test_resume_over_another_world_size_that_keeps_the_epoch_is_exact(
        data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # 1000 images: the same global batches over 1 or 2 processes, so a resume under DDP ends
    # where the uninterrupted single-process run ends, up to float rounding.
    T.main(["--data-dir", str(data_dir), "--out", str(tmp_path / "straight"), "--limit", "1000",
            *FLAGS, "--threads", "1"])
    ck = _interrupted_single_process_run(data_dir, tmp_path / "run", "1000", monkeypatch)
    rc, (err0, _) = _torchrun(["--resume", str(ck), "--data-dir", str(data_dir)], tmp_path)
    assert rc == 0, err0
    a, b = (torch.load(p, weights_only=True) for p in (tmp_path / "straight" / "checkpoint.pt",
                                                        ck))
    assert a["epoch"] == b["epoch"] == 2 and b["world_size"] == 2
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-4, atol=1e-6)


def test_evaluate_under_torchrun_is_one_evaluation_by_rank_0(data_dir: Path,
                                                            tmp_path: Path) -> None:
    out = tmp_path / "run"
    T.main(["--data-dir", str(data_dir), "--out", str(out), "--limit", "200", *FLAGS,
            "--epochs", "1", "--threads", "1"])
    rc, (err0, err1) = _torchrun(["--evaluate", str(out / "checkpoint.pt"), "--data-dir",
                                  str(data_dir), "--quiet"], tmp_path)
    assert rc == 0 and err0 == "" and err1 == "", (err0, err1)
    assert {"evaluation.json", "confusion.png", "mistakes.png"} <= {p.name for p in out.iterdir()}
