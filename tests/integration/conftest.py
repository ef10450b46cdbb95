"""tests/integration: torch_mlp inside the real clients its users train and ship with
(PyTorch Lightning, accelerate, skorch, ONNX and onnxruntime, torch.export, torch.jit, a compiled
training step) and the tutorial notebook. Each test file is marked ``integration``: ``make test``
leaves them out, ``make test-integrations`` installs the ``integrations`` extra and runs them.
Each client is imported inside the tests, so collecting this folder needs none of them."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

COMPATIBILITY = Path(__file__).resolve().parents[2] / "docs" / "compatibility.md"


def recipe(heading: str) -> str:
    """The one python block under ``### heading`` in docs/compatibility.md."""
    text = COMPATIBILITY.read_text()
    if f"### {heading}\n" not in text:
        raise LookupError(f"docs/compatibility.md has no section '### {heading}'")
    section = re.split(r"^#{2,3} ", text.split(f"### {heading}\n", 1)[1], flags=re.M)[0]
    (code,) = re.findall(r"^```python\n(.*?)^```", section, flags=re.S | re.M)
    return code


@pytest.fixture
def run_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[str], dict]:
    """Runs a recipe of docs/compatibility.md as written, in a temporary folder (the files it
    saves land there), and returns its namespace for the test to look into."""
    monkeypatch.chdir(tmp_path)

    def run(heading: str) -> dict:
        namespace: dict = {"__name__": "__main__"}
        exec(compile(recipe(heading), f"docs/compatibility.md ({heading})", "exec"), namespace)
        return namespace

    return run
