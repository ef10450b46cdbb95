"""The README and docs/: length, no working-log words, links that resolve, and every ``python``
block runs on its own in the environment it documents.

A block runs in a fresh interpreter (this one's executable, so the venv the suite runs in), in a
temporary folder. ``pip install .`` gives torch and torch_mlp: a block that imports anything else
(besides the standard library) says so on its first line, ``# needs: train`` (an extra of
torch_mlp) or ``# needs: torchvision`` (a distribution one of the extras installs), and is
skipped where that is not installed. Blocks that need the ``integrations`` extra carry the
``integration`` mark, so ``make test-integrations`` runs them.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, ROOT / "CHANGELOG.md", *DOCS]
NOTEBOOK = ROOT / "docs" / "tutorial.ipynb"

# Words that belong in a commit log or a ticket, not in documentation.
LOG_WORDS = re.compile(
    r"this session|previous session|second session|first session|third session"
    r"|\brun [1-9]\b(?!\.\d)|\bruns [1-9]|\bthe issue\b|\bissue [0-9]+|DESIGN\.md",
    re.IGNORECASE,
)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)
NEEDS = re.compile(r"#\s*needs:\s*(.*)$")
# What `pip install .` gives a block, besides the standard library.
BASE = {"torch", "torch_mlp"}


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # of the opening fence
    code: str

    def __str__(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    @property
    def needs(self) -> list[str]:
        found = NEEDS.match(self.code.split("\n", 1)[0].strip())
        return [n.strip() for n in found.group(1).split(",") if n.strip()] if found else []


def _blocks(page: Path) -> list[Block]:
    text = page.read_text()
    return [Block(page, text.count("\n", 0, m.start()) + 1, m.group(1))
            for m in FENCE.finditer(text)]


def _python_blocks(text: str) -> list[str]:
    return FENCE.findall(text)


def _normal(dist: str) -> str:
    return re.sub(r"[-_.]+", "-", dist).lower()


def _extras() -> dict[str, set[str]]:
    """torch_mlp's extras → the distributions each installs, from the installed metadata."""
    extras: dict[str, set[str]] = {}
    for req in importlib.metadata.metadata("torch_mlp").get_all("Requires-Dist") or []:
        extra = re.search(r"""extra\s*==\s*["']([^"']+)["']""", req)
        if extra:
            name = re.match(r"[A-Za-z0-9._-]+", req).group(0)
            extras.setdefault(extra.group(1), set()).add(_normal(name))
    return extras


def _imports(code: str) -> set[str]:
    """The top-level names a block imports."""
    names = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _needs_problem(block: Block, extras: dict[str, set[str]]) -> tuple[str, str]:
    """("fail", why) for a block whose needs are wrong, ("skip", why) for one whose needs are
    not installed here, ("", "") for one that may run."""
    outside = sorted(_imports(block.code) - BASE - set(sys.stdlib_module_names))
    if not block.needs:
        if outside:
            return "fail", (f"{block} imports {', '.join(outside)}, which `pip install .` does "
                            f"not install: say what it needs on its first line, e.g. "
                            f"'# needs: train'")
        return "", ""
    known = set(extras) | set().union(*extras.values())
    unknown = [n for n in block.needs if _normal(n) not in known and n not in extras]
    if unknown:
        return "fail", (f"{block} needs {', '.join(unknown)}: neither an extra of torch_mlp "
                        f"({', '.join(sorted(extras))}) nor a distribution one installs")
    dists = set().union(*(extras.get(n, {_normal(n)}) for n in block.needs))
    missing = sorted(d for d in dists if not _installed(d))
    if missing:
        return "skip", f"{block} needs {', '.join(missing)}, not installed here"
    provided = importlib.metadata.packages_distributions()
    uncovered = [m for m in outside if not {_normal(d) for d in provided.get(m, [])} & dists]
    if uncovered:
        return "fail", (f"{block} imports {', '.join(uncovered)}, which its '# needs: "
                        f"{', '.join(block.needs)}' does not install")
    return "", ""


def _run(code: str, cwd: Path) -> subprocess.CompletedProcess:
    # A fresh interpreter per block: each shows it runs on its own. torch's default RNG seed is
    # fixed, so a block's random inputs are the same every run.
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def _block_params() -> list:
    params = []
    for page in [README, *DOCS]:
        for block in _blocks(page):
            marks = [pytest.mark.integration] if "integrations" in block.needs else []
            params.append(pytest.param(block, id=str(block), marks=marks))
    return params


@pytest.mark.parametrize("block", _block_params())
def test_python_block_runs_on_its_own(block: Block, tmp_path: Path) -> None:
    verdict, why = _needs_problem(block, _extras())
    if verdict == "fail":
        pytest.fail(why)
    if verdict == "skip":
        pytest.skip(why)
    done = _run(block.code, tmp_path)
    assert done.returncode == 0, f"{block} failed:\n{block.code}\n{done.stderr[-4000:]}"


def test_blocks_are_found_with_their_lines() -> None:
    blocks = _blocks(README)
    assert len(blocks) >= 3, "the quick start and check_function examples are missing"
    lines = README.read_text().splitlines()
    for block in blocks:
        assert lines[block.line - 1] == "```python"
        assert lines[block.line] == block.code.split("\n", 1)[0]


def _fake_block(code: str) -> Block:
    return Block(README, 1, code)


def test_a_block_importing_outside_torch_without_needs_fails() -> None:
    extras = {"train": {"torchvision", "tqdm"}, "integrations": {"onnx"}}
    verdict, why = _needs_problem(_fake_block("import torch, torchvision\n"), extras)
    assert verdict == "fail" and re.search(r"imports torchvision, which .* '# needs: train'", why)
    assert _needs_problem(_fake_block("import json, math\nimport torch_mlp.functional\n"),
                          extras) == ("", "")


def test_a_block_whose_needs_do_not_cover_its_imports_fails() -> None:
    extras = {"train": {"torchvision"}, "integrations": {_normal("pytest")}}
    verdict, why = _needs_problem(_fake_block("# needs: integrations\nimport torch_mlp, ruff\n"),
                                  extras)
    assert verdict == "fail" and "imports ruff, which its '# needs: integrations'" in why
    assert _needs_problem(_fake_block("# needs: integrations\nimport pytest\n"), extras) == ("", "")


def test_an_unknown_or_missing_need_is_named() -> None:
    extras = {"train": {"torchvision"}, "extra-x": {"surely-not-installed-dist"}}
    verdict, why = _needs_problem(_fake_block("# needs: trian\nimport torch\n"), extras)
    assert verdict == "fail" and "needs trian: neither an extra" in why
    verdict, why = _needs_problem(_fake_block("# needs: extra-x\nimport torch\n"), extras)
    assert verdict == "skip" and "needs surely-not-installed-dist, not installed" in why


def test_the_block_runner_sees_a_failing_block(tmp_path: Path) -> None:
    done = _run("raise ValueError('wrong on purpose')\n", tmp_path)
    assert done.returncode != 0 and "wrong on purpose" in done.stderr
    assert _run("import json\n", tmp_path).returncode == 0


def test_readme_is_short() -> None:
    n = len(README.read_text().splitlines())
    assert n <= 250, f"README.md has {n} lines; move depth into docs/"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_no_working_log_words(page: Path) -> None:
    hits = [f"{page.name}:{k}: {line.strip()}" for k, line in
            enumerate(page.read_text().splitlines(), 1) if LOG_WORDS.search(line)]
    assert not hits, "\n".join(hits)


def test_the_log_word_check_can_fail() -> None:
    for text in ("measured in this session", "runs 1-4 gave", "as the issue asks", "run 5",
                 "see DESIGN.md"):
        assert LOG_WORDS.search(text), text
    assert not LOG_WORDS.search("a training run 1.5× slower; rerun 3 times")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_point_to_files_that_exist(page: Path) -> None:
    missing = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL or an anchor on the same page
        path = (page.parent / target.split("#", 1)[0]).resolve()
        if not path.exists():
            missing.append(target)
    assert not missing, f"{page.name} links to missing files: {missing}"


def test_compatibility_table_names_tests_that_exist() -> None:
    sources = "\n".join(p.read_text() for p in (ROOT / "tests").rglob("test_*.py"))
    named = set(re.findall(r"`(?:tests/[\w/]+\.py::)?(test_\w+)`",
                           (ROOT / "docs" / "compatibility.md").read_text()))
    assert named, "no test names found in docs/compatibility.md"
    missing = sorted(n for n in named if f"def {n}(" not in sources)
    assert not missing, f"docs/compatibility.md names tests that do not exist: {missing}"


def _cells_with_outputs(notebook: dict) -> list[int]:
    return [k for k, c in enumerate(notebook["cells"]) if c["cell_type"] == "code"
            and (c.get("outputs") or c.get("execution_count") is not None)]


def test_notebook_is_stored_without_outputs() -> None:
    # git keeps the tutorial clean; make test-integrations runs it (tests/integration).
    notebook = json.loads(NOTEBOOK.read_text())
    assert any(c["cell_type"] == "code" for c in notebook["cells"]), "no code cells"
    dirty = _cells_with_outputs(notebook)
    assert not dirty, f"docs/tutorial.ipynb cells {dirty} keep outputs: clear them before commit"


def test_the_notebook_output_check_can_fail() -> None:
    notebook = json.loads(NOTEBOOK.read_text())
    k = next(k for k, c in enumerate(notebook["cells"]) if c["cell_type"] == "code")
    notebook["cells"][k]["execution_count"] = 1
    assert _cells_with_outputs(notebook) == [k]
    notebook["cells"][k]["execution_count"] = None
    notebook["cells"][k]["outputs"] = [{"output_type": "stream", "name": "stdout", "text": "1"}]
    assert _cells_with_outputs(notebook) == [k]
