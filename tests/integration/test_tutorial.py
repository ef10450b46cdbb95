"""docs/tutorial.ipynb runs from top to bottom in a fresh kernel and draws its plots inline. The
notebook asserts what it teaches itself: check_function and verify catch the bugs it plants."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
NOTEBOOK = Path(__file__).resolve().parents[2] / "docs" / "tutorial.ipynb"


def test_tutorial_notebook_runs_and_shows_its_plots(tmp_path: Path, monkeypatch) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend draws the plots
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # Runs in tmp_path: the MNIST files the notebook unpacks go there. A failing cell raises.
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.data]
    assert len(images) == 3
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "gradient checks, all ok: True" in text
    assert (tmp_path / "data" / "MNIST" / "raw").is_dir()
