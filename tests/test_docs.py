"""The README and docs/: length, no working-log words, links that resolve, examples that run."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]

# Words that belong in a commit log or a ticket, not in documentation.
LOG_WORDS = re.compile(
    r"this session|previous session|second session|first session|third session"
    r"|\brun [1-9]\b(?!\.\d)|\bruns [1-9]|\bthe issue\b|\bissue [0-9]+|DESIGN\.md",
    re.IGNORECASE,
)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


def _python_blocks(text: str) -> list[str]:
    return FENCE.findall(text)


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


def test_readme_verify_example_is_the_one_test_verify_runs() -> None:
    # Read the string off test_verify.py's source: importing it would import its test helpers.
    tree = ast.parse((ROOT / "tests" / "test_verify.py").read_text())
    example = next(node.value.value for node in tree.body if isinstance(node, ast.Assign)
                   and any(getattr(t, "id", "") == "README_EXAMPLE" for t in node.targets))
    blocks = [b for b in _python_blocks(README.read_text()) if "torch_mlp.verify.check" in b]
    assert len(blocks) == 1, "the README should have one python block calling verify.check"
    assert blocks[0] == example


def test_compatibility_table_names_tests_that_exist() -> None:
    sources = "\n".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py"))
    named = set(re.findall(r"`(?:tests/\w+\.py::)?(test_\w+)`",
                           (ROOT / "docs" / "compatibility.md").read_text()))
    assert named, "no test names found in docs/compatibility.md"
    missing = sorted(n for n in named if f"def {n}(" not in sources)
    assert not missing, f"docs/compatibility.md names tests that do not exist: {missing}"


# Runs every block but the verify example (tests/test_verify.py runs that one), each in a
# fresh namespace of one fresh interpreter: one torch import, not one per block.
RUNNER = """
import sys, traceback, torch
for k, code in enumerate(sys.argv[1:]):
    torch.manual_seed(0)
    try:
        exec(compile(code, f"README python block {k}", "exec"), {"__name__": "__main__"})
    except Exception:
        sys.exit(f"README python block {k} failed:\\n{code}\\n{traceback.format_exc()}")
"""


def test_readme_python_blocks_run(tmp_path: Path) -> None:
    blocks = [b for b in _python_blocks(README.read_text()) if "torch_mlp.verify.check" not in b]
    assert len(blocks) >= 3, "the quick start and check_function examples are missing"
    done = subprocess.run([sys.executable, "-c", RUNNER, *blocks], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
