"""The dependency direction (README, Layout), enforced by reading every module's imports with `ast`.

    experiments/, serving/ -> continuous_batching/ -> distributed/ -> models/
        -> paged_attention/, kernel_fusion/, quantization/ -> jax, numpy
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

_OPS = {"paged_attention", "kernel_fusion", "quantization"}
# package -> the other project packages it may import (its own modules are always allowed)
ALLOWED_IMPORTS: dict[str, set[str]] = {
    "experiments": {"continuous_batching", "distributed", "models", *_OPS},
    "serving": {"continuous_batching", "distributed", "models", *_OPS},  # beside experiments
    "continuous_batching": {"distributed", "models", *_OPS},
    "distributed": {"models", *_OPS},
    "models": set(_OPS),  # never distributed: sharding is applied from outside
    "paged_attention": {"quantization"},  # the one edge between op packages (quantized KV cache)
    "kernel_fusion": set(),
    "quantization": set(),
}
PACKAGES = tuple(ALLOWED_IMPORTS)

# host-side code: no JAX at all, directly or through project modules (checked once the file exists).
# experiments/config.py is here so a bad YAML key is reported at once, before JAX loads.
HOST_ONLY = ("experiments/config.py", "paged_attention/block_manager.py",
             "continuous_batching/sampling_params.py", "continuous_batching/scheduler.py",
             "continuous_batching/request.py", "continuous_batching/reservation.py",
             "continuous_batching/engine_config.py", "continuous_batching/stop_checker.py",
             "continuous_batching/beam_search.py", "continuous_batching/step_shapes.py",
             "experiments/config_checks.py", "experiments/metric_names.py",
             "paged_attention/backend_names.py", "paged_attention/buckets.py", "quantization/scheme_names.py")
JAX_MODULES = {"jax", "jaxlib", "flax"}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_file(name: str, root: Path) -> Path | None:
    """The project file that defines module `name`, or None (third-party / missing)."""
    base = root.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(source: str, name: str, is_package: bool = False, root: Path = ROOT) -> set[str]:
    """Absolute names of all modules `source` imports (anywhere in the file, relative ones resolved)."""
    package = name.split(".") if is_package else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            found.add(target)
            for alias in node.names:  # `from pkg import submodule`
                if module_file(f"{target}.{alias.name}", root):
                    found.add(f"{target}.{alias.name}")
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) ==
              "import_module" and node.args and isinstance(node.args[0], ast.Constant)):
            found.add(str(node.args[0].value))
    return {m for m in found if m}


def imports_of_file(path: Path, root: Path) -> set[str]:
    return imported_modules(path.read_text(), module_name(path, root), path.name == "__init__.py", root)


def layer_violations(importer: str, imports: set[str]) -> list[str]:
    """Imports of project packages that `importer`'s package may not use."""
    own = importer.split(".")[0]
    by_package: dict[str, list[str]] = {}
    for target in sorted(imports):
        top = target.split(".")[0]
        if top in ALLOWED_IMPORTS and top != own and top not in ALLOWED_IMPORTS[own]:
            by_package.setdefault(top, []).append(target)
    return [f"{importer} imports {', '.join(targets)} ({own} may import only {sorted(ALLOWED_IMPORTS[own])})"
            for targets in by_package.values()]


def all_violations(root: Path = ROOT) -> list[str]:
    bad = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            bad += layer_violations(module_name(path, root), imports_of_file(path, root))
    return bad


def parents_and_self(name: str) -> list[str]:
    """Importing a.b.c runs a/__init__.py and a/b/__init__.py first."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def jax_import_chains(path: Path, root: Path = ROOT) -> list[str]:
    """Chains `file -> project module -> ... -> jax` by which importing `path` would load JAX."""
    start = module_name(path, root)
    chains, seen = [], set()
    stack = [(m, [m]) for m in parents_and_self(start)]
    while stack:
        name, chain = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        file = module_file(name, root)
        if file is None:
            continue
        for target in sorted(imports_of_file(file, root)):
            if target.split(".")[0] in JAX_MODULES:
                chains.append(" -> ".join(chain + [target]))
            for step in parents_and_self(target):
                if step.split(".")[0] in ALLOWED_IMPORTS:
                    stack.append((step, chain + [step]))
    return chains


# ----- the rules on this repository ---------------------------------------------------------------
def test_table_covers_every_top_level_package():
    on_disk = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests"}
    assert on_disk <= set(PACKAGES), f"add {on_disk - set(PACKAGES)} to ALLOWED_IMPORTS"


def test_scanner_sees_the_project():
    assert "paged_attention.contiguous" in imports_of_file(ROOT / "models/attention.py", ROOT)
    assert "models.gguf_loading" in imports_of_file(ROOT / "models/model.py", ROOT)  # function-level


def test_no_upward_or_sideways_imports():
    assert all_violations() == []


@pytest.mark.parametrize("rel", [f for f in HOST_ONLY if (ROOT / f).is_file()])
def test_host_side_bookkeeping_imports_no_jax(rel):
    assert jax_import_chains(ROOT / rel) == []
    name = module_name(ROOT / rel, ROOT)
    code = f"import sys, {name}; bad = {sorted(JAX_MODULES)!r}; assert not [m for m in bad if m in sys.modules]"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


# ----- the checker catches violations ------------------------------------------------------------
def write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def test_checker_flags_synthetic_violations(tmp_path):
    write(tmp_path, {f"{p}/__init__.py": "" for p in PACKAGES})
    write(tmp_path, {
        "models/llama.py": "from distributed import mesh\nimport paged_attention.kv\n",
        "paged_attention/kv.py": "from quantization import q8\ndef f():\n    import models.config\n",
        "kernel_fusion/norm.py": "from ..quantization import q8\n",  # relative, sideways
        "quantization/q8.py": "import importlib\nimportlib.import_module('continuous_batching.engine')\n",
        "serving/app.py": "from experiments import run\nfrom continuous_batching import engine\n",
        "distributed/mesh.py": "from . import sharding\nfrom models import llama\n",  # both fine
        "distributed/sharding.py": "",
        "continuous_batching/engine.py": "",
    })
    bad = "\n".join(all_violations(tmp_path))
    for expected in ["models.llama imports distributed", "paged_attention.kv imports models.config",
                     "kernel_fusion.norm imports quantization", "quantization.q8 imports continuous_batching",
                     "serving.app imports experiments"]:
        assert expected in bad
    assert len(bad.splitlines()) == 5, bad


def test_checker_follows_project_imports_to_jax(tmp_path):
    write(tmp_path, {
        "continuous_batching/__init__.py": "",
        "continuous_batching/request.py": "import dataclasses\n",
        "continuous_batching/scheduler.py": "from continuous_batching.request import Seq\n"
                                            "from paged_attention.block_manager import BlockManager\n",
        "paged_attention/__init__.py": "from paged_attention import contiguous\n",
        "paged_attention/contiguous.py": "import jax.numpy as jnp\n",
        "paged_attention/block_manager.py": "import numpy as np\n",
    })
    assert jax_import_chains(tmp_path / "continuous_batching/request.py", tmp_path) == []
    chains = jax_import_chains(tmp_path / "continuous_batching/scheduler.py", tmp_path)
    # the block manager itself is clean, but its package __init__ pulls in JAX
    assert "paged_attention -> paged_attention.contiguous -> jax.numpy" in " ".join(chains), chains


# ----- no import circles ---------------------------------------------------------------------------
def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Project module -> the project modules it imports (anywhere in the file, package parents included)."""
    graph: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            name = module_name(path, root)
            targets = {step for target in imports_of_file(path, root) for step in parents_and_self(target)}
            graph[name] = {t for t in targets if module_file(t, root) is not None and t != name
                           and not name.startswith(t + ".")}  # a module's own package runs first anyway
    return graph


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return circles


def test_no_import_circles():
    assert import_circles(import_graph()) == []


def test_circle_checker_finds_a_circle_through_a_function_level_import(tmp_path):
    write(tmp_path, {f"{p}/__init__.py": "" for p in PACKAGES})
    write(tmp_path, {
        "experiments/engines.py": "def make():\n    from experiments import paged\n",
        "experiments/paged.py": "from experiments.engines import make\n",
        "experiments/trace.py": "",
        "experiments/static.py": "from experiments.trace import x\n",
    })
    assert import_circles(import_graph(tmp_path)) == [["experiments.engines", "experiments.paged"]]


def test_backend_names_are_the_backends():
    """The JAX-free name list configs check against is the attention switch's own."""
    from models.attention import BACKENDS as FUNCTIONS
    from paged_attention.backend_names import BACKENDS

    assert set(BACKENDS) == set(FUNCTIONS)
