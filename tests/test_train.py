"""train.py: smoke runs on a --limit subset, outputs, resume, --verify-every, errors, DDP."""

from __future__ import annotations

import csv
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
from mnist_fixture import mnist_root

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import train as T  # noqa: E402
from torch_mlp.data import MNISTTensors, load_mnist  # noqa: E402
from torch_mlp.functional import SoftmaxCrossEntropyFunction  # noqa: E402
from torch_mlp.training import resources  # noqa: E402
from torch_mlp.training.checkpoint import load_checkpoint  # noqa: E402
from torch_mlp.training.config import (  # noqa: E402
    DEFAULTS,
    LR_DEFAULTS,
    build_parser,
    parse_args,
)
from torch_mlp.training.distributed import Dist  # noqa: E402
from torch_mlp.training.errors import (  # noqa: E402
    CheckpointError,
    NonFiniteLossError,
    TrainingError,
    VerifyError,
)
from torch_mlp.training.metrics import METRIC_FIELDS  # noqa: E402

# Small and fast: 1000 training images, 10 steps of 100 per epoch, hidden 32, one thread (the
# CPU may be shared; one thread is the most predictable there). --lr 0.2: the default (0.4) is
# tuned for 13 epochs of batch 256 on the full set; over these few small steps it overshoots.
FAST = ["--hidden", "32", "--limit", "1000", "--batch-size", "100", "--epochs", "2", "--quiet",
        "--threads", "1", "--lr", "0.2"]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return mnist_root(tmp_path_factory)


@pytest.fixture(scope="session")
def mnist(data_dir: Path) -> MNISTTensors:
    return load_mnist(data_dir)


@pytest.fixture
def run(data_dir: Path, mnist: MNISTTensors, tmp_path: Path):
    """run(*flags, out="run") -> main()'s result, with FAST settings, --out in tmp_path and
    MNIST loaded once per session (load=True: main() loads it itself, as from the CLI)."""

    def _run(*flags: str, out: str = "run", load: bool = False) -> dict[str, Any]:
        argv = ["--data-dir", str(data_dir), "--out", str(tmp_path / out), *FAST, *flags]
        return T.main(argv, data=None if load else mnist)

    return _run


def _interrupted_after_first_epoch(monkeypatch: pytest.MonkeyPatch, start: Any) -> None:
    """Call ``start()`` (a training run) and interrupt it like Ctrl-C right after epoch 1's
    checkpoint and metrics are written."""
    real = T.write_metrics_csv

    def interrupt(path: Path, history: Any) -> None:
        real(path, history)
        raise KeyboardInterrupt

    monkeypatch.setattr(T, "write_metrics_csv", interrupt)
    with pytest.raises(KeyboardInterrupt):
        start()
    monkeypatch.setattr(T, "write_metrics_csv", real)


def _load(path: Path) -> dict[str, Any]:
    return torch.load(path, weights_only=True)


def test_smoke_run_learns_and_writes_every_output(run, tmp_path: Path) -> None:
    from PIL import Image

    result = run("--epochs", "3", "--limit", "2000", load=True)
    out = tmp_path / "run"
    hist = result["history"]
    assert [h["epoch"] for h in hist] == [1, 2, 3]
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]  # the loss falls
    assert hist[-1]["test_loss"] < hist[0]["test_loss"]
    assert result["test_acc"] > 0.7  # chance is 0.1
    # --verify-every's default: once per epoch, and custom matched native closely.
    assert all(h["verify_checks"] == 1 for h in hist)
    assert all(h["verify_max_rel_diff"] < 1e-5 for h in hist)
    assert all(h["verify_tolerance_used"] < 1 for h in hist)

    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert set(METRIC_FIELDS) <= set(rows[0])
    assert all(r[k] != "" for r in rows for k in METRIC_FIELDS)  # every cell filled
    assert float(rows[-1]["test_acc"]) == pytest.approx(result["test_acc"])
    # Per parameter, ours' and native's error against float64 (max over the epoch's checks).
    params = ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert list(rows[0])[len(METRIC_FIELDS):] == [
        f"verify_{who}_err_{p}" for p in params for who in ("ours", "native")]
    for r, h in zip(rows, hist):
        for p in params:
            ours, native = float(r[f"verify_ours_err_{p}"]), float(r[f"verify_native_err_{p}"])
            assert 0 <= ours < 1e-3 and 0 <= native < 1e-3
            assert ours == h[f"verify_ours_err_{p}"]
    assert float(rows[0]["verify_ours_err_0.weight"]) > 0  # float32 rounds
    for png in ("curves.png", "weights.png", "verify.png"):
        with Image.open(out / png) as im:
            im.verify()
            assert im.format == "PNG" and im.size[0] > 100
    config = json.loads((out / "config.json").read_text())
    assert config["hidden"] == [32] and config["resolved"]["steps_per_epoch"] == 20
    ck = _load(out / "checkpoint.pt")  # weights_only=True: tensors and plain containers only
    assert ck["epoch"] == 3 and ck["sizes"] == [784, 32, 10]
    assert set(ck["model"]) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoint.pt", "config.json", "curves.png", "metrics.csv", "verify.png", "weights.png"]


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
    with open(Path(theirs["out"]) / "metrics.csv", newline="") as f:
        assert list(next(csv.DictReader(f))) == list(METRIC_FIELDS)
    assert (Path(ours["out"]) / "verify.png").exists()
    for h1, h2 in zip(ours["history"], theirs["history"]):
        assert h1["train_loss"] == pytest.approx(h2["train_loss"], rel=1e-4)
        assert abs(h1["test_acc"] - h2["test_acc"]) <= 0.002


def test_resume_is_bit_identical(run, data_dir: Path, mnist: MNISTTensors, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    run(out="straight")

    # The same run, interrupted (Ctrl-C) right after epoch 1's checkpoint and metrics.
    _interrupted_after_first_epoch(monkeypatch, lambda: run(out="resumed"))
    ck_path = tmp_path / "resumed" / "checkpoint.pt"
    assert _load(ck_path)["epoch"] == 1
    # Resumed with the checkpoint alone: its flags come from the checkpoint.
    T.main(["--resume", str(ck_path), "--data-dir", str(data_dir), "--quiet", "--threads", "1"],
           data=mnist)

    a, b = _load(tmp_path / "straight" / "checkpoint.pt"), _load(ck_path)
    assert a["epoch"] == b["epoch"] == 2 and a["step"] == b["step"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k, st in a["optimizer"]["state"].items():
        assert torch.equal(st["momentum_buffer"], b["optimizer"]["state"][k]["momentum_buffer"])
    assert a["scheduler"] == b["scheduler"]
    assert torch.equal(a["rng"]["shuffle"], b["rng"]["shuffle"])
    with open(tmp_path / "resumed" / "metrics.csv", newline="") as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["1", "2"]


def test_verify_every_catches_a_wrong_backward(run, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    real = SoftmaxCrossEntropyFunction.backward

    def no_mean(ctx: Any, g: torch.Tensor) -> tuple[Any, ...]:
        grad_z, *rest = real(ctx, g)
        return (grad_z * grad_z.shape[0], *rest)  # forgets the 1/N of the mean

    monkeypatch.setattr(SoftmaxCrossEntropyFunction, "backward", staticmethod(no_mean))
    with pytest.raises(VerifyError, match=r"^--verify-every: at step 0: the gradient of \S+ "
                       r"differs from native autograd's: max abs diff .* > tolerance "
                       r".*\(torch.float32\)") as exc:
        run()
    assert "\n" not in str(exc.value)  # one line at the command line
    assert exc.value.report.worst.used > 1
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    # It is the check that catches it: without it, the run trains on the wrong gradient.
    result = run("--verify-every", "0", "--epochs", "1", out="unchecked")
    assert result["verify_checks"] == 0


def test_verify_tolerance_allows_rounding_and_catches_errors() -> None:
    from torch_mlp.verify import VERIFY_K, VERIFY_RTOL, _grad_row

    # Near convergence a gradient is a small difference of large terms: both implementations
    # are off from the exact value by rounding of the terms, far above rtol·max|g|.
    torch.manual_seed(0)
    exact = torch.randn(1000, dtype=torch.float64) * 1e-6
    rounding = 1e-9  # ~ float32 eps times terms of ~1e-2
    native = (exact + rounding * torch.randn(1000, dtype=torch.float64)).float()
    ours = (exact + rounding * torch.randn(1000, dtype=torch.float64)).float()
    rtol = VERIFY_RTOL[torch.float32]

    def row(o: torch.Tensor, n: torch.Tensor, e: torch.Tensor) -> Any:
        return _grad_row("g", o, n, e, rtol, VERIFY_K)

    assert row(ours, native, exact).rel > 10 * rtol
    assert row(ours, native, exact).used < 1
    assert row(native * 1.01, native, exact).used > 1
    assert row(native * 128, native, exact).used > 1e3
    nan = native.clone()
    nan[3] = float("nan")
    assert not row(nan, native, exact).used <= 1
    zero = torch.zeros(5)  # a dead unit: all-zero gradients in both
    assert row(zero, zero, zero.double()).used == 0


def test_verify_every_catches_a_wrong_loss_value(run, monkeypatch: pytest.MonkeyPatch) -> None:
    # A forward that drops the ½ of ½λΣW²: a wrong value with a right gradient.
    from torch_mlp.functions import L2PenaltyFunction

    forward = L2PenaltyFunction.forward
    monkeypatch.setattr(L2PenaltyFunction, "forward",
                        staticmethod(lambda lam, *w: 2 * forward(lam, *w)))
    with pytest.raises(VerifyError, match=r"^--verify-every: at step 0: the loss value differs "
                       r"from the float64 loss: .* the forward \(value\) of the loss is wrong; "
                       r"every gradient is within tolerance\. All: loss: abs .*\.$"):
        run("--l2", "0.01")


def _l2_loss_case() -> tuple[torch.nn.Linear, float, torch.Tensor, torch.Tensor]:
    """A 1024×784 weight, λ=0.1: (layer, λ, native's ½λ·ΣW², the float64 value)."""
    from torch_mlp import functional as MF

    torch.manual_seed(0)
    layer = torch.nn.Linear(784, 1024)
    with torch.no_grad():
        layer.weight.uniform_(-1 / 28, 1 / 28)
    w, lam = layer.weight.detach(), 0.1
    MF.l2_penalty([layer.weight], lam).backward()
    return layer, lam, 0.5 * lam * w.square().sum(), 0.5 * lam * w.double().square().sum()


def test_loss_value_tolerance_allows_rounding_and_catches_errors() -> None:
    import torch_mlp.verify as V
    from torch_mlp import functional as MF

    layer, lam, native, exact = _l2_loss_case()
    ours = MF.l2_penalty([layer.weight], lam).detach()
    # verify's loss tolerance has a floor: the float32 rounding this loss allows.
    report = V.check(layer, lambda m: MF.l2_penalty([m.weight], lam), loss=ours)
    assert report.rows[0].name == "loss" and report.rows[0].used < 1
    rtol, floor = report.rtol, report.loss_floor
    assert V._loss_row(ours * (1 + 1e-3), native, exact, rtol, V.VERIFY_K, floor).used > 1
    assert not V._loss_row(ours * float("nan"), native, exact, rtol, V.VERIFY_K, floor).used <= 1


def test_loss_value_tolerance_allows_another_summation_order() -> None:
    import torch_mlp.verify as V
    from torch_mlp import functional as MF

    # ½λ·W·W (one float32 dot) against native's ½λ·ΣW² over 800k weights: both round, in
    # another order; native's error on this one scalar happens to be tiny.
    layer, lam, _, _ = _l2_loss_case()
    flat = layer.weight.detach().reshape(-1)
    ours = 0.5 * lam * flat.dot(flat)
    report = V.check(layer, lambda m: MF.l2_penalty([m.weight], lam), loss=ours,
                     raise_on_failure=False)
    assert report.rows[0].used < 1


@pytest.mark.parametrize("lr", [None, "2.0"], ids=["lr-default", "lr-2"])
@pytest.mark.parametrize("batch", [4, 256])
@pytest.mark.parametrize("l2", ["0", "1e-4", "0.1", "1.0"])
def test_verify_raises_no_false_alarm(l2: str, batch: int, lr: str | None, data_dir: Path,
                                      mnist: MNISTTensors, tmp_path: Path) -> None:
    # Every step checked; batch 4 runs 50 steps, batch 256 two. λ=1 at lr 2 (lr·λ = 2) truly
    # diverges: that is the NaN check's stop, after every finite step passed verification.
    flags = ["--data-dir", str(data_dir), "--out", str(tmp_path / "run"), "--hidden", "16",
             "--epochs", "1", "--limit", str(200 if batch == 4 else 512), "--batch-size",
             str(batch), "--l2", l2, "--verify-every", "1", "--quiet", "--threads", "1"]
    try:
        result = T.main([*flags, *(["--lr", lr] if lr else [])], data=mnist)
    except NonFiniteLossError:
        assert l2 == "1.0" and lr == "2.0"
        return
    assert result["verify_checks"] == (50 if batch == 4 else 2)
    assert result["verify_tolerance_used"] <= 1


def test_verify_every_n_steps_and_its_cost(run) -> None:
    result = run("--verify-every", "3")
    # Steps 0..19, every 3rd: 0 3 6 9 in epoch 1, 12 15 18 in epoch 2.
    assert [h["verify_checks"] for h in result["history"]] == [4, 3]
    # verify's share of the epochs' seconds; how large depends on the (shared) CPU: not asserted.
    h = result["history"]
    assert 0 < result["verify_overhead"] < 1
    assert result["verify_overhead"] == pytest.approx(
        sum(r["verify_seconds"] for r in h) / sum(r["seconds"] for r in h))


def test_amp_bfloat16_on_cpu(run) -> None:
    result = run("--amp", "--verify-every", "5", "--device", "cpu")
    assert result["test_acc"] > 0.5
    assert all(h["verify_checks"] == 2 for h in result["history"])  # at bf16 tolerance


@pytest.mark.parametrize("flags,message", [
    (["--epochs", "-1"], "--epochs: must be a positive integer, got -1"),
    (["--epochs", "0"], "--epochs: must be a positive integer"),
    (["--hidden", "0"], "--hidden: must be a positive integer, got 0"),
    (["--hidden", "64", "0"], "--hidden: must be a positive integer, got 0"),
    (["--hidden", "x"], "--hidden: invalid int value: 'x'"),
    (["--device", "tpu"], "--device: invalid choice: 'tpu'"),
    (["--batch-size", "0"], "--batch-size: must be a positive integer"),
    (["--lr", "0"], r"--lr: must be in \(0"),
    (["--lr", "nan"], "--lr: must be in"),
    (["--label-smoothing", "1.5"], r"--label-smoothing: must be in \[0, 1\]"),
    (["--momentum", "1"], r"--momentum: must be in \[0, 1\)"),
    (["--l2=-1e-4"], "--l2: must be in"),
    (["--optimizer", "rmsprop"], "--optimizer: invalid choice: 'rmsprop'"),
    (["--resume", "/nonexistent/checkpoint.pt"], "--resume /nonexistent/checkpoint.pt: no such"),
    (["--seed", "18446744073709551616"], r"--seed: must be in \[0, 2\*\*64 - 1\]"),
    (["--lr", "1e308"], r"--lr: must be in \(0, 1000000.0\], got 1e308"),
    (["--lr", "inf"], "--lr: must be in"),
    (["--l2", "1e308"], "--l2: must be in"),
    (["--out", "/proc/torch_mlp_run"], "--out /proc/torch_mlp_run: cannot create files in /proc"),
    (["--data-dir", "/proc/self/stat"], "--data-dir /proc/self/stat: not a directory"),
    (["--out", ""], "argument --out: must not be empty"),
    (["--data-dir", ""], "argument --data-dir: must not be empty"),
    (["--resume", ""], "argument --resume: must not be empty"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_cli_values_are_argparse_errors(flags: list[str], message: str,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        T.main(flags)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage: train.py" in err
    assert re.search(f"error: .*{message}", err), err


def test_resume_of_a_directory_says_so(tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    for holds_one in (False, True):
        if holds_one:
            (tmp_path / "checkpoint.pt").write_bytes(b"")
        with pytest.raises(SystemExit) as exc:
            T.main(["--resume", str(tmp_path)])
        err = capsys.readouterr().err
        assert exc.value.code == 2
        assert f"error: --resume {tmp_path}: is a directory, not a checkpoint file" in err, err
        assert (f"(did you mean {tmp_path / 'checkpoint.pt'}?)" in err) == holds_one, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_without_cuda_is_an_argparse_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        T.main(["--device", "cuda"])
    assert "--device cuda: CUDA is not available" in capsys.readouterr().err


def test_every_flag_documents_its_default() -> None:
    parser = build_parser()
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert "(default: " in (action.help or ""), action.dest
    args = parse_args([])
    for key, value in DEFAULTS.items():  # the one place the defaults live
        assert getattr(args, key) == value
    assert args.lr == LR_DEFAULTS["sgd"] and parse_args(["--optimizer", "adam"]).lr == 1e-3


@pytest.fixture(scope="module")
def finished_run(data_dir: Path, mnist: MNISTTensors,
                 tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "first"
    T.main(["--data-dir", str(data_dir), "--out", str(out), *FAST, "--epochs", "1"], data=mnist)
    return out / "checkpoint.pt"


@pytest.mark.parametrize("damage", ["truncated", "garbage", "not-a-checkpoint"])
def test_corrupt_checkpoint_is_a_clear_error(damage: str, run, finished_run: Path,
                                             tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    data = finished_run.read_bytes()
    if damage == "truncated":
        bad.write_bytes(data[: len(data) // 2])
        match = "cannot read checkpoint .*bad.pt .*corrupted or truncated"
    elif damage == "garbage":
        bad.write_bytes(b"\x00not a zip file" * 100)
        match = "cannot read checkpoint .*bad.pt .*corrupted or truncated"
    else:
        torch.save({"model": {}}, bad)
        match = "bad.pt is not a train.py checkpoint"
    with pytest.raises(CheckpointError, match=match):
        run("--resume", str(bad), out="resumed")


def test_checkpoint_of_another_architecture_is_a_clear_error(run, finished_run: Path,
                                                            data_dir: Path,
                                                            tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"another architecture: --hidden \[64\] "
                       r"\(checkpoint: \[32\]\)"):
        run("--hidden", "64", "--resume", str(finished_run), out="resumed")
    # A checkpoint whose weights do not match its own flags (edited by hand, say).
    ck = _load(finished_run)
    ck["args"]["hidden"] = [16]
    odd = tmp_path / "odd.pt"
    torch.save(ck, odd)
    with pytest.raises(CheckpointError, match="holds an MLP 784-32-10, this run builds "
                       "784-16-10: another architecture"):
        T.main(["--resume", str(odd), "--data-dir", str(data_dir), "--quiet",
                "--out", str(tmp_path / "odd")])


@pytest.mark.parametrize(("field", "value", "message"), [
    ("lr", -5.0, r"field args\.lr: must be in \(0, 1000000\.0\], got -5\.0"),
    ("epoch", "x", "field epoch: must be an integer >= 0, got 'x'"),
])
def test_hand_edited_checkpoint_is_a_clear_error(field: str, value: Any, message: str,
                                                 finished_run: Path, data_dir: Path,
                                                 tmp_path: Path) -> None:
    ck = _load(finished_run)
    if field in ck:
        ck[field] = value
    else:
        ck["args"][field] = value
    torch.save(ck, tmp_path / "edited.pt")
    with pytest.raises(CheckpointError, match=f"checkpoint .*edited.pt: {message}"):
        T.main(["--resume", str(tmp_path / "edited.pt"), "--data-dir", str(data_dir), "--quiet",
                "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_out_dir_of_another_run_is_not_overwritten(data_dir: Path, finished_run: Path) -> None:
    with pytest.raises(TrainingError, match=r"already holds a checkpoint\.pt of another run"):
        T.main(["--data-dir", str(data_dir), "--out", str(finished_run.parent), *FAST])


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(
    run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torch_mlp._dispatch import native_enabled

    real, calls = T.custom_loss, []

    def poisoned(*args: Any) -> torch.Tensor:
        calls.extend([] if native_enabled() else [1])  # verify's re-runs are native
        loss = real(*args)
        return loss * float("nan") if len(calls) == 13 else loss  # step 12, in epoch 2

    monkeypatch.setattr(T, "custom_loss", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 12 \(epoch 2, batch 2\)"
                       r".*last good checkpoint.*after epoch 1.*is kept"):
        run()
    ck = _load(tmp_path / "run" / "checkpoint.pt")
    assert ck["epoch"] == 1 and all(torch.isfinite(v).all() for v in ck["model"].values())


def test_divergence_from_a_huge_learning_rate_stops(run) -> None:
    with pytest.raises(NonFiniteLossError, match=r"at step \d+ .*try a lower --lr"):
        run("--lr", "1e6", "--schedule", "none", "--label-smoothing", "0")


def test_evaluate() -> None:
    torch.manual_seed(0)
    model = T.build_model([8])
    x, y = torch.randn(50, 784), torch.randint(0, 10, (50,))
    m = T.evaluate(model, x, y, batch_size=16)
    assert 0 <= m["acc"] <= 1
    assert m["loss"] == pytest.approx(torch.nn.functional.cross_entropy(model(x), y).item(),
                                      rel=1e-5)


def _torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(ROOT / "train.py"),
           *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_ddp_two_processes_step_equals_one_process_step(data_dir: Path, mnist: MNISTTensors,
                                                        tmp_path: Path,
                                                        capfd: pytest.CaptureFixture[str]) -> None:
    # One step on one global batch of 256: 128 per process under DDP (gloo on loopback), against
    # the same step in one process. --verify-every 1 checks the custom Functions under DDP too.
    import ddp_worker
    import torch.multiprocessing as mp

    flags = ["--data-dir", str(data_dir), "--hidden", "32", "--limit", "256", "--batch-size",
             "256", "--epochs", "1", "--schedule", "none", "--verify-every", "1", "--quiet"]
    small = MNISTTensors(mnist.x_train[:256], mnist.y_train[:256], mnist.x_test, mnist.y_test)
    mp.spawn(ddp_worker.run, args=(2, free_port(), [*flags, "--out", str(tmp_path / "ddp")],
                                   small), nprocs=2, join=True)
    printed = capfd.readouterr().out
    single = T.main([*flags, "--out", str(tmp_path / "single"), "--threads", "1"], data=small)
    assert printed.count("epoch  1/1") == 1  # only rank 0 prints ...
    assert "x2 processes (DDP)" in printed and "verify ok" in printed
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == [  # ... and writes
        "checkpoint.pt", "config.json", "curves.png", "metrics.csv", "verify.png",
        "weights.png"]
    a, b = _load(tmp_path / "ddp" / "checkpoint.pt"), _load(tmp_path / "single" / "checkpoint.pt")
    assert a["step"] == b["step"] == 1
    torch.manual_seed(0)
    before = T.build_model([32]).state_dict()
    for k in a["model"]:
        assert not torch.equal(a["model"][k], before[k])  # the step moved every parameter
        # Equal up to float rounding: the mean of two 128-means against one 256-mean.
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-6, atol=1e-7)
    with open(tmp_path / "ddp" / "metrics.csv", newline="") as f:
        ddp_loss = float(next(csv.DictReader(f))["train_loss"])
    assert single["train_loss"] == pytest.approx(ddp_loss, rel=1e-6)


@pytest.mark.slow
def test_ddp_resume(data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A single-process run interrupted after epoch 1, resumed under DDP: same global batches,
    # so it ends where the uninterrupted single-process run ends, up to float rounding.
    flags = ["--data-dir", str(data_dir), "--hidden", "32", "--limit", "1000", "--batch-size",
             "100", "--epochs", "2", "--quiet"]
    T.main([*flags, "--out", str(tmp_path / "straight"), "--threads", "1"])
    _interrupted_after_first_epoch(
        monkeypatch, lambda: T.main([*flags, "--out", str(tmp_path / "resumed"), "--threads", "1"])
    )
    ck = tmp_path / "resumed" / "checkpoint.pt"
    proc = _torchrun(["--resume", str(ck), "--data-dir", str(data_dir), "--quiet"], tmp_path)
    assert "resuming" in proc.stdout and "epoch  2/2" in proc.stdout
    a, b = _load(tmp_path / "straight" / "checkpoint.pt"), _load(ck)
    assert b["epoch"] == 2
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_compile_smoke(run) -> None:
    result = run("--compile", "--verify-every", "7")
    assert result["test_acc"] > 0.5
    assert sum(h["verify_checks"] for h in result["history"]) == 3


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_empty_checkpoint_is_one_line_without_traceback(data_dir: Path,
                                                            tmp_path: Path) -> None:
    (tmp_path / "empty.pt").write_bytes(b"")
    proc = _cli("--resume", str(tmp_path / "empty.pt"), "--data-dir", str(data_dir), cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("train.py: error: cannot read checkpoint"), proc.stderr


@pytest.mark.slow
def test_cli_user_errors_are_one_line_without_traceback(data_dir: Path, tmp_path: Path) -> None:
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = [
        (["--out", str(a_file)], 2, f"--out {a_file}: exists and is not a directory"),
        (["--out", str(a_file / "run")], 2, f"--out {a_file / 'run'}: {a_file} is a file"),
        (["--data-dir", str(a_file)], 2, f"--data-dir {a_file}: not a directory"),
        (["--seed", "18446744073709551616"], 2, "--seed: must be in"),
        (["--hidden", "1000000000"], 1, "--hidden 1000000000: the model needs at least"),
        (["--resume", str(tmp_path / "empty.pt")], 1, "cannot read checkpoint"),
    ]
    (tmp_path / "empty.pt").write_bytes(b"")
    for flags, status, message in cases:
        proc = _cli("--data-dir", str(data_dir), "--quiet", "--out", str(tmp_path / "o"),
                    *flags, cwd=tmp_path)
        assert proc.returncode == status, (flags, proc.stderr)
        assert "Traceback" not in proc.stderr, proc.stderr
        assert message in proc.stderr, (flags, proc.stderr)
    assert not (tmp_path / "o").exists()  # no run directory left behind by any of them


def test_out_not_writable_is_refused_before_the_data_loads(
    run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "ro").mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, m: False if Path(p).name == "ro" else real(p, m))
    monkeypatch.setattr(resources, "load_mnist", lambda *a: pytest.fail("the data was loaded"))
    with pytest.raises(SystemExit) as exc:
        run(out="ro/run", load=True)
    assert exc.value.code == 2


def test_data_error_leaves_no_run_directory(data_dir: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from torch_mlp.data import MNISTIntegrityError

    def broken(*_: Any, **__: Any) -> None:
        raise MNISTIntegrityError("MNIST file x is corrupted")

    monkeypatch.setattr(resources, "prepare_mnist", broken)
    with pytest.raises(MNISTIntegrityError):
        T.main(["--data-dir", str(data_dir), "--out", str(tmp_path / "new" / "run"), *FAST])
    assert not (tmp_path / "new").exists()


def test_data_dir_unreadable_is_an_argparse_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, m: False if Path(p) == tmp_path else real(p, m))
    with pytest.raises(SystemExit) as exc:
        parse_args(["--data-dir", str(tmp_path)])
    assert exc.value.code == 2
    assert f"--data-dir {tmp_path}: permission denied" in capsys.readouterr().err


def test_threads_above_the_cpu_count_warns(capsys: pytest.CaptureFixture[str]) -> None:
    n = (os.cpu_count() or 1) + 1
    parse_args(["--threads", str(n)])
    assert f"warning: --threads {n} is more than" in capsys.readouterr().err


def test_zero_steps_per_epoch_is_a_clear_error(run, monkeypatch: pytest.MonkeyPatch) -> None:
    # Two processes and one image: no process gets a sample (single process: --limit >= 1 works).
    monkeypatch.setattr(T, "init_distributed", lambda _: Dist(rank=0, world_size=2))
    with pytest.raises(TrainingError, match=r"--limit 1: 1 training image.* no step over 2 "
                       r"processes"):
        run("--limit", "1", "--batch-size", "2")


@pytest.mark.slow
def test_interrupt_names_the_real_checkpoint(data_dir: Path, tmp_path: Path) -> None:
    # Ctrl-C in epoch 1 (here: a SIGINT from inside the first step), through the CLI.
    script = (
        "import signal, runpy, sys, torch_mlp.functional as F\n"
        "real = F.cross_entropy\n"
        "def hit(*a, **k):\n"
        "    signal.raise_signal(signal.SIGINT)\n"
        "F.cross_entropy = hit\n"
        f"sys.argv = ['train.py', '--data-dir', {str(data_dir)!r}, '--out', "
        f"{str(tmp_path / 'run')!r}, '--limit', '200', '--hidden', '8', '--quiet']\n"
        f"runpy.run_path({str(ROOT / 'train.py')!r}, run_name='__main__')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 130, proc.stderr
    assert "no checkpoint was written yet" in proc.stderr and "--resume" not in proc.stderr


def test_ctrl_c_while_torch_imports_is_one_line(tmp_path: Path) -> None:
    # SIGINT 0.3 s in: train.py is still importing torch (seconds), before main() runs.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--out", str(tmp_path / "o")],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT,
                                                                        signal.SIG_DFL))
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, (proc.returncode, err)
    assert err.startswith("train.py: interrupted"), err
    assert not (tmp_path / "o").exists()


def test_interrupt_after_a_checkpoint_carries_its_path(run, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(KeyboardInterrupt) as exc:
        real = T.write_metrics_csv

        def interrupt(path: Path, history: Any) -> None:
            real(path, history)
            raise KeyboardInterrupt

        monkeypatch.setattr(T, "write_metrics_csv", interrupt)
        run()
    assert exc.value.checkpoint == str(tmp_path / "run" / "checkpoint.pt")


def _flip_byte_in_largest_record(path: Path) -> str:
    import zipfile

    with zipfile.ZipFile(path) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    # Local header: 30 bytes + name + extra, then the record's data.
    name_len = int.from_bytes(data[info.header_offset + 26: info.header_offset + 28], "little")
    extra_len = int.from_bytes(data[info.header_offset + 28: info.header_offset + 30], "little")
    start = info.header_offset + 30 + name_len + extra_len
    data[start + info.file_size // 2] ^= 0x01
    path.write_bytes(bytes(data))
    return info.filename


def test_flipped_byte_in_a_checkpoint_is_detected(run, finished_run: Path,
                                                  tmp_path: Path) -> None:
    bad = tmp_path / "flipped.pt"
    bad.write_bytes(finished_run.read_bytes())
    record = _flip_byte_in_largest_record(bad)
    assert "data/" in record
    with pytest.raises(CheckpointError, match=f"checkpoint {re.escape(str(bad))} is corrupted"):
        load_checkpoint(bad)
    with pytest.raises(CheckpointError, match="corrupted"):
        run("--resume", str(bad), out="resumed")


def test_empty_checkpoint_is_a_clear_error(run, tmp_path: Path) -> None:
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint .*empty\.pt"):
        run("--resume", str(empty), out="resumed")


def test_divergence_after_resume_names_the_checkpoint_that_exists(
    run, data_dir: Path, mnist: MNISTTensors, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    _interrupted_after_first_epoch(monkeypatch, lambda: run(out="from"))
    resumable = tmp_path / "from" / "checkpoint.pt"
    real = T.custom_loss
    monkeypatch.setattr(T, "custom_loss", lambda *a: real(*a) * float("nan"))
    with pytest.raises(NonFiniteLossError) as exc:
        T.main(["--resume", str(resumable), "--data-dir", str(data_dir), "--quiet",
                "--out", str(tmp_path / "new")], data=mnist)
    msg = str(exc.value)
    assert f"the last good checkpoint, {resumable} (after epoch 1), is kept" in msg
    assert "start a new run with a lower --lr" in msg and "try a lower --lr" not in msg


def test_non_finite_weights_are_not_saved_as_a_good_checkpoint(
    run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The last step of epoch 2 (step 19) leaves NaN weights; its loss was still finite.
    real, calls = torch.optim.SGD.step, []

    def step(self: torch.optim.SGD, *a: Any, **k: Any) -> Any:
        out = real(self, *a, **k)
        calls.append(1)
        if len(calls) == 20:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("nan"))
        return out

    monkeypatch.setattr(torch.optim.SGD, "step", step)
    with pytest.raises(NonFiniteLossError, match=r"after epoch 2 .* not finite.*not saved; "
                       r"the last good checkpoint, .*checkpoint.pt \(after epoch 1\)"):
        run()
    assert _load(tmp_path / "run" / "checkpoint.pt")["epoch"] == 1
