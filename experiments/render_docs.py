"""Render the tables in README.md and docs/*.md from the committed results files.

`python -m experiments.report docs/results/ [--check] [--root DIR]` rewrites every block

    <!-- results: NAME KIND [ARG] [optional] -->
    ...rendered from docs/results/NAME/results.json...
    <!-- /results -->

KIND is `table` (the runs table the harness prints, plus which runs gave the same tokens),
`claims` (paper vs ours), `sweep` (normalized latency by request rate), `provenance` (one line:
commit, date, jax, CPUs, command), `plot` (an image link to docs/results/NAME/ARG, default
throughput_latency.png), `startup` (time to the first timed request, NAME's cold start beside the
warm start in results file ARG), or `summary` with NAME `all`: one row per claim of every results file,
linked to the doc section holding that experiment's claims or table, then the experiments still
waiting for a results file.

A block whose results file is missing is an error, unless the marker says `optional`: then the
first such block of that NAME in a doc renders a one-line note with the command that produces the
file, and its later blocks stay empty. With --check nothing is written: a block that differs from
what the files render prints a diff and the exit status is 1; errors exit 2. Markers inside ```
fences are examples, not blocks.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import yaml

from experiments.tables import agreement_lines, claims_table, markdown_table, sweep_table

KINDS = ("table", "claims", "sweep", "provenance", "plot", "startup", "summary")
OPEN = re.compile(r"<!-- results: (?P<spec>[^>]*?) -->\n")
CLOSE = "<!-- /results -->"
FENCE = re.compile(r"^```.*?^```[^\n]*$", re.M | re.S)
HEADING = re.compile(r"^(#{1,6}) +(.+?) *#* *$", re.M)


class RenderError(Exception):
    """A marker that cannot be rendered: unknown kind, no closing marker, or a missing results file."""


def doc_files(root: Path) -> list[Path]:
    """README.md and docs/*.md under root: the files whose blocks are rendered."""
    return [p for p in [root / "README.md", *sorted((root / "docs").glob("*.md"))] if p.is_file()]


def _fences(text: str) -> list[tuple[int, int]]:
    return [m.span() for m in FENCE.finditer(text)]


def _outside_fences(text: str):
    """Each opening marker's match, leaving out those inside ``` fences."""
    fences = _fences(text)
    for m in OPEN.finditer(text):
        if not any(start <= m.start() < end for start, end in fences):
            yield m


def parse_spec(spec: str, where: str) -> tuple[str, str, list[str], bool]:
    """'NAME KIND [ARG] [optional]' -> (name, kind, args, optional)."""
    words = spec.split()
    optional = bool(words) and words[-1] == "optional"
    words = words[:-1] if optional else words
    if len(words) < 2 or words[1] not in KINDS:
        raise RenderError(f"{where}: bad marker '<!-- results: {spec} -->'; expected "
                          f"'<!-- results: NAME KIND [ARG] [optional] -->' with KIND one of {', '.join(KINDS)}")
    if (words[1] == "summary") != (words[0] == "all"):
        raise RenderError(f"{where}: the summary block is '<!-- results: all summary -->'; got '{spec}'")
    return words[0], words[1], words[2:], optional


def _slug(title: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    title = re.sub(r"\]\([^)]*\)", "", title).strip().lower()  # a link in a heading: its text only
    return re.sub(r"[^\w\- ]", "", title).replace(" ", "-")


def headings(text: str) -> list[tuple[int, str]]:
    """(offset, GitHub anchor) of every heading outside ``` fences; repeats get -1, -2, ..."""
    fences, found, seen = _fences(text), [], {}
    for h in HEADING.finditer(text):
        if not any(start <= h.start() < end for start, end in fences):
            slug = _slug(h.group(2))
            found.append((h.start(), slug if slug not in seen else f"{slug}-{seen[slug]}"))
            seen[slug] = seen.get(slug, 0) + 1
    return found


def blocks(text: str, where: str) -> list[tuple[int, int, str, str]]:
    """(start, end, spec, anchor of the heading above) of every block; end is past the closing marker."""
    anchors = headings(text)
    found = []
    for m in _outside_fences(text):
        end = text.find(CLOSE, m.end())
        following = OPEN.search(text, m.end())
        if end < 0 or (following and following.start() < end):
            raise RenderError(f"{where}: '<!-- results: {m['spec']} -->' has no '{CLOSE}' before the next block")
        anchor = next((slug for pos, slug in reversed(anchors) if pos < m.start()), "")
        found.append((m.start(), end + len(CLOSE), m["spec"], anchor))
    return found


class Renderer:
    """Renders blocks from the results files under `results_dir`, for docs under `root`."""

    def __init__(self, results_dir: Path, root: Path):
        self.results_dir, self.root = results_dir, root
        self.rel_results = Path(os.path.relpath(results_dir.resolve(), root.resolve())).as_posix()
        self.sections: dict[str, tuple[tuple, Path, str]] = {}  # NAME -> (rank, doc, anchor) for links
        self.missing: list[str] = []  # optional blocks' NAMEs without a results file, sorted
        self.noted: set[tuple[Path, str]] = set()  # (doc, NAME) whose missing file a block already noted

    def command(self, name: str) -> str:
        """The command that publishes experiment NAME's results file."""
        return f"python -m experiments.run experiments/configs/{name}.yaml --out {self.rel_results}/{name}"

    def load(self, name: str) -> dict | None:
        """docs/results/NAME/results.json, or None when it is not there."""
        path = self.results_dir / name / "results.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def index(self, docs: list[Path]) -> None:
        """Where each experiment is discussed (its claims block first, docs/ before the README),
        and which optional blocks have no results file yet."""
        for doc in docs:
            for _, _, spec, anchor in blocks(doc.read_text(), str(doc)):
                name, kind, _, optional = parse_spec(spec, str(doc))
                rank = (doc.name == "README.md", kind != "claims", kind != "table")
                if name != "all" and (name not in self.sections or rank < self.sections[name][0]):
                    self.sections[name] = (rank, doc, anchor)
                if optional and name != "all" and self.load(name) is None and name not in self.missing:
                    self.missing.append(name)
        self.missing.sort()

    def render(self, spec: str, doc: Path) -> str:
        """The text between one block's markers."""
        name, kind, args, optional = parse_spec(spec, str(doc))
        if kind == "summary":
            return self.summary(doc)
        result = self.load(name)
        if result is None:
            if optional:  # one note per experiment and doc; its later blocks stay empty
                first = (doc, name) not in self.noted
                self.noted.add((doc, name))
                return f"No committed results yet: run `{self.command(name)}`" if first else ""
            raise RenderError(f"{doc}: '<!-- results: {spec} -->' names {self.rel_results}/{name}/results.json, "
                              f"which does not exist; run `{self.command(name)}` or mark the block optional")
        if kind == "table":
            return markdown_table(result["runs"]) + self.agreement(result)
        if kind == "claims":
            return claims_table(result["claims"]) if result["claims"] else "No claims in this results file."
        if kind == "sweep":
            return self.sweep(name, result)
        if kind == "startup":
            warm = self.load(args[0]) if args else None
            if warm is None:
                raise RenderError(f"{doc}: '<!-- results: {spec} -->' needs ARG, the warm start's results "
                                  f"file NAME under {self.rel_results}/")
            return startup_table(result, warm)
        if kind == "plot":
            image = self.results_dir / name / (args[0] if args else "throughput_latency.png")
            if not image.is_file():
                raise RenderError(f"{doc}: '<!-- results: {spec} -->': {image} does not exist")
            return f"![{name}]({self.link(image, doc)})"
        return self.provenance(name, result)

    @staticmethod
    def agreement(result: dict) -> str:
        """The lines under a runs table saying which runs gave every request the same tokens:
        `token_agreement` (per run: requests with the reference run's tokens) or the older
        `same_outputs` (per run: all the same or not); empty when the file records neither."""
        if result.get("token_agreement"):
            return "\n\n" + agreement_lines(result["token_agreement"])
        if result.get("same_outputs"):
            first = next(iter(result["same_outputs"]))
            cells = ", ".join(f"`{run}` {'yes' if same else 'NO'}" for run, same in result["same_outputs"].items())
            return f"\n\nSame tokens for every request as run `{first}`: {cells}."
        return ""

    def link(self, target: Path, doc: Path) -> str:
        """target as a relative link from doc's folder."""
        return Path(os.path.relpath(target.resolve(), doc.parent.resolve())).as_posix()

    def provenance(self, name: str, result: dict) -> str:
        """One line: where and how the file was measured."""
        prov = result.get("provenance")
        if not prov:
            return f"No provenance recorded in {self.rel_results}/{name}/results.json."
        dirty = " (uncommitted changes)" if prov.get("git_dirty") else ""
        date = (prov.get("date_utc") or "?")[:16].replace("T", " ")
        return (f"Measured at commit `{prov.get('git_commit_short')}`{dirty}, {date} UTC, jax "
                f"{prov.get('packages', {}).get('jax')}, {prov.get('xla_cpu_count')} of {prov.get('cpu_count')} "
                f"CPUs ({prov.get('cpu_model')}), backend {prov.get('jax_backend')}: `{' '.join(prov.get('command', []))}`")

    def sweep(self, name: str, result: dict) -> str:
        """The harness's sweep table; the latency bound comes from the results file, else the config."""
        bound = result.get("latency_bound_s_per_token")
        config_path = self.root / "experiments" / "configs" / f"{result['experiment']}.yaml"
        if bound is None and config_path.is_file():
            bound = (yaml.safe_load(config_path.read_text()) or {}).get("latency_bound_s_per_token")
        rates = list(dict.fromkeys(run["config"]["request_rate"] for run in result["runs"]))
        names = list(dict.fromkeys(run["config"]["name"] for run in result["runs"]))
        config = SimpleNamespace(request_rates=rates, latency_bound_s_per_token=1.0 if bound is None else bound,
                                 runs=[SimpleNamespace(name=n) for n in names])
        return sweep_table(config, result["runs"])

    def summary(self, doc: Path) -> str:
        """Every claim of every experiment's results file (paper vs ours, linked to its section),
        then a line naming the experiments whose optional blocks still wait for a results file. A
        folder not named after its experiment (another run of the same config, e.g. a warm start)
        adds no rows: each claim appears once."""
        rows = []
        for path in sorted(self.results_dir.glob("*/results.json")):
            name, result = path.parent.name, json.loads(path.read_text())
            if result.get("experiment") != name:
                continue
            _, section_doc, anchor = self.sections.get(name, (None, None, ""))
            where = f"[{name}]({self.link(section_doc, doc)}#{anchor})" if section_doc else name
            for c in result.get("claims", []):
                rows.append(f"| {c['claim']} | {c['source']} | {c['paper']} | {c['ours']:.3g} | {c['unit']} | {where} |")
        lines = (["| claim | source | paper | ours | unit | details |", "|---|---|---|---|---|---|", *rows]
                 if rows else ["No committed results with claims yet."])
        if self.missing:
            lines += ["", "No committed results yet for: " + ", ".join(
                f"[{n}]({self.link(self.sections[n][1], doc)}#{self.sections[n][2]})" for n in self.missing) + "."]
        return "\n".join(lines)


def startup_table(cold: dict, warm: dict) -> str:
    """Seconds to the first timed request, cold start vs warm start: loading the model and the
    workload (`load_s`), then each run as if it ran first (`load_s` + its `startup_s`). The first
    run's row is the job's own first timed request."""
    rows = [("load (model + workload)", cold["load_s"], warm["load_s"])]
    warm_runs = {run["name"]: run["metrics"] for run in warm["runs"]}
    for i, run in enumerate(cold["runs"]):
        if run["name"] in warm_runs:
            label = f"load + `{run['name']}` startup" + (" (the job's first timed request)" if i == 0 else "")
            rows.append((label, cold["load_s"] + run["metrics"]["startup_s"],
                         warm["load_s"] + warm_runs[run["name"]]["startup_s"]))
    lines = ["| seconds to | cold start | warm start | cold / warm |", "|---|---|---|---|"]
    lines += [f"| {label} | {c:.1f} | {w:.1f} | {c / w:.1f}x |" for label, c, w in rows]
    return "\n".join(lines)


def render_text(text: str, doc: Path, renderer: Renderer) -> str:
    """text with every block re-rendered."""
    out, pos = [], 0
    for start, end, spec, _ in blocks(text, str(doc)):
        out += [text[pos:start], f"<!-- results: {spec} -->\n{renderer.render(spec, doc)}\n{CLOSE}"]
        pos = end
    return "".join(out) + text[pos:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results_dir", type=Path, help="folder of committed results, e.g. docs/results/")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 when a block is stale")
    parser.add_argument("--root", type=Path, default=Path("."), help="repository root holding README.md and docs/")
    args = parser.parse_args(argv)
    docs = doc_files(args.root)
    renderer = Renderer(args.results_dir, args.root)
    try:
        renderer.index(docs)
        rendered = {doc: render_text(doc.read_text(), doc, renderer) for doc in docs}
    except RenderError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    stale = [doc for doc in docs if rendered[doc] != doc.read_text()]
    if args.check:
        for doc in stale:
            sys.stdout.writelines(difflib.unified_diff(doc.read_text().splitlines(True), rendered[doc].splitlines(True),
                                                       f"{doc} (committed)", f"{doc} (rendered from {args.results_dir})"))
        print(f"{len(stale)} of {len(docs)} files have stale result blocks" if stale else "all result blocks match")
        return 1 if stale else 0
    for doc in stale:
        doc.write_text(rendered[doc])
    print(f"updated {', '.join(map(str, stale))}" if stale else "all result blocks already match")
    return 0


if __name__ == "__main__":
    sys.exit(main())
