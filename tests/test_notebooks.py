"""Every notebook executes top to bottom (its cells assert what they show), and matches its source
(notebooks/sources/NAME.py, written by notebooks/build_notebooks.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert [p.name for p in NOTEBOOKS] == ["continuous_batching.ipynb", "distributed.ipynb", "kernel_fusion.ipynb",
                                            "paged_attention.ipynb", "quantization.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_built_from_its_source(path, tmp_path):
    spec = importlib.util.spec_from_file_location("build_notebooks", ROOT / "notebooks/build_notebooks.py")
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    assert path.stem in builder.NOTEBOOKS
    builder.build(builder.cells(path.stem), tmp_path / path.name)
    fresh = nbformat.read(tmp_path / path.name, as_version=4)
    committed = nbformat.read(path, as_version=4)
    assert [c.source for c in fresh.cells] == [c.source for c in committed.cells], \
        "run `python notebooks/build_notebooks.py` and commit the result"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path):
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT)}}).execute()
    errors = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
