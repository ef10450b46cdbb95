"""torch_mlp.training.rundir: one run per run directory, checkpoints checked by content,
atomic writes that say what a full disk left, metrics.csv."""

from __future__ import annotations

import errno
import io
import os
import socket
import struct
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch

import torch_mlp.training as T
from torch_mlp.data import load_mnist
from torch_mlp.training import rundir
from torch_mlp.training.config import TrainingError

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--hidden", "8", "--limit", "500", "--batch-size", "100", "--epochs", "1", "--quiet",
        "--threads", "1"]


# ---- the lock ---------------------------------------------------------------------------------
def test_a_second_run_is_refused_while_the_first_holds_the_directory(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with rundir.take(out, None):
        holder = f"pid {os.getpid()} on {socket.gethostname()}"
        with pytest.raises(TrainingError, match=f"^--out {out} is in use by {holder}: wait"):
            rundir.take(out, None)
    with rundir.take(out, None):  # released with the file: the directory is free again
        pass


def test_a_second_process_is_refused_until_the_first_ends(tmp_path: Path) -> None:
    out = tmp_path / "run"
    code = (f"import sys, pathlib; from torch_mlp.training import rundir\n"
            f"lock = rundir.take(pathlib.Path({str(out)!r}), None)\n"
            f"print('held', flush=True); sys.stdin.readline()\n")
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(TrainingError, match=f"is in use by pid {holder.pid} on "):
            rundir.take(out, None)
    finally:
        holder.communicate("\n", timeout=60)
    rundir.take(out, None).close()


def test_foreign_files_are_refused_and_left_alone(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("mine")
    (tmp_path / "metrics.csv").write_text("mine too")
    with pytest.raises(TrainingError, match=f"^--out {tmp_path} is not empty and is not a "
                       f"torch_mlp run directory"):
        rundir.take(tmp_path, None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "metrics.csv"]
    assert (tmp_path / "config.json").read_text() == "mine"
    (tmp_path / "file").write_text("x")
    with pytest.raises(TrainingError, match=r"^--out .*file is a file: choose a directory"):
        rundir.take(tmp_path / "file", None)


def test_another_runs_directory_is_refused_but_its_own_resume_is_not(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with rundir.take(out, None):
        (out / "checkpoint.pt").write_bytes(b"")
        (out / "config.json").write_text("{}")
    with pytest.raises(TrainingError, match=f"holds another run \\(checkpoint.pt, config.json\\):"
                       f" continue it with --resume {out / 'checkpoint.pt'}, or choose"):
        rundir.take(out, None)
    with pytest.raises(TrainingError, match="holds another run"):
        rundir.take(out, str(tmp_path / "elsewhere" / "checkpoint.pt"))
    rundir.take(out, str(out / "checkpoint.pt")).close()
    (tmp_path / "empty").mkdir()
    rundir.take(tmp_path / "empty", None).close()  # an empty directory is fine


def test_a_run_into_a_directory_in_use_writes_nothing(data_dir: Path, tmp_path: Path) -> None:
    # Two runs into one --out: the second is refused in one line naming the first.
    out = tmp_path / "run"
    with rundir.take(out, None):
        with pytest.raises(TrainingError, match=f"^--out {out} is in use by pid {os.getpid()}"):
            T.main(["--data-dir", str(data_dir), "--out", str(out), *FAST],
                   data=load_mnist(data_dir))
        assert sorted(p.name for p in out.iterdir()) == [rundir.LOCK]


@pytest.mark.slow
def test_two_runs_started_together_one_is_refused(data_dir: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--data-dir",
                               str(data_dir), "--out", "run", *FAST, "--hidden", hidden],
                              cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for hidden in ("8", "16")]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    # One ran, the other was refused (by the lock, or by the files the first had written).
    assert sorted(rc for rc, _ in results) == [0, 1], results
    err = next(e for rc, e in results if rc == 1)
    assert err.count("\n") == 1 and ("is in use by pid" in err or "holds another run" in err)
    ck = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    config = __import__("json").loads((tmp_path / "run" / "config.json").read_text())
    assert ck["args"]["hidden"] == config["hidden"]  # both files from the same run


# ---- checkpoints ------------------------------------------------------------------------------
def _checkpoint() -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    return {"epoch": 1, "w": torch.randn(3, generator=g), "args": {"lr": 0.1}, "scaler": {},
            "empty": []}


def test_checkpoint_round_trip_and_any_change_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.pt"
    rundir.save_checkpoint(path, _checkpoint(), "kept")
    back = rundir.load_checkpoint(str(path))
    assert back["format"] == rundir.FORMAT and back["epoch"] == 1 and back["args"] == {"lr": 0.1}
    assert torch.equal(back["w"], _checkpoint()["w"])
    w = _checkpoint()["w"]
    for change in ({"epoch": 2}, {"args": {"lr": 0.2}}, {"w": torch.nextafter(w, w + 1)}):
        torch.save({**torch.load(path, weights_only=True), **change}, tmp_path / "x.pt")
        with pytest.raises(TrainingError, match=r"x\.pt is damaged.*does not match its SHA-256"):
            rundir.load_checkpoint(str(tmp_path / "x.pt"))
    with pytest.raises(TrainingError, match=f"^checkpoint {tmp_path}: not a file"):
        rundir.load_checkpoint(str(tmp_path))
    with pytest.raises(TrainingError, match="no such file"):
        rundir.load_checkpoint(str(tmp_path / "none.pt"))


def _header_offsets(data: bytes) -> list[int]:
    """Every byte of a zip's local headers (with their names and extra fields), of its small
    records (the pickle among them), of its central directory and of its end record."""
    offsets: list[int] = []
    for info in zipfile.ZipFile(io.BytesIO(data)).infolist():
        h = info.header_offset
        name_len, extra_len = struct.unpack("<HH", data[h + 26: h + 30])
        small = info.compress_size if info.compress_size < 1000 else 0
        offsets += range(h, h + 30 + name_len + extra_len + small)
    end = data.rindex(b"PK\x05\x06")
    central = struct.unpack("<I", data[end + 16: end + 20])[0]
    return offsets + list(range(central, len(data)))


def test_empty_containers_count_in_the_digest() -> None:
    assert rundir.digest({"scaler": {}}) != rundir.digest({"scal\xe5r": {}})
    assert rundir.digest({"a": {}}) != rundir.digest({"a": []}) != rundir.digest({"a": ()})
    assert rundir.digest({"a": [[], []]}) != rundir.digest({"a": [[[]]]})


@pytest.mark.parametrize("masks", [[0xFF], [1 << bit for bit in range(8)]], ids=["byte", "bits"])
def test_every_flipped_header_bit_is_refused_or_harmless(masks: list[int], tmp_path: Path,
                                                        recwarn: pytest.WarningsRecorder) -> None:
    path, bad = tmp_path / "c.pt", tmp_path / "bad.pt"
    rundir.save_checkpoint(path, _checkpoint(), "kept")
    data = path.read_bytes()
    offsets = _header_offsets(data)
    assert len(offsets) > 500
    refused = harmless = 0
    for offset in offsets:
        for mask in masks:
            flipped = bytearray(data)
            flipped[offset] ^= mask
            bad.write_bytes(flipped)
            try:
                back = rundir.load_checkpoint(str(bad))
            except TrainingError as e:
                assert str(e).startswith(f"checkpoint {bad} is damaged") and "\n" not in str(e)
                refused += 1
            else:  # e.g. a timestamp or alignment padding: it loads, and loads what was saved
                assert back.keys() == {*_checkpoint(), "format"}, (offset, mask)
                assert back["epoch"] == 1 and back["args"] == {"lr": 0.1}
                assert back["scaler"] == {} and back["empty"] == []
                assert torch.equal(back["w"], _checkpoint()["w"])
                harmless += 1
    assert refused > 0 and harmless > 0 and refused + harmless == len(offsets) * len(masks)
    assert not recwarn.list  # a damaged file is the one line, no warning before it


# ---- writes -----------------------------------------------------------------------------------
def test_a_failed_write_names_the_file_and_keeps_the_old_one(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    rundir.write(path, lambda tmp: tmp.write_text("old"), "kept")
    assert path.read_text() == "old" and (path.stat().st_mode & 0o777) == 0o644

    def full(tmp: Path) -> None:
        tmp.write_text("ne")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(TrainingError, match=f"^cannot write {path} \\(No space left on device\\)"
                       f": free some space; the old one is kept$"):
        rundir.write(path, full, "the old one is kept")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.csv"]  # no temporary left

    def interrupted(tmp: Path) -> None:
        tmp.write_text("ne")
        raise KeyboardInterrupt  # Ctrl-C in the middle of the write

    with pytest.raises(KeyboardInterrupt):
        rundir.write(path, interrupted, "kept")
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["m.csv"]


@pytest.mark.parametrize("error,why", [
    (RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0"),
     "([enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0: is the disk full?)"),
    (OSError(errno.EROFS, os.strerror(errno.EROFS)), f"({os.strerror(errno.EROFS)})"),
    (OSError(errno.EDQUOT, os.strerror(errno.EDQUOT)), f"({os.strerror(errno.EDQUOT)}): free "
     f"some space"),
])
def test_a_failed_torch_save_is_one_line_worded_by_its_cause(
        error: Exception, why: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def save(*_: Any, **__: Any) -> None:
        raise error

    monkeypatch.setattr(torch, "save", save)
    path = tmp_path / "c.pt"
    with pytest.raises(TrainingError) as exc:
        rundir.save_checkpoint(path, _checkpoint(), "nothing is kept")
    assert str(exc.value) == f"cannot write {path} {why}; nothing is kept"
    assert list(tmp_path.iterdir()) == []


def test_metrics_csv_columns_and_empty_cells(tmp_path: Path) -> None:
    history = [{"epoch": 1, "loss": 0.5}, {"epoch": 2, "loss": 0.25, "verify_ours_err_w": 1e-7}]
    rundir.write_metrics(tmp_path / "m.csv", history, "kept")
    assert (tmp_path / "m.csv").read_text().splitlines() == [
        "epoch,loss,verify_ours_err_w", "1,0.5,", "2,0.25,1e-07"]


class _Payload:
    def __reduce__(self):  # what an unsafe pickle does when loaded: run code
        return (Path.touch, (Path(os.environ["PAYLOAD_MARK"]),))


@pytest.mark.parametrize("content", ["payload", "module"])
def test_an_unsafe_pickle_is_refused_unread_without_advice_to_load_it_unsafely(
        content, tmp_path, monkeypatch):
    mark = tmp_path / "ran"
    monkeypatch.setenv("PAYLOAD_MARK", str(mark))
    bad = tmp_path / "x.pt"
    torch.save({"a": _Payload()} if content == "payload" else torch.nn.Linear(2, 2), bad)
    with pytest.raises(TrainingError) as info:
        rundir.load_checkpoint(str(bad))
    msg = str(info.value)
    assert msg.startswith(f"checkpoint {bad} is damaged") and "\n" not in msg
    assert "weights_only" not in msg and "\x1b" not in msg
    assert not mark.exists()
