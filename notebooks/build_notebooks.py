"""Write the notebooks from their cell sources (`notebooks/sources/NAME.py`, one list of cells each)
and execute them, so the committed .ipynb files show their outputs and plots to a reader who does not
run them (one command, from the repository root: `python notebooks/build_notebooks.py`;
`--no-execute` writes the cells only).

Keeping the sources in Python files makes notebook diffs readable; tests/test_notebooks.py checks the committed
cells match these sources and executes the notebooks again, so a notebook that stops working fails CI.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import nbformat

NOTEBOOKS = ("paged_attention", "continuous_batching", "kernel_fusion", "quantization", "distributed")


def cells(name: str) -> list[tuple[str, str]]:
    """The (kind, source) cells of notebook `name`, from notebooks/sources/{name}.py."""
    path = Path(__file__).parent / "sources" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"notebook_sources_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.CELLS


def build(cells, path: Path) -> None:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_markdown_cell(src) if kind == "md" else nbformat.v4.new_code_cell(src)
                for kind, src in cells]
    nbformat.write(nb, path)


def execute(path: Path, root: Path) -> None:
    """Run the notebook top to bottom (working directory: the repository root) and store its outputs."""
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(root)}}).execute()
    nbformat.write(nb, path)


if __name__ == "__main__":
    here = Path(__file__).parent
    chosen = [a for a in sys.argv[1:] if not a.startswith("--")] or NOTEBOOKS  # names given: only those
    for name in chosen:
        build(cells(name), here / f"{name}.ipynb")
        if "--no-execute" not in sys.argv[1:]:
            execute(here / f"{name}.ipynb", here.parent)
