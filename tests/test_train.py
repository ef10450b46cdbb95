"""The trainer end to end (python -m torch_mlp.train, train.py): smoke runs on a --limit subset,
outputs, resume, --verify-every, divergence, user errors, DDP."""

from __future__ import annotations

import csv
import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from ddp_worker import free_port

import torch_mlp.training as T
from torch_mlp.data import MNISTTensors
from torch_mlp.functions import L2PenaltyFunction, SoftmaxCrossEntropyFunction
from torch_mlp.training import rundir
from torch_mlp.training.config import TrainingError

ROOT = Path(__file__).resolve().parents[1]
# Small and fast: 1000 training images, 10 steps of 100 per epoch, hidden 32, one thread (the
# CPU may be shared; one thread is the most predictable there). --lr 0.2: the default (0.4) is
# tuned for 13 epochs of batch 256 on the full set; over these few small steps it overshoots.
FAST = ["--hidden", "32", "--limit", "1000", "--batch-size", "100", "--epochs", "2", "--quiet",
        "--threads", "1", "--lr", "0.2"]
OUTPUTS = [".torch_mlp.lock", "checkpoint.pt", "config.json", "curves.png", "metrics.csv",
           "verify.png", "weights.png"]


@pytest.fixture
def run(data_dir: Path, mnist: MNISTTensors, tmp_path: Path):
    """run(*flags, out="run") -> main()'s result, with FAST settings, --out in tmp_path and
    MNIST loaded once per session (load=True: main() loads it itself, as from the CLI)."""

    def _run(*flags: str, out: str = "run", load: bool = False) -> dict[str, Any]:
        argv = ["--data-dir", str(data_dir), "--out", str(tmp_path / out), *FAST, *flags]
        return T.main(argv, data=None if load else mnist)

    return _run


def _interrupt_after_saving(monkeypatch: pytest.MonkeyPatch, epoch: int) -> None:
    """Ctrl-C right after epoch ``epoch``'s checkpoint is written."""
    real = rundir.save_checkpoint

    def save(path: Path, checkpoint: dict[str, Any], kept: str) -> None:
        real(path, checkpoint, kept)
        if checkpoint["epoch"] == epoch:
            raise KeyboardInterrupt

    monkeypatch.setattr(rundir, "save_checkpoint", save)


def _load(path: Path) -> dict[str, Any]:
    return torch.load(path, weights_only=True)


def _metrics(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_smoke_run_learns_and_writes_every_output(run, tmp_path: Path) -> None:
    from PIL import Image

    result = run("--epochs", "3", "--limit", "2000", load=True)
    out = tmp_path / "run"
    hist = result["history"]
    assert [h["epoch"] for h in hist] == [1, 2, 3]
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]  # the loss falls
    assert hist[-1]["test_loss"] < hist[0]["test_loss"]
    assert result["test_acc"] > 0.7  # chance is 0.1
    # --verify-every's default: once per epoch, well within tolerance.
    assert all(h["verify_checks"] == 1 and 0 < h["verify_tolerance_used"] < 1 for h in hist)
    rows = _metrics(out / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert all(v != "" for r in rows for v in r.values())  # every cell filled
    assert float(rows[-1]["test_acc"]) == pytest.approx(result["test_acc"])
    # Per parameter, ours' and native's error against float64 (max over the epoch's checks).
    for p in ("0.weight", "0.bias", "2.weight", "2.bias"):
        for r, h in zip(rows, hist):
            ours, native = float(r[f"verify_ours_err_{p}"]), float(r[f"verify_native_err_{p}"])
            assert 0 <= ours < 1e-3 and 0 <= native < 1e-3 and ours == h[f"verify_ours_err_{p}"]
    assert float(rows[0]["verify_ours_err_0.weight"]) > 0  # float32 rounds
    for png in ("curves.png", "weights.png", "verify.png"):
        with Image.open(out / png) as im:
            im.verify()
            assert im.format == "PNG" and im.size[0] > 100
    config = json.loads((out / "config.json").read_text())
    assert config["hidden"] == [32] and config["resolved"]["steps_per_epoch"] == 20
    ck = _load(out / "checkpoint.pt")  # weights_only=True: tensors and plain containers only
    assert ck["epoch"] == 3 and set(ck["model"]) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert sorted(p.name for p in out.iterdir()) == OUTPUTS


def test_native_run_follows_the_custom_run(run) -> None:
    # Same seed, same initial values (torch_mlp's init is nn.Linear's), same batches.
    torch.manual_seed(0)
    custom = T.build_model([32])
    torch.manual_seed(0)
    native = T.build_model([32], native=True)
    assert all(type(m).__module__.startswith("torch.nn") for m in native)
    for a, b in zip(custom.state_dict().values(), native.state_dict().values()):
        assert torch.equal(a, b)
    ours, theirs = run(out="custom"), run("--native", out="native")
    assert theirs["verify_checks"] == 0  # nothing to verify: native is the reference
    assert not (Path(theirs["out"]) / "verify.png").exists()  # nothing to show
    assert (Path(ours["out"]) / "verify.png").exists()
    for h1, h2 in zip(ours["history"], theirs["history"]):
        assert h1["train_loss"] == pytest.approx(h2["train_loss"], rel=1e-4)
        assert abs(h1["test_acc"] - h2["test_acc"]) <= 0.002


def test_resume_is_bit_identical(run, data_dir: Path, mnist: MNISTTensors, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    run("--verify-every", "3", out="straight")
    with monkeypatch.context() as m:
        _interrupt_after_saving(m, epoch=1)
        with pytest.raises(KeyboardInterrupt):
            run("--verify-every", "3", out="resumed")
    ck_path = tmp_path / "resumed" / "checkpoint.pt"
    assert _load(ck_path)["epoch"] == 1
    # Resumed with the checkpoint alone, as the Ctrl-C message says: its flags come from the
    # checkpoint, --threads 1 and --verify-every 3 included, whatever this process was set to.
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        T.main(["--resume", str(ck_path), "--data-dir", str(data_dir), "--quiet"], data=mnist)
    finally:
        torch.set_num_threads(threads)
    a, b = _load(tmp_path / "straight" / "checkpoint.pt"), _load(ck_path)
    assert a["epoch"] == b["epoch"] == 2 and a["step"] == b["step"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k, st in a["optimizer"]["state"].items():
        assert torch.equal(st["momentum_buffer"], b["optimizer"]["state"][k]["momentum_buffer"])
    assert a["scheduler"] == b["scheduler"]
    assert torch.equal(a["shuffle"], b["shuffle"])
    timing = ("seconds", "train_seconds", "samples_per_s", "verify_seconds")
    rows = [[{k: v for k, v in r.items() if k not in timing} for r in _metrics(p)]
            for p in (tmp_path / "straight" / "metrics.csv", tmp_path / "resumed" / "metrics.csv")]
    assert rows[0] == rows[1] and [r["epoch"] for r in rows[1]] == ["1", "2"]
    assert rows[1][1]["verify_checks"] == "3"  # global steps 12, 15 and 18 of epoch 2
    assert b["args"]["verify_every"] == 3


def test_ctrl_c_after_the_last_checkpoint_leaves_the_metrics(
        data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    # metrics.csv is written before the checkpoint; the hint names the checkpoint to resume.
    out = tmp_path / "run"
    _interrupt_after_saving(monkeypatch, epoch=2)
    monkeypatch.setattr(sys, "argv", ["train.py", "--out", str(out), "--data-dir",
                                      str(data_dir), *FAST])
    try:
        with pytest.raises(SystemExit) as exc:
            T.cli()
    finally:  # cli() ignores a second Ctrl-C while it leaves: give this process its own back
        signal.signal(signal.SIGINT, signal.default_int_handler)
    assert exc.value.code == 130
    assert capsys.readouterr().err == (f"train.py: interrupted; continue with --resume "
                                       f"{out / 'checkpoint.pt'}\n")
    assert [r["epoch"] for r in _metrics(out / "metrics.csv")] == ["1", "2"]


def test_under_torchrun_only_rank_0_says_it_was_interrupted(
        data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    _interrupt_after_saving(monkeypatch, epoch=1)
    monkeypatch.setenv("RANK", "1")  # what torchrun sets; WORLD_SIZE stays 1: no process group
    monkeypatch.setattr(sys, "argv", ["train.py", "--out", str(tmp_path / "run"), "--data-dir",
                                      str(data_dir), *FAST])
    try:
        with pytest.raises(SystemExit) as exc:
            T.cli()
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    assert exc.value.code == 130 and capsys.readouterr().err == ""


def test_a_finished_run_resumed_writes_its_outputs_again(run, data_dir: Path, tmp_path: Path,
                                                        mnist: MNISTTensors) -> None:
    run()
    out = tmp_path / "run"
    rows = (out / "metrics.csv").read_text()
    (out / "metrics.csv").write_text(rows[: len(rows) // 3])  # truncated
    (out / "curves.png").unlink()
    result = T.main(["--resume", str(out / "checkpoint.pt"), "--data-dir", str(data_dir),
                     "--quiet"], data=mnist)
    assert result["epoch"] == 2 and (out / "metrics.csv").read_text() == rows
    assert sorted(p.name for p in out.iterdir()) == OUTPUTS
    # Into a new --out: the whole run directory, checkpoint.pt too, which resumes in turn.
    new = tmp_path / "new"
    T.main(["--resume", str(out / "checkpoint.pt"), "--data-dir", str(data_dir), "--quiet",
            "--out", str(new)], data=mnist)
    assert sorted(p.name for p in new.iterdir()) == OUTPUTS
    assert (new / "metrics.csv").read_text() == rows
    assert _load(new / "checkpoint.pt")["step"] == _load(out / "checkpoint.pt")["step"]


def test_verify_every_catches_a_wrong_backward(run, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    real = SoftmaxCrossEntropyFunction.backward

    def no_mean(ctx: Any, *grads: torch.Tensor | None) -> tuple[Any, ...]:
        grad_z, *rest = real(ctx, *grads)
        return (grad_z * grad_z.shape[0], *rest)  # forgets the 1/N of the mean

    monkeypatch.setattr(SoftmaxCrossEntropyFunction, "backward", staticmethod(no_mean))
    with pytest.raises(TrainingError, match=r"^--verify-every: at step 0: .*gradient") as exc:
        run()
    assert exc.value.__cause__.report.worst.used > 1  # torch_mlp.verify's report, every number
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    # It is the check that catches it: without it, the run trains on the wrong gradient.
    assert run("--verify-every", "0", "--epochs", "1", out="unchecked")["verify_checks"] == 0


def test_verify_every_catches_a_wrong_loss_value(run, monkeypatch: pytest.MonkeyPatch) -> None:
    # A forward that drops the ½ of ½λΣW²: a wrong value with a right gradient.
    forward = L2PenaltyFunction.forward
    monkeypatch.setattr(L2PenaltyFunction, "forward",
                        staticmethod(lambda lam, *w: 2 * forward(lam, *w)))
    with pytest.raises(TrainingError, match=r"^--verify-every: at step 0: .*loss"):
        run("--l2", "0.01")


def test_verify_every_n_steps(run) -> None:
    result = run("--verify-every", "3")
    # Steps 0..19, every 3rd: 0 3 6 9 in epoch 1, 12 15 18 in epoch 2.
    assert [h["verify_checks"] for h in result["history"]] == [4, 3]
    assert all(0 < h["verify_seconds"] < h["train_seconds"] for h in result["history"])


def test_amp_bfloat16_on_cpu(run) -> None:
    result = run("--amp", "--verify-every", "5", "--device", "cpu")
    assert result["test_acc"] > 0.5
    assert all(h["verify_checks"] == 2 for h in result["history"])  # at bf16 tolerance


@pytest.mark.parametrize("flags,message", [
    (["--epochs", "0"], r"--epochs: must be in \[1, 2147483647\], got 0"),
    (["--hidden", "64", "0"], r"--hidden: must be in \[1, 2147483647\], got 0"),
    (["--hidden", str(2**63)], r"--hidden: must be in \[1, 2147483647\], got 9223372036854775808"),
    (["--verify-every", str(2**31)], r"--verify-every: must be in \[0, 2147483647\]"),
    (["--hidden", "x"], "--hidden: invalid int value: 'x'"),
    (["--device", "tpu"], "--device: invalid choice: 'tpu'"),
    (["--batch-size", "0"], r"--batch-size: must be in \[1, 60000\], got 0"),
    (["--batch-size", "1e20"], "--batch-size: invalid int value: '1e20'"),
    (["--batch-size", "10" * 10], r"--batch-size: must be in \[1, 60000\]"),
    (["--limit", "60001"], r"--limit: must be in \[1, 60000\]"),
    (["--threads", "99999999999"], rf"--threads: must be in \[0, {os.cpu_count()}\]"),
    (["--threads", "2147483647"], rf"--threads: must be in \[0, {os.cpu_count()}\]"),
    (["--threads", "-1"], r"--threads: must be in \[0, "),
    (["--lr", "0"], r"--lr: must be in \(0"),
    (["--lr", "nan"], "--lr: must be in"),
    (["--lr", "1e308"], r"--lr: must be in \(0, 1000000.0\], got 1e308"),
    (["--l2=-1e-4"], "--l2: must be in"),
    (["--label-smoothing", "1.5"], r"--label-smoothing: must be in \[0, 1\]"),
    (["--momentum", "1"], r"--momentum: must be in \[0, 1\)"),
    (["--optimizer", "rmsprop"], "--optimizer: invalid choice: 'rmsprop'"),
    (["--seed", "18446744073709551616"], r"--seed: must be in \[0, 18446744073709551615\]"),
    (["--out", ""], "argument --out: must not be empty"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_flag_values_are_argparse_errors(flags: list[str], message: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        T.main(flags)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"usage: {os.path.basename(sys.argv[0])}" in err, err
    assert re.search(f"error: .*{message}", err), err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_without_cuda_is_an_argparse_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        T.main(["--device", "cuda"])
    assert "--device cuda: CUDA is not available" in capsys.readouterr().err


@pytest.fixture(scope="module")
def finished_run(data_dir: Path, mnist: MNISTTensors,
                 tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "first"
    T.main(["--data-dir", str(data_dir), "--out", str(out), *FAST, "--epochs", "1"], data=mnist)
    return out / "checkpoint.pt"


@pytest.mark.parametrize("flags,message", [
    (["--hidden", "64"], r"--hidden 64 \(checkpoint: 32\)"),
    (["--limit", "900"], r"--limit 900 \(checkpoint: 1000\)"),
    (["--lr", "0.3", "--no-nesterov"], r"--lr 0.3 \(checkpoint: 0.2\); --nesterov off"),
])
def test_resume_with_other_settings_is_refused(flags: list[str], message: str, data_dir: Path,
                                               mnist: MNISTTensors, finished_run: Path,
                                               tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match=f"^checkpoint {finished_run} is from a run with "
                       f"other settings: {message}"):
        T.main(["--resume", str(finished_run), "--data-dir", str(data_dir), "--quiet", "--out",
                str(tmp_path / "resumed"), *flags], data=mnist)
    assert not (tmp_path / "resumed").exists()


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage", "not ours", "edited"])
def test_damaged_checkpoint_is_one_line(damage: str, run, finished_run: Path,
                                        tmp_path: Path) -> None:
    bad, data = tmp_path / "bad.pt", finished_run.read_bytes()
    if damage == "edited":  # a valid file whose content is not what the run wrote
        ck = _load(finished_run)
        ck["args"]["lr"] = 5.0
        torch.save(ck, bad)
    elif damage == "not ours":
        torch.save({"model": {}}, bad)
    else:
        bad.write_bytes({"empty": b"", "truncated": data[: len(data) // 2],
                         "garbage": b"\x00not a zip file" * 100}[damage])
    with pytest.raises(TrainingError, match=f"^checkpoint {bad} is damaged") as exc:
        run("--resume", str(bad), out="resumed")
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("epoch", [1, 2])
def test_full_disk_names_the_file_and_what_was_kept(run, tmp_path: Path, epoch: int,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    real, out = torch.save, tmp_path / "run"

    def save(obj: Any, f: Any, *a: Any, **k: Any) -> None:
        if obj["epoch"] == epoch:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    kept = (f"the checkpoint of epoch 1, {out / 'checkpoint.pt'}, is kept; then continue with "
            f"--resume" if epoch == 2 else "no checkpoint was written; start again")
    with pytest.raises(TrainingError, match=re.escape(
            f"cannot write {out / 'checkpoint.pt'} (No space left on device): free some space; "
            f"{kept}")):
        run()
    if epoch == 2:
        assert _load(out / "checkpoint.pt")["epoch"] == 1
    assert not [p for p in out.iterdir() if p.name.endswith(".partial")]


def test_full_disk_while_plotting(run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from matplotlib.figure import Figure

    def full(*_: Any, **__: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Figure, "savefig", full)
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match=re.escape(
            f"cannot write {out / 'curves.png'} (No space left on device): free some space; the "
            f"checkpoint of "
            f"epoch 2, {out / 'checkpoint.pt'}, is kept; --resume it to write the outputs")):
        run()


@pytest.mark.parametrize("poisoned_step,message", [
    (12, r"^the training loss became nan or inf by step 19 \(epoch 2\): training diverged: "
         r"lower --lr \(now 0.2\); the checkpoint of epoch 1, .*checkpoint.pt, is kept$"),
    (20, r"^the test loss is nan after epoch 2: training diverged: lower --lr \(now 0.2\); "
         r"this epoch is not saved, the checkpoint of epoch 1, .*checkpoint.pt, is kept$"),
])
def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(
        poisoned_step: int, message: str, run, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # After optimizer step `poisoned_step` (1-based), a weight is NaN: 12 poisons the loss of
    # step 12 (epoch 2), seen at the epoch's end; 20 is the last step, its loss still finite.
    real, calls = torch.optim.SGD.step, []

    def step(self: torch.optim.SGD, *a: Any, **k: Any) -> Any:
        result = real(self, *a, **k)
        calls.append(1)
        if len(calls) == poisoned_step:
            with torch.no_grad():
                self.param_groups[0]["params"][0][0, 0] = float("nan")
        return result

    monkeypatch.setattr(torch.optim.SGD, "step", step)
    with pytest.raises(TrainingError, match=message):
        run()
    assert _load(tmp_path / "run" / "checkpoint.pt")["epoch"] == 1


@pytest.mark.parametrize("flags,blamed", [
    ([], "lower --lr (now 0.4)"),
    (["--lr", "1e6", "--l2", "1"], "lower --lr (now 1000000.0)"),
    (["--l2", "100"], "lower --l2 (now 100.0)"),
    (["--batch-size", "2"], "raise --batch-size (now 2)"),
    (["--optimizer", "adam", "--lr", "0.1"], "lower --lr (now 0.1)"),
    (["--resume", "c.pt", "--l2", "100"], "start a new run (--resume keeps the checkpoint's "
                                          "flags) and lower --l2 (now 100.0)"),
])
def test_divergence_advice_names_the_likely_flag(flags: list[str], blamed: str) -> None:
    from torch_mlp.training.config import parse_args

    assert T.advice(parse_args(flags)) == f"training diverged: {blamed}"


def test_a_huge_l2_is_blamed_on_l2(run) -> None:
    with pytest.raises(TrainingError, match=r"training diverged: lower --l2 \(now 1000.0\)"):
        run("--l2", "1000", "--schedule", "none")


def test_ddp_two_processes_step_equals_one_process_step(data_dir: Path, mnist: MNISTTensors,
                                                        tmp_path: Path,
                                                        capfd: pytest.CaptureFixture[str]) -> None:
    # One step on one global batch of 256: 128 per process under DDP (gloo on loopback), against
    # the same step in one process. --verify-every 1 checks the custom Functions under DDP too.
    import ddp_worker
    import torch.multiprocessing as mp

    flags = ["--data-dir", str(data_dir), "--hidden", "32", "--limit", "256", "--batch-size",
             "256", "--epochs", "1", "--schedule", "none", "--verify-every", "1"]
    small = MNISTTensors(mnist.x_train[:256], mnist.y_train[:256], mnist.x_test, mnist.y_test)
    mp.spawn(ddp_worker.run, args=(2, free_port(), [*flags, "--out", str(tmp_path / "ddp")],
                                   small), nprocs=2, join=True)
    printed = capfd.readouterr().out
    single = T.main([*flags, "--out", str(tmp_path / "single"), "--threads", "1"], data=small)
    assert printed.count("epoch  1/1") == 1  # only rank 0 prints ...
    assert "x2 processes (DDP)" in printed and "verify ok" in printed
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == OUTPUTS  # ... and writes
    a, b = _load(tmp_path / "ddp" / "checkpoint.pt"), _load(tmp_path / "single" / "checkpoint.pt")
    assert a["step"] == b["step"] == 1
    torch.manual_seed(0)
    before = T.build_model([32]).state_dict()
    for k in a["model"]:
        assert not torch.equal(a["model"][k], before[k])  # the step moved every parameter
        # Equal up to float rounding: the mean of two 128-means against one 256-mean.
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-6, atol=1e-7)
    ddp_loss = float(_metrics(tmp_path / "ddp" / "metrics.csv")[0]["train_loss"])
    assert single["train_loss"] == pytest.approx(ddp_loss, rel=1e-6)


@pytest.mark.slow
def test_compile_smoke(run) -> None:
    result = run("--compile", "--verify-every", "7")
    assert result["test_acc"] > 0.5
    assert sum(h["verify_checks"] for h in result["history"]) == 3
    assert run("--compile", "--native", out="native")["test_acc"] > 0.5


def _cli(*args: str, cwd: Path, module: bool = False) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    entry = ["-m", "torch_mlp.train"] if module else [str(ROOT / "train.py")]
    return subprocess.run([sys.executable, *entry, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_error_is_one_line_without_traceback(data_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "empty.pt").write_bytes(b"")
    proc = _cli("--resume", str(tmp_path / "empty.pt"), "--data-dir", str(data_dir), cwd=tmp_path)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"train.py: error: checkpoint {tmp_path / 'empty.pt'} is "
                                  f"damaged"), proc.stderr


@pytest.mark.slow
def test_python_m_torch_mlp_train_runs_the_same_trainer(data_dir: Path, tmp_path: Path) -> None:
    loud = [f for f in FAST if f != "--quiet"]
    proc = _cli("--data-dir", str(data_dir), "--out", "run", *loud, "--epochs", "1",
                cwd=tmp_path, module=True)
    assert proc.returncode == 0, proc.stderr
    assert "epoch  1/1" in proc.stdout and (tmp_path / "run" / "checkpoint.pt").is_file()


def _cli_stopped(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(sys, "argv", ["train.py", *argv])
    try:
        with pytest.raises(SystemExit) as exc:
            T.cli()
    finally:  # cli() ignores Ctrl-C and SIGTERM while it leaves: give this process them back
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    return exc.value.code


@pytest.mark.parametrize("sig,status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_stopped_before_the_first_checkpoint_leaves_nothing_to_refuse_a_rerun(
        sig: int, status: int, data_dir: Path, mnist: MNISTTensors, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def stop(run: Any, epoch: int) -> None:
        os.kill(os.getpid(), sig)
        time.sleep(5)  # the signal arrives first

    out, argv = tmp_path / "run", ["--out", str(tmp_path / "run"), "--data-dir", str(data_dir)]
    with monkeypatch.context() as m:
        m.setattr(T, "train", stop)
        assert _cli_stopped([*argv, *FAST], m) == status
    assert capsys.readouterr().err == ("train.py: interrupted; no checkpoint was written, start "
                                       "the run again\n")
    assert list(out.iterdir()) == []  # config.json and the lock gone: the same command runs
    assert T.main([*argv, *FAST], data=mnist)["epoch"] == 2


def test_ctrl_c_during_evaluate_has_nothing_to_resume(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    def stop(*_: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(T, "evaluate_checkpoint", stop)
    assert _cli_stopped(["--evaluate", str(tmp_path / "run" / "checkpoint.pt")], monkeypatch) == 130
    assert capsys.readouterr().err == "train.py: interrupted\n"


@pytest.mark.slow
def test_double_ctrl_c_is_quiet(data_dir: Path, tmp_path: Path) -> None:
    # Ctrl-C twice, the second while the first is being handled: status 130, one line.
    import time

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    loud = [f for f in FAST if f != "--quiet"]
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), "--data-dir", str(data_dir), "--out", "run",
         *loud, "--epochs", "1000"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    assert "epoch  1/1000" in proc.stdout.readline() + proc.stdout.readline()
    proc.send_signal(signal.SIGINT)
    time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert err == "train.py: interrupted; continue with --resume run/checkpoint.pt\n", err


def test_a_directory_in_place_of_an_mnist_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").mkdir(parents=True)
    args = T.config.build_parser().parse_args(["--data-dir", str(tmp_path), "--quiet"])
    with pytest.raises(TrainingError, match=r"cannot read MNIST there \(Is a directory: "
                                            r".*MNIST/raw/t10k-labels-idx1-ubyte\)"):
        T.load_data(args, None, torch.device("cpu"))
