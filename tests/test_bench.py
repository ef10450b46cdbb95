"""The benchmark runs and writes a well-formed results.json. Timings are never asserted on."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ sits beside tests/
import bench.__main__ as bench_main

STEP_KEYS = {"H", "B", "custom_ms", "native_ms", "ratio", "ratio_min", "ratio_max", "pairs"}


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "results.json"
    bench_main.main(["--quick", "--hidden", "16", "--batch", "1", "4",
                     "--only", "step", "split", "floor", "ops", "memory", "roofline",
                     "--split", "16x2", "--floor", "16", "2",
                     "--malloc", "default", "--out", str(out)])  # leave pytest's malloc alone
    with open(out) as f:
        return json.load(f)


def test_machine_and_load(results: dict) -> None:
    m = results["machine"]
    for key in ("cpu", "cores", "torch", "threads", "device"):
        assert key in m
    assert results["settings"]["quick"] is True
    assert len(results["load_start"]) == 3 and len(results["load_end"]) == 3


def test_steady_malloc_is_recorded_and_set_in_its_own_process(results: dict) -> None:
    assert results["settings"]["malloc"] == "default"
    code = "from bench.common import steady_malloc; print(steady_malloc())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1], check=True).stdout.strip()
    if platform.libc_ver()[0] == "glibc":
        assert out == "glibc, no trim, mmap above 32 MiB"
    else:
        assert out.startswith("default")


def test_step_rows(results: dict) -> None:
    rows = results["step"]
    assert [(r["H"], r["B"]) for r in rows] == [(16, 1), (16, 4)]
    for r in rows:
        assert r.keys() >= STEP_KEYS
        assert r["ratio_min"] <= r["ratio"] <= r["ratio_max"]
        assert r["custom_ms"] > 0 and r["native_ms"] > 0


def test_compiled_rows_carry_compile_time_and_speedup_over_eager() -> None:
    from bench import step

    eager = [{"H": 8, "B": 2, "custom_ms": 3.0, "native_ms": 2.0}]
    compiled = [{"H": 8, "B": 2, "custom_ms": 1.5, "native_ms": 4.0, "ratio": 0.4,
                 "ratio_min": 0.3, "ratio_max": 0.5, "compile_s_custom": 2.5,
                 "compile_s_native": 1.25}]
    step.add_speedup(compiled, eager)
    assert compiled[0]["speedup_custom"] == 2.0 and compiled[0]["speedup_native"] == 0.5
    text = step.render(compiled)
    assert "compile s torch_mlp" in text and "vs eager torch.nn" in text
    assert "| 2.5 | 1.2 | 2.00 | 0.50 |" in text
    assert "compile s" not in step.render([{k: v for k, v in compiled[0].items()
                                            if not k.startswith(("compile", "speedup"))}])


def test_split_rows_cover_the_four_model_loss_pairs_against_native(results: dict) -> None:
    rows = results["split"]
    assert results["settings"]["split"] == [[16, 2]]
    pairs = [(r["model"], r["loss"]) for r in rows]
    assert sorted(pairs) == sorted((m, lf) for m in ("torch_mlp", "torch.nn")
                                   for lf in ("torch_mlp", "torch.nn"))
    for r in rows:
        assert (r["H"], r["B"]) == (16, 2)
        assert all(r[f"{p}_ms"] > 0 for p in ("forward", "loss", "backward", "step", "total"))
        assert r["ratio_min"] <= r["ratio"] <= r["ratio_max"]
    # Each ratio is taken against torch.nn's own step, round by round: exactly 1 for itself.
    native = next(r for r in rows if r["model"] == r["loss"] == "torch.nn")
    assert native["ratio"] == native["ratio_min"] == native["ratio_max"] == 1.0


@pytest.mark.parametrize("text", ["256", "256x", "axb", "0x4", "256x128x2"])
def test_split_shape_must_be_h_x_b(text: str) -> None:
    from bench.split import parse_shape

    assert parse_shape("256X128") == (256, 128)
    with pytest.raises(ValueError, match=r"HxB|positive"):
        parse_shape(text)


def test_ops_rows(results: dict) -> None:
    ops = {r["op"] for r in results["ops"]}
    assert ops == {"linear", "relu", "cross_entropy"}
    for r in results["ops"]:
        assert r["ratio_min"] <= r["ratio"] <= r["ratio_max"]


def test_tax_rows(results: dict) -> None:
    assert [r["op"] for r in results["tax"]] == ["linear", "relu", "cross_entropy", "l2_penalty"]
    for r in results["tax"]:
        assert r["custom_us"] > 0 and r["native_us"] > 0
        assert r["ratio_min"] <= r["ratio"] <= r["ratio_max"]


def test_memory_rows(results: dict) -> None:
    for r in results["memory"]:
        for impl in ("custom", "native"):
            # Unique storages never exceed the naive sum; activations are part of the unique.
            assert r[f"saved_unique_{impl}"] <= r[f"saved_naive_{impl}"]
            assert 0 <= r[f"saved_activations_{impl}"] <= r[f"saved_unique_{impl}"]
        # Saved bytes are exact (not timings): torch_mlp saves no more than torch.nn.
        assert r["saved_unique_custom"] <= r["saved_unique_native"]


def test_roofline_rows(results: dict) -> None:
    for r in results["roofline"]:
        assert r["gemm_ms"] > 0 and r["gemm_frac_custom"] > 0 and r["gemm_frac_native"] > 0


def test_saved_bytes_counts_a_shared_storage_once() -> None:
    import torch

    from bench.memory import saved_bytes

    class Twice(torch.nn.Module):  # saves x twice (x·x): one storage, two saved tensors
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * x

    class Loss(torch.nn.Module):
        def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return z.sum()

    x = torch.randn(8, 4, requires_grad=True)
    r = saved_bytes(Twice(), Loss(), x, torch.zeros(8))
    assert r["tensors"] == 2
    assert r["naive"] == 2 * r["unique"] == 2 * 8 * 4 * 4


def test_default_output_leaves_the_tracked_reference_alone() -> None:
    reference = Path(bench_main.__file__).with_name("results.json")
    latest = Path(bench_main.parse_args([]).out)
    assert latest != reference and latest.parent.name == "results"
    assert Path(bench_main.parse_args(["--save-reference"]).out) == reference
    assert bench_main.parse_args(["--output", "x.json"]).out == "x.json"
    assert bench_main.parse_args(["--out", "y.json"]).out == "y.json"  # the older spelling


def test_default_output_is_ignored_by_git() -> None:
    import subprocess

    root = Path(__file__).resolve().parents[1]
    latest = Path(bench_main.parse_args([]).out).relative_to(root)
    done = subprocess.run(["git", "check-ignore", "-q", str(latest)], cwd=root)
    if done.returncode == 128:
        pytest.skip("not a git checkout")
    assert done.returncode == 0, f"{latest} is not in .gitignore"


def test_output_and_save_reference_exclude_each_other(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        bench_main.parse_args(["--output", "x.json", "--save-reference"])
    assert e.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_a_run_writes_the_output_path_and_creates_its_folder(tmp_path: Path) -> None:
    out = tmp_path / "new" / "r.json"
    bench_main.main(["--quick", "--hidden", "8", "--batch", "2", "--only", "memory",
                     "--output", str(out)])
    assert json.loads(out.read_text())["memory"]


def test_gemm_flops_count_the_three_gemms_per_layer_that_run() -> None:
    from bench.e2e import epoch_gemm_flops, gemm_flops

    B, H = 256, 1024
    # Forward 2·B·(784·H + H·10), backward twice that, less the first layer's input gradient.
    assert gemm_flops([784, H, 10], B) == 6 * B * (784 * H + H * 10) - 2 * B * 784 * H
    assert gemm_flops([4, 3, 2, 1], 5) == 2 * 5 * (2 * 4 * 3 + 3 * 3 * 2 + 3 * 2 * 1)
    assert epoch_gemm_flops([784, H, 10], 1000, B) == (
        3 * gemm_flops([784, H, 10], B) + gemm_flops([784, H, 10], 1000 - 3 * B))
    assert epoch_gemm_flops([784, H, 10], 512, B) == 2 * gemm_flops([784, H, 10], B)


def test_e2e_pairs_each_loop_time_with_a_train_py_epoch() -> None:
    from bench import e2e

    rows = e2e.run(quick=True)
    train_row, loop_row = rows
    assert train_row["pairs"] == loop_row["pairs"] == 1
    assert train_row["ratio_min"] <= train_row["ratio"] <= train_row["ratio_max"]
    assert loop_row["speedup_min"] <= loop_row["speedup"] <= loop_row["speedup_max"]
    assert loop_row["images_timed"] == 20 * 64
    # The speedup is the loop's epoch over train.py's, pair by pair: one pair, so exactly that.
    assert loop_row["speedup"] == pytest.approx(
        loop_row["dataloader_s_per_epoch"] / train_row["custom_s_per_epoch"])
    assert "× slower (" in e2e.render(rows)
    # The roofline: the epoch's GEMM FLOPs at the rate measured next to it, against its time
    # (one pair, so the medians are that pair's).
    assert train_row["roofline_s_per_epoch"] == pytest.approx(
        train_row["gemm_gflop_per_epoch"] / train_row["gemm_gflops"])
    assert train_row["roofline_pct"] == pytest.approx(
        100 * train_row["roofline_s_per_epoch"] / train_row["custom_s_per_epoch"])
    assert train_row["roofline_pct_min"] <= train_row["roofline_pct"] <= train_row[
        "roofline_pct_max"]
    assert train_row["gemm_gflops_min"] <= train_row["gemm_gflops"] <= train_row[
        "gemm_gflops_max"]
    assert train_row["roofline_pct"] > 0
    assert "%) of train.py's measured" in e2e.render(rows)
    budget = train_row["step_budget_ms"]
    assert set(budget) == {"custom", "native"}
    for ms in budget.values():
        assert list(ms) == [name for name, _ in e2e.BUDGET] and all(v > 0 for v in ms.values())
    assert "| GEMMs alone |" in e2e.render(rows)
    assert 0 < train_row["step_gemm_pct_min"] <= train_row["step_gemm_pct"] <= train_row[
        "step_gemm_pct_max"]


def test_floor_rows_pair_torch_mlp_and_bare_functions_with_native(results: dict) -> None:
    rows = results["floor"]
    assert [(r["H"], r["B"], r["step"]) for r in rows] == [(16, 2, "torch_mlp"),
                                                           (16, 2, "bare Functions")]
    for r in rows:
        assert r["ratio_min"] <= r["ratio"] <= r["ratio_max"] and r["runs"] == 1


def test_floor_bare_functions_compute_native_gradients() -> None:
    # The floor is a fair one only if its Functions do the same work: native's loss and
    # gradients, an ignored target included.
    from bench import floor
    from bench.common import make_models

    _, native = make_models(8, torch.device("cpu"))
    bare = floor.bare_model(native)
    x = torch.randn(6, 784, dtype=torch.float32)
    y = torch.tensor([3, -100, 0, 9, 9, 1])
    losses = [lf(m(x), y) for m, lf in ((native, torch.nn.CrossEntropyLoss()),
                                        (bare, floor._CrossEntropyLoss()))]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[1], losses[0])
    for (name, p), q in zip(native.named_parameters(), bare.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=name)
        assert p is not q


@pytest.mark.parametrize("argv", [["--floor", "1024"], ["--floor", "1024", "0"],
                                  ["--floor-runs", "0"], ["--hidden", "0"], ["--batch", "-1"],
                                  ["--batch", "x"], ["--threads", "0"], ["--device", "tpu"]])
def test_bad_options_are_one_usage_error_naming_them(argv: list[str],
                                                      capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        bench_main.parse_args(argv)
    assert e.value.code == 2 and argv[0] in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_refused(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        bench_main.parse_args(["--device", "cuda"])
    assert "torch sees no CUDA device" in capsys.readouterr().err
