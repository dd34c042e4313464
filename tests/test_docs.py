"""The README and docs/ agree with the committed results files, and stand on their own.

Every table of measurements in README.md and docs/*.md is a rendered block
(`<!-- results: NAME KIND -->`, experiments/render_docs.py); this runs the renderer's --check on
the repository, so a table that disagrees with its results file, or names a file that is not
committed, fails the tests. The other tests keep the docs' links working and the README a front page.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from experiments.render_docs import doc_files, headings, main

ROOT = Path(__file__).resolve().parents[1]
DOCS = doc_files(ROOT)
LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_rendered_blocks_match_the_committed_results(capsys):
    status = main([str(ROOT / "docs" / "results"), "--check", "--root", str(ROOT)])
    assert status == 0, ("README/docs tables differ from docs/results (run `python -m experiments.report "
                         "docs/results/` and commit):\n" + capsys.readouterr().out + capsys.readouterr().err)


@pytest.mark.parametrize("doc", DOCS, ids=[p.name for p in DOCS])
def test_relative_links_resolve(doc):
    """Every relative link points at a committed file, and a #fragment at one of its headings."""
    text = doc.read_text()
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, fragment = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        assert file.exists(), f"{doc.name}: link to missing {target}"
        if fragment and file.suffix == ".md":
            anchors = {slug for _, slug in headings(file.read_text())}
            assert fragment in anchors, f"{doc.name}: no heading #{fragment} in {file.name}"


@pytest.mark.parametrize("doc", DOCS, ids=[p.name for p in DOCS])
def test_docs_stand_alone(doc):
    """The repository's docs never send a reader outside it (the design notes are not shipped)."""
    text = doc.read_text()
    assert "shared/" not in text and "DESIGN.md" not in text, doc.name


def test_readme_is_a_front_page():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) < 150
    assert "<!-- results: quickstart table" in text and "<!-- results: all summary -->" in text
    for doc in sorted((ROOT / "docs").glob("*.md")):
        assert f"](docs/{doc.name})" in text, f"README does not link docs/{doc.name}"
    assert "docs/img/" not in text
