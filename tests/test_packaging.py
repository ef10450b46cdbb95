"""Packaging: the wheel carries every subpackage, the bundled MNIST with its licence notice, the
code's LICENSE and the metadata; the version has one source."""

from __future__ import annotations

import fnmatch
import importlib.metadata
import re
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

import torch_mlp

ROOT = Path(__file__).resolve().parents[1]
MNIST_FILES = [f"{split}-{kind}-idx{dim}-ubyte.gz" for split in ("train", "t10k")
               for kind, dim in (("images", 3), ("labels", 1))]
PYTHONS = ["3.10", "3.11", "3.12", "3.13"]


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _packages_on_disk() -> list[str]:
    return sorted(".".join(p.parent.relative_to(ROOT).parts)
                  for p in (ROOT / "torch_mlp").rglob("__init__.py"))


def test_every_subpackage_is_included() -> None:
    patterns = _pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]
    found = _packages_on_disk()
    assert "torch_mlp.training" in found  # the check below would pass on an empty list
    missing = [p for p in found if not any(fnmatch.fnmatch(p, pat) for pat in patterns)]
    assert not missing, f"pyproject.toml's packages.find.include leaves out {missing}"


def test_version_has_one_source() -> None:
    config = _pyproject()
    assert "version" not in config["project"], "pyproject.toml must not write the version itself"
    assert "version" in config["project"]["dynamic"]
    assert config["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "torch_mlp.__version__"}
    installed = importlib.metadata.version("torch_mlp")
    assert installed == torch_mlp.__version__, (
        f"installed metadata says {installed}, torch_mlp.__version__ {torch_mlp.__version__}: "
        f"reinstall (pip install -e .) after changing the version")


def test_metadata_names_authors_urls_classifiers_and_the_licence() -> None:
    project = _pyproject()["project"]
    assert project["license"] == "MIT"
    assert set(project["license-files"]) == {"LICENSE", "torch_mlp/_mnist/NOTICE"}
    assert project["authors"] and project["keywords"]
    assert {"Homepage", "Issues", "Changelog"} <= set(project["urls"])
    versions = {c.rsplit(" :: ", 1)[1] for c in project["classifiers"]
                if c.startswith("Programming Language :: Python :: 3.")}
    assert versions == set(PYTHONS)
    assert project["requires-python"] == f">={PYTHONS[0]}"


def test_ci_matrix_covers_the_classified_pythons() -> None:
    workflow = (ROOT / ".github" / "workflows" / "tests.yml").read_text()
    matrix = re.search(r"python-version:\s*\[([^\]]*)\]", workflow)
    assert matrix, "the workflow has no python-version matrix"
    assert re.findall(r'"([0-9.]+)"', matrix.group(1)) == PYTHONS


def test_licence_files_say_what_they_cover() -> None:
    license_text = (ROOT / "LICENSE").read_text()
    assert license_text.startswith("MIT License")
    assert "Copyright (c) 2026 the torch_mlp authors" in license_text
    notice = (ROOT / "torch_mlp" / "_mnist" / "NOTICE").read_text()
    assert "CC BY-SA 3.0" in notice and "https://creativecommons.org/licenses/by-sa/3.0/" in notice
    for name in ("LeCun", "Cortes", "Burges"):
        assert name in notice
    for file in MNIST_FILES:  # the notice names every data file it covers, and only files there
        assert file in notice
        assert (ROOT / "torch_mlp" / "_mnist" / file).exists()


def _build_wheel(source: Path, out: Path) -> Path:
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps",
                           "--no-build-isolation", "-q", "-w", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    (wheel,) = out.glob("torch_mlp-*.whl")
    return wheel


def _wheel_problems(wheel: Path) -> list[str]:
    """What a wheel of torch_mlp lacks: files, licence files, metadata."""
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        meta = Parser().parsestr(z.read(f"{dist_info}/METADATA").decode())
    wanted = [f"{p.replace('.', '/')}/__init__.py" for p in _packages_on_disk()]
    wanted += ["torch_mlp/py.typed", "torch_mlp/_mnist/SOURCE.md", "torch_mlp/_mnist/NOTICE"]
    wanted += [f"torch_mlp/_mnist/{f}" for f in MNIST_FILES]
    wanted += [f"{dist_info}/licenses/LICENSE", f"{dist_info}/licenses/torch_mlp/_mnist/NOTICE"]
    problems = [f"missing {n}" for n in wanted if n not in names]
    if meta["Version"] != torch_mlp.__version__:
        problems.append(f"Version {meta['Version']} != __version__ {torch_mlp.__version__}")
    if meta["License-Expression"] != "MIT":
        problems.append(f"License-Expression is {meta['License-Expression']}")
    if not meta.get_all("Project-URL") or not meta["Author"]:
        problems.append("no Project-URL or Author")
    return problems


def test_wheel_holds_the_code_the_data_and_both_licences(tmp_path: Path) -> None:
    assert _wheel_problems(_build_wheel(ROOT, tmp_path)) == []


LICENSE_FILES = 'license-files = ["LICENSE", "torch_mlp/_mnist/NOTICE"]'
PACKAGE_NOTICE = ', "_mnist/NOTICE"'


@pytest.mark.parametrize(("edits", "caught"), [
    ([(LICENSE_FILES, 'license-files = ["LICENSE"]')], ["licenses/torch_mlp/_mnist/NOTICE"]),
    ([(LICENSE_FILES, 'license-files = ["LICENSE"]'), (PACKAGE_NOTICE, "")],
     ["torch_mlp/_mnist/NOTICE", "licenses/torch_mlp/_mnist/NOTICE"]),
], ids=["not-a-licence-file", "left-out-entirely"])
def test_wheel_check_catches_a_dropped_notice(tmp_path: Path, edits: list, caught: list) -> None:
    # The same build from a copy whose pyproject leaves the notice out.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "torch_mlp", src / "torch_mlp",
                    ignore=shutil.ignore_patterns("__pycache__"))
    pyproject = (ROOT / "pyproject.toml").read_text()
    for old, new in edits:
        assert old in pyproject
        pyproject = pyproject.replace(old, new)
    (src / "pyproject.toml").write_text(pyproject)
    problems = _wheel_problems(_build_wheel(src, tmp_path / "out"))
    assert len(problems) == len(caught)
    for problem, name in zip(problems, caught):
        assert problem.startswith("missing ") and problem.endswith(name)
