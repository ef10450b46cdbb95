"""torch_mlp.data: the bundled MNIST unpacks and verifies, its known facts hold, bad files fail,
and only the checked files are read."""

from __future__ import annotations

import gzip
import hashlib
import shutil
from pathlib import Path

import pytest
import torch
from mnist_fixture import mnist_root

import torch_mlp.data as D
from torch_mlp.data import (
    RAW_FILES,
    MNISTIntegrityError,
    load_mnist,
    prepare_mnist,
    shuffled_batches,
)

TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.fixture(scope="session")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return mnist_root(tmp_path_factory)


@pytest.fixture(scope="session")
def mnist(root: Path) -> D.MNISTTensors:
    return load_mnist(root, "cpu")


def raw_dir(root: Path) -> Path:
    return root / "MNIST" / "raw"


def _copy_raw(src_root: Path, dst_root: Path) -> Path:
    dst = raw_dir(dst_root)
    shutil.copytree(raw_dir(src_root), dst)
    return dst


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in RAW_FILES)


def test_bundled_copy_unpacks_and_verifies(tmp_path: Path) -> None:
    raw = prepare_mnist(tmp_path)
    assert raw == tmp_path / "MNIST" / "raw"
    for name, sha in RAW_FILES.items():
        assert hashlib.sha256((raw / name).read_bytes()).hexdigest() == sha
    assert _leftovers(raw) == []  # no temporary file left behind


def test_checksum_table_matches_source_md() -> None:
    # The table in data.py is copied from SOURCE.md; they must not drift apart.
    source = (Path(D.__file__).parent / "_mnist" / "SOURCE.md").read_text()
    for name, sha in RAW_FILES.items():
        line = next(x for x in source.splitlines() if x.startswith(f"| {name}"))
        assert sha in line, name


def test_label_counts(mnist: D.MNISTTensors) -> None:
    assert torch.bincount(mnist.y_train).tolist() == TRAIN_COUNTS
    assert torch.bincount(mnist.y_test).tolist() == TEST_COUNTS


def test_read_as_torchvision_reads_the_files(root: Path, mnist: D.MNISTTensors) -> None:
    mnist_io = pytest.importorskip("torchvision.datasets.mnist")
    raw = raw_dir(root)
    images = mnist_io.read_image_file(str(raw / "train-images-idx3-ubyte"))  # (60000, 28, 28)
    assert torch.equal(mnist.y_test, mnist_io.read_label_file(str(raw / "t10k-labels-idx1-ubyte")))
    # The known pixel statistics of the training set, on the raw bytes ...
    std, mean = torch.std_mean(images.float() / 255)
    assert mean.item() == pytest.approx(0.1307, abs=5e-5)
    assert std.item() == pytest.approx(0.3081, abs=5e-5)
    # ... hence mean 0 and std 1 after the normalisation, flattened to (N, 784).
    assert mnist.x_train.shape == (60000, 784) and mnist.x_test.shape == (10000, 784)
    assert mnist.x_train.dtype == torch.float32 and mnist.y_train.dtype == torch.int64
    std, mean = torch.std_mean(mnist.x_train)
    assert mean.item() == pytest.approx(0.0, abs=1e-3)
    assert std.item() == pytest.approx(1.0, abs=1e-3)
    expected = (images[-500:].reshape(500, -1).double() / 255 - D.MEAN) / D.STD
    torch.testing.assert_close(mnist.x_train[-500:].double(), expected, rtol=1e-6, atol=1e-6)


def test_a_stale_processed_cache_is_not_read(root: Path, tmp_path: Path,
                                             mnist: D.MNISTTensors) -> None:
    # Older torchvision wrote processed/{training,test}.pt, and its MNIST class prefers them
    # to the raw files; here they hold shuffled labels. The checked raw files are what counts.
    _copy_raw(root, tmp_path)
    processed = tmp_path / "MNIST" / "processed"
    processed.mkdir()
    g = torch.Generator().manual_seed(0)
    for split, y in (("training", mnist.y_train), ("test", mnist.y_test)):
        images = torch.zeros(len(y), 28, 28, dtype=torch.uint8)
        torch.save((images, y[torch.randperm(len(y), generator=g)]), processed / f"{split}.pt")
    got = load_mnist(tmp_path)
    assert torch.equal(got.y_train, mnist.y_train) and torch.equal(got.y_test, mnist.y_test)
    assert torch.equal(got.x_train, mnist.x_train)


def _flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))


@pytest.mark.parametrize("name", list(RAW_FILES))
def test_flipped_byte_is_refused(name: str, root: Path, tmp_path: Path) -> None:
    raw = _copy_raw(root, tmp_path)
    _flip_byte(raw / name, (raw / name).stat().st_size // 2)
    with pytest.raises(MNISTIntegrityError, match=rf"{name} is corrupted: sha256 .*Delete it"):
        load_mnist(tmp_path)
    # What the message says to do works: delete it, run again, get a good copy.
    (raw / name).unlink()
    load_mnist(tmp_path)


@pytest.mark.parametrize("change", ["truncated", "too long"])
def test_wrong_size_is_refused(change: str, root: Path, tmp_path: Path) -> None:
    raw = _copy_raw(root, tmp_path)
    path = raw / "train-labels-idx1-ubyte"
    data = path.read_bytes()
    path.write_bytes(data[:-100] if change == "truncated" else data + b"\0")
    with pytest.raises(MNISTIntegrityError, match=r"train-labels-idx1-ubyte is corrupted: sha256"):
        load_mnist(tmp_path)


def test_directory_in_place_of_a_file_is_named_as_such(root: Path, tmp_path: Path) -> None:
    raw = _copy_raw(root, tmp_path)
    path = raw / "train-labels-idx1-ubyte"
    path.unlink()
    path.mkdir()
    with pytest.raises(IsADirectoryError, match=str(path)):
        load_mnist(tmp_path)


def test_interrupted_unpack_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           root: Path) -> None:
    real = Path.write_bytes

    def interrupted(tmp: Path, data: bytes) -> None:
        real(tmp, data[: len(data) // 2])
        raise KeyboardInterrupt  # Ctrl-C in the middle of the write

    monkeypatch.setattr(Path, "write_bytes", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_mnist(tmp_path)
    raw = raw_dir(tmp_path)
    assert sorted(p.name for p in raw.iterdir()) == []  # nothing half-written, nothing left
    monkeypatch.setattr(Path, "write_bytes", real)
    load_mnist(tmp_path)  # the next run unpacks everything, good
    assert _leftovers(raw) == []


def test_half_written_file_from_a_hard_kill_does_not_pass(root: Path, tmp_path: Path) -> None:
    # A kill -9 midway leaves only a temporary file, under another name: it is ignored and the
    # real file is unpacked afresh. A half file under the real name (say, a copy by hand) fails.
    raw = raw_dir(tmp_path)
    raw.mkdir(parents=True)
    good = (raw_dir(root) / "t10k-labels-idx1-ubyte").read_bytes()
    (raw / ".t10k-labels-idx1-ubyte.abc123.partial").write_bytes(good[:5000])
    load_mnist(tmp_path)
    (raw / "t10k-labels-idx1-ubyte").write_bytes(good[:5000])
    with pytest.raises(MNISTIntegrityError, match=r"t10k-labels-idx1-ubyte is corrupted"):
        load_mnist(tmp_path)


def test_damaged_bundled_copy_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bundled = tmp_path / "bundled"
    shutil.copytree(D._BUNDLED, bundled)
    # Broken gzip: caught by gzip itself.
    trunc = bundled / "t10k-images-idx3-ubyte.gz"
    trunc.write_bytes(trunc.read_bytes()[:1000])
    # Valid gzip, wrong content: caught by the checksum of the uncompressed bytes.
    path = bundled / "t10k-labels-idx1-ubyte.gz"
    data = bytearray(gzip.decompress(path.read_bytes()))
    data[100] ^= 0xFF
    path.write_bytes(gzip.compress(bytes(data)))
    monkeypatch.setattr(D, "_BUNDLED", bundled)
    out = tmp_path / "data"
    with pytest.raises(MNISTIntegrityError, match=r"t10k-images-idx3-ubyte.gz cannot be unpacked"):
        prepare_mnist(out)
    shutil.copy(Path(D.__file__).parent / "_mnist" / trunc.name, trunc)
    with pytest.raises(MNISTIntegrityError, match=r"t10k-labels-idx1-ubyte.gz unpacks to bad"):
        prepare_mnist(out)
    assert not (raw_dir(out) / "t10k-labels-idx1-ubyte").exists()
    assert _leftovers(raw_dir(out)) == []


def test_download_fallback_without_bundled_copy(root: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    torchvision = pytest.importorskip("torchvision")
    monkeypatch.setattr(D, "_BUNDLED", tmp_path / "nothing")
    calls = []

    class FakeMNIST:  # stands in for torchvision's download, which needs a network
        def __init__(self, path: str, train: bool = True, download: bool = False) -> None:
            calls.append(download)
            shutil.copytree(raw_dir(root), raw_dir(Path(path)), dirs_exist_ok=True)

    monkeypatch.setattr(torchvision.datasets, "MNIST", FakeMNIST)
    load_mnist(tmp_path / "b")
    assert calls == [True]

    class Offline:
        def __init__(self, *a: object, **k: object) -> None:
            raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(torchvision.datasets, "MNIST", Offline)
    with pytest.raises(MNISTIntegrityError, match="download failed"):
        prepare_mnist(tmp_path / "c")


@pytest.mark.parametrize("n,batch,world", [(1000, 128, 1), (1000, 128, 2), (999, 64, 4)],
                         ids=["single", "ddp2", "ddp4-uneven"])
def test_shuffled_batches_shard_the_global_batch(n: int, batch: int, world: int) -> None:
    usable = n - n % world
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(3))[:usable]
    per_rank = [shuffled_batches(n, batch, torch.Generator().manual_seed(3), rank=r,
                                 world_size=world) for r in range(world)]
    assert len({len(b) for b in per_rank}) == 1  # every process takes the same number of steps
    for s, global_batch in enumerate(perm.split(batch)):
        shards = [b[s] for b in per_rank]
        assert len({len(x) for x in shards}) == 1  # of equal size
        # Together, the processes' step-s batches are the single-process step-s batch.
        assert torch.equal(torch.cat(shards).sort().values, global_batch.sort().values)
    seen = torch.cat([torch.cat(b) for b in per_rank])
    assert len(seen) == len(seen.unique()) == usable  # each sample at most once per epoch
    with pytest.raises(ValueError, match="multiple of world_size"):
        shuffled_batches(n, 10, torch.Generator(), world_size=4)
