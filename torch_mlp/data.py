"""MNIST as four tensors on the target device, from torchvision's reader and a bundled copy.

``load_mnist(data_dir, device)`` makes sure ``<data_dir>/MNIST/raw/`` holds the four IDX files
under torchvision's names, checks their md5 and sha256, reads them with
``torchvision.datasets.MNIST(download=False)`` and transforms the whole set once:
uint8 → float, ``/255``, normalised with mean 0.1307 and std 0.3081, flattened to (N, 784).
Training then batches by shuffled index (:func:`shuffled_batches`): no DataLoader, no PIL.

Where the files come from, in order:

1. ``<data_dir>/MNIST/raw/`` already holds them: they are checked (md5 + sha256, ~0.15 s for
   the 55 MB) and used. A file that fails the check stops the run with an error naming it.
2. The copy bundled with the package (``torch_mlp/_mnist/*.gz``, see ``SOURCE.md`` there) is
   unpacked: gunzip to a temporary name in the same folder, check, then ``os.replace`` to the
   final name, so an interrupted unpack never leaves a file that passes for good.
3. ``download=True`` (the default): torchvision's own download, for a copy without the bundled
   files. It needs a network.

torchvision is imported only inside the functions that need it: the package depends on torch
alone, and ``pip install torch_mlp[train]`` adds torchvision.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import tempfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "MEAN",
    "RAW_FILES",
    "STD",
    "MNISTIntegrityError",
    "MNISTTensors",
    "atomic_write",
    "bundled_dir",
    "load_mnist",
    "normalize",
    "prepare_mnist",
    "raw_dir",
    "shuffled_batches",
    "verify_file",
]

# Normalisation constants of the MNIST training set (pixel mean and std after /255).
MEAN = 0.1307
STD = 0.3081

# Size, md5 and sha256 of the UNCOMPRESSED IDX files, under torchvision's names. The values
# are those of torch_mlp/_mnist/SOURCE.md; the md5s are also the ones torchvision publishes.
RAW_FILES: dict[str, tuple[int, str, str]] = {
    "train-images-idx3-ubyte": (
        47040016,
        "6bbc9ace898e44ae57da46a324031adb",
        "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    ),
    "train-labels-idx1-ubyte": (
        60008,
        "a25bea736e30d166cdddb491f175f624",
        "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    ),
    "t10k-images-idx3-ubyte": (
        7840016,
        "2646ac647ad5339dbf082846283269ea",
        "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    ),
    "t10k-labels-idx1-ubyte": (
        10008,
        "27ae3e4e09519cfbb04c329615203637",
        "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    ),
}

_CHUNK = 1 << 20
# Files already checked in this process, keyed by identity and stat: a second load_mnist of
# the same unchanged files (tests, DDP ranks re-reading) skips the re-hash. Any write to a
# file changes its mtime or size, so a changed file is checked again.
_VERIFIED: set[tuple[str, int, int, int]] = set()


class MNISTIntegrityError(RuntimeError):
    """An MNIST file is missing, truncated or fails its checksum; the message says what to do."""


@dataclass
class MNISTTensors:
    """The whole of MNIST, transformed, on one device.

    x_train (60000, 784) and x_test (10000, 784) float, normalised; y_train, y_test int64.
    """

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


def raw_dir(data_dir: str | os.PathLike[str]) -> Path:
    """``<data_dir>/MNIST/raw``, where torchvision's MNIST looks for the IDX files."""
    return Path(data_dir) / "MNIST" / "raw"


def bundled_dir() -> Path | None:
    """The folder of the bundled gzip files, or None if this installation lacks them."""
    folder = Path(__file__).resolve().parent / "_mnist"
    if all((folder / f"{name}.gz").is_file() for name in RAW_FILES):
        return folder
    return None


def _digests(chunks: Iterator[bytes]) -> tuple[int, str, str]:
    md5 = hashlib.md5(usedforsecurity=False)
    sha = hashlib.sha256()
    size = 0
    for chunk in chunks:
        md5.update(chunk)
        sha.update(chunk)
        size += len(chunk)
    return size, md5.hexdigest(), sha.hexdigest()


def _read_chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            yield chunk


def _mismatch(name: str, size: int, md5: str, sha: str) -> str | None:
    """What is wrong with these digests for ``name``, or None if they are right."""
    exp_size, exp_md5, exp_sha = RAW_FILES[name]
    if size != exp_size:
        kind = "truncated" if size < exp_size else "too long"
        return f"it is {size} bytes, expected {exp_size} ({kind})"
    if md5 != exp_md5:
        return f"md5 {md5} != expected {exp_md5}"
    if sha != exp_sha:
        return f"sha256 {sha} != expected {exp_sha}"
    return None


def verify_file(path: str | os.PathLike[str], name: str | None = None) -> None:
    """Check one uncompressed MNIST file's size, md5 and sha256 against :data:`RAW_FILES`.

    Raises:
        MNISTIntegrityError: naming the file, what is wrong and how to get a good copy.
    """
    path = Path(path)
    name = path.name if name is None else name
    if name not in RAW_FILES:
        raise ValueError(f"verify_file: {name!r} is not an MNIST file ({', '.join(RAW_FILES)})")
    if path.is_dir():  # its st_size is the directory's, not a truncated file's
        raise MNISTIntegrityError(
            f"{path} is a directory, not the MNIST file {name}. Move it away or remove it and "
            f"run again: the file is unpacked afresh from the copy bundled with torch_mlp (or "
            f"downloaded).")
    st = path.stat()
    key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    if key in _VERIFIED:
        return
    # Size first: a truncated file is named as such without reading it.
    problem = _mismatch(name, st.st_size, RAW_FILES[name][1], RAW_FILES[name][2])
    if problem is None:
        problem = _mismatch(name, *_digests(_read_chunks(path)))
    if problem is not None:
        raise MNISTIntegrityError(
            f"MNIST file {path} is corrupted: {problem}. Training on it would be training on "
            f"bad data. Delete it and run again: it is unpacked afresh from the copy bundled "
            f"with torch_mlp (or downloaded)."
        )
    _VERIFIED.add(key)


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None]) -> None:
    """``write(tmp)`` to a temporary file in ``path``'s folder, fsync it, then ``os.replace``
    it onto ``path``: a reader sees the old file or the new one, never half of one. Whatever
    stops it midway (an exception raised by ``write`` included) leaves no temporary file."""
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
    """gunzip ``src`` to ``dest`` atomically (:func:`atomic_write`), checking the digests
    before the rename. Whatever stops it midway leaves no file at ``dest``."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as out:

            def copied() -> Iterator[bytes]:
                with gzip.open(src, "rb") as f:
                    while chunk := f.read(_CHUNK):
                        out.write(chunk)
                        yield chunk

            try:
                digests = _digests(copied())
            except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
                raise MNISTIntegrityError(
                    f"bundled MNIST file {src} cannot be unpacked ({type(e).__name__}: {e}). "
                    f"The torch_mlp installation is damaged: reinstall it."
                ) from e
        problem = _mismatch(dest.name, *digests)
        if problem is not None:
            raise MNISTIntegrityError(
                f"bundled MNIST file {src} unpacks to bad data: {problem}. The torch_mlp "
                f"installation is damaged: reinstall it."
            )

    atomic_write(dest, write)
    st = dest.stat()
    _VERIFIED.add((str(dest.resolve()), st.st_ino, st.st_size, st.st_mtime_ns))


def _download(data_dir: Path) -> None:
    from torchvision.datasets import MNIST  # lazy: torchvision is an optional dependency

    try:
        MNIST(str(data_dir), train=True, download=True)
    except Exception as e:
        raise MNISTIntegrityError(
            f"MNIST is not in {raw_dir(data_dir)}, the bundled copy is missing, and "
            f"torchvision's download failed ({type(e).__name__}: {e}). Put the four files "
            f"{', '.join(RAW_FILES)} (or their .gz) there, or run with a network."
        ) from e


def prepare_mnist(
    data_dir: str | os.PathLike[str] = "data", *, download: bool = True, log: bool = False
) -> Path:
    """Make ``<data_dir>/MNIST/raw/`` hold the four checked IDX files; return that folder.

    Files already there are checked and used (a bad one raises). Missing files are unpacked
    from the bundled copy, or, without it (or if it is damaged) and with ``download=True``,
    downloaded by torchvision.

    Raises:
        MNISTIntegrityError: a file fails its check, or no good copy can be had.
    """
    raw = raw_dir(data_dir)
    raw.mkdir(parents=True, exist_ok=True)
    missing = [name for name in RAW_FILES if not (raw / name).exists()]
    if missing:
        bundled = bundled_dir()
        error: MNISTIntegrityError | None = None
        if bundled is not None:
            if log:
                print(f"unpacking the bundled MNIST into {raw}")
            try:
                for name in missing:
                    _unpack(bundled / f"{name}.gz", raw / name)
            except MNISTIntegrityError as e:
                error = e
        if bundled is None or error is not None:
            if not download:
                raise error or MNISTIntegrityError(
                    f"MNIST is not in {raw} and this installation has no bundled copy; "
                    f"allow the download (download=True) or put the files there."
                )
            if log:
                print(f"downloading MNIST into {raw} with torchvision")
            _download(Path(data_dir))
    for name in RAW_FILES:
        verify_file(raw / name, name)
    return raw


def normalize(
    images: Tensor, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """uint8 images (N, 28, 28) → (N, 784) ``dtype`` on ``device``: ``(x / 255 − MEAN) / STD``.

    The uint8 tensor is moved first (a quarter of the float bytes), then converted there.
    """
    x = images.to(device).reshape(images.shape[0], -1)  # (N, 784)
    return x.to(dtype).div_(255).sub_(MEAN).div_(STD)


def load_mnist(
    data_dir: str | os.PathLike[str] = "data",
    device: torch.device | str = "cpu",
    *,
    dtype: torch.dtype = torch.float32,
    download: bool = True,
    log: bool = False,
) -> MNISTTensors:
    """All of MNIST as normalised tensors on ``device`` (see the module docstring).

    Args:
        data_dir: root folder; the files live in ``<data_dir>/MNIST/raw/``.
        device: where the tensors go (the transform runs there).
        dtype: floating dtype of the images.
        download: fall back to torchvision's download when there is no bundled copy.
        log: print a line when unpacking or downloading.
    """
    prepare_mnist(data_dir, download=download, log=log)
    try:
        from torchvision.datasets import MNIST  # lazy: torchvision is an optional dependency
    except ImportError as e:
        raise ImportError(
            "load_mnist reads MNIST with torchvision: pip install 'torch_mlp[train]'"
        ) from e
    splits = []
    for train in (True, False):
        ds = MNIST(str(data_dir), train=train, download=False)
        splits.append((normalize(ds.data, device, dtype), ds.targets.to(device)))
    (x_train, y_train), (x_test, y_test) = splits
    return MNISTTensors(x_train, y_train, x_test, y_test)


def shuffled_batches(
    n: int,
    batch_size: int,
    generator: torch.Generator,
    *,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str | None = None,
) -> list[Tensor]:
    """One epoch of index batches over ``range(n)``, shuffled by ``generator``.

    ``batch_size`` is the global batch. With ``world_size`` > 1 (DDP) every rank draws the same
    permutation (same generator state) and takes every ``world_size``-th index: its step-s batch
    is then its share of exactly the global step-s batch of a single process,
    ``perm[s*B:(s+1)*B]``, so DDP's averaged gradient is that batch's gradient. ``batch_size``
    must be divisible by ``world_size``, and the last ``n % world_size`` indices of the
    permutation are left out so that every rank takes the same number of equal-sized steps.
    """
    if batch_size < 1 or batch_size % world_size:
        raise ValueError(
            f"batch_size ({batch_size}) must be a positive multiple of world_size ({world_size})"
        )
    perm = torch.randperm(n, generator=generator)
    usable = n - n % world_size
    shard = perm[rank:usable:world_size]
    return list(shard.to(device).split(batch_size // world_size))
