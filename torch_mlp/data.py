"""MNIST as four normalised tensors on the target device (:func:`load_mnist`), from the copy
bundled with the package (``torch_mlp/_mnist/SOURCE.md``) or torchvision's download, read from
the very bytes whose sha256 passed; batches by shuffled index (:func:`shuffled_batches`).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["MEAN", "RAW_FILES", "STD", "MNISTIntegrityError", "MNISTTensors", "atomic_write",
           "load_mnist", "prepare_mnist", "shuffled_batches"]

# Normalisation constants of the MNIST training set (pixel mean and std after /255).
MEAN = 0.1307
STD = 0.3081

# sha256 of the UNCOMPRESSED IDX files, under torchvision's names (torch_mlp/_mnist/SOURCE.md).
RAW_FILES: dict[str, str] = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
_BUNDLED = Path(__file__).resolve().parent / "_mnist"


class MNISTIntegrityError(RuntimeError):
    """An MNIST file is missing, truncated or fails its checksum; the message says what to do."""


@dataclass
class MNISTTensors:
    """All of MNIST, normalised: x_train (60000, 784), x_test (10000, 784); y int64."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


def _problem(name: str, data: bytes) -> str | None:
    """What is wrong with ``data`` as the MNIST file ``name``, or None if it is right."""
    digest = hashlib.sha256(data).hexdigest()
    return None if digest == RAW_FILES[name] else f"sha256 {digest} != expected {RAW_FILES[name]}"


def _read_idx(path: Path) -> Tensor:
    """The uint8 tensor of an MNIST file (IDX: 2 zero bytes, type 0x08, ndim, ndim big-endian
    sizes, the data), parsed from the bytes whose size and sha256 were checked."""
    data = path.read_bytes()
    problem = _problem(path.name, data)
    if problem is not None:
        raise MNISTIntegrityError(
            f"MNIST file {path} is corrupted: {problem}. Training on it would be training on bad "
            f"data. Delete it and run again: it is unpacked afresh from the copy bundled with "
            f"torch_mlp (or downloaded).")
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return torch.frombuffer(bytearray(data), dtype=torch.uint8, offset=4 + 4 * ndim).reshape(shape)


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None]) -> None:
    """``write(tmp)`` to a temporary file beside ``path``, fsync, then ``os.replace`` it onto
    ``path``: a reader sees the old file or the new one, and a failure leaves no temporary."""
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; these files are not secret
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def _unpack(src: Path, dest: Path) -> None:
    """gunzip ``src`` to ``dest`` atomically, checking the bytes before the rename."""
    try:
        with gzip.open(src, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
        raise MNISTIntegrityError(f"bundled MNIST file {src} cannot be unpacked ({e}). The "
                                  f"torch_mlp installation is damaged: reinstall it.") from e
    problem = _problem(dest.name, data)
    if problem is not None:
        raise MNISTIntegrityError(f"bundled MNIST file {src} unpacks to bad data: {problem}. The "
                                  f"torch_mlp installation is damaged: reinstall it.")
    atomic_write(dest, lambda tmp: tmp.write_bytes(data))


def prepare_mnist(data_dir: str | os.PathLike[str] = "data", *, log: bool = False) -> Path:
    """Make ``<data_dir>/MNIST/raw/`` hold the four IDX files (unpacked from the bundled copy,
    or downloaded by torchvision); return that folder. They are checked when read."""
    raw = Path(data_dir, "MNIST", "raw")  # where torchvision's MNIST keeps them
    raw.mkdir(parents=True, exist_ok=True)
    missing = [name for name in RAW_FILES if not (raw / name).exists()]
    if missing and all((_BUNDLED / f"{name}.gz").is_file() for name in RAW_FILES):
        if log:
            print(f"unpacking the bundled MNIST into {raw}")
        for name in missing:
            _unpack(_BUNDLED / f"{name}.gz", raw / name)
    elif missing:
        if log:
            print(f"downloading MNIST into {raw} with torchvision")
        from torchvision.datasets import MNIST  # only here: the package needs torch alone

        try:
            MNIST(str(data_dir), train=True, download=True)
        except Exception as e:  # whatever a failed download raises
            raise MNISTIntegrityError(
                f"MNIST is not in {raw}, the bundled copy is missing, and torchvision's download "
                f"failed ({e}). Put the four files {', '.join(RAW_FILES)} there.") from e
    return raw


def load_mnist(data_dir: str | os.PathLike[str] = "data", device: torch.device | str = "cpu", *,
               dtype: torch.dtype = torch.float32, log: bool = False) -> MNISTTensors:
    """All of MNIST as normalised tensors on ``device`` (see the module docstring); ``log``:
    print a line when unpacking or downloading."""
    raw = prepare_mnist(data_dir, log=log)
    x_train, y_train, x_test, y_test = (_read_idx(raw / name).to(device) for name in RAW_FILES)
    # (N, 28, 28) uint8, moved first (a quarter of the float bytes) → (N, 784), normalised
    x_train, x_test = (x.reshape(len(x), -1).to(dtype).div_(255).sub_(MEAN).div_(STD)
                       for x in (x_train, x_test))
    return MNISTTensors(x_train, y_train.long(), x_test, y_test.long())


def shuffled_batches(n: int, batch_size: int, generator: torch.Generator, *, rank: int = 0,
                     world_size: int = 1, device: torch.device | str | None = None
                     ) -> list[Tensor]:
    """One epoch of index batches over ``range(n)``, shuffled by ``generator``, of the global
    ``batch_size``. Under DDP every rank draws the same permutation and takes every
    ``world_size``-th index: its step-s batch is its share of exactly the global step-s batch
    ``perm[s*B:(s+1)*B]``, so DDP's averaged gradient is that batch's. The last
    ``n % world_size`` indices are left out: every rank takes as many steps, of equal size."""
    if batch_size < 1 or batch_size % world_size:
        raise ValueError(
            f"batch_size ({batch_size}) must be a positive multiple of world_size ({world_size})")
    perm = torch.randperm(n, generator=generator)
    usable = n - n % world_size
    return list(perm[rank:usable:world_size].to(device).split(batch_size // world_size))
