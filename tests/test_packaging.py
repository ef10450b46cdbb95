"""Packaging: a non-editable install carries every subpackage and the bundled MNIST copy."""

from __future__ import annotations

import fnmatch
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _packages_on_disk() -> list[str]:
    return sorted(".".join(p.parent.relative_to(ROOT).parts)
                  for p in (ROOT / "torch_mlp").rglob("__init__.py"))


def test_every_subpackage_is_included() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    patterns = config["packages"]["find"]["include"]
    found = _packages_on_disk()
    assert "torch_mlp.training" in found  # the check below would pass on an empty list
    missing = [p for p in found if not any(fnmatch.fnmatch(p, pat) for pat in patterns)]
    assert not missing, f"pyproject.toml's packages.find.include leaves out {missing}"


@pytest.mark.slow
def test_wheel_holds_the_subpackages_and_the_data(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps",
                    "--no-build-isolation", "-q", "-w", str(tmp_path)], check=True,
                   capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("torch_mlp-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for package in _packages_on_disk():
        assert f"{package.replace('.', '/')}/__init__.py" in names
    assert "torch_mlp/_mnist/train-images-idx3-ubyte.gz" in names
    assert "torch_mlp/py.typed" in names
