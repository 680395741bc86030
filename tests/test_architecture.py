"""The layout holds: one package per stage, imports running one way down the pipeline.

Every ``import`` in ``mpsearch/`` (at module level, inside functions and under
``TYPE_CHECKING`` alike) is read with ``ast`` into a networkx graph of modules. The tests fail
on an import loop between modules, on an import from a lower layer to a higher one, on a
package that imports what its ``__init__`` docstring does not allow, and on modules left loose
at the top of the package. ``docs/architecture.md`` draws the same layers.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import networkx as nx
import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mpsearch"

# Lowest first: a package may import only packages below it (and its own modules).
LAYERS = ("core", "data", "graph", "quant", "hw", "export", "sensitivity", "solve", "device",
          "report", "job", "cli")
TOP = ("mpsearch", "mpsearch.__main__")  # the public API and `python -m mpsearch`: above all


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The mpsearch modules ``name`` imports (``from a.b import c`` counts as ``a.b.c`` when
    that is a module, else as ``a.b``)."""
    out: set[str] = set()
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "mpsearch")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[:len(base) - node.level + (1 if is_pkg else 0)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "mpsearch":
                continue
            for a in node.names:
                out.add(f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod)
    return {m for m in out if m != name}


def _graph() -> nx.DiGraph:
    mods = _modules()
    g = nx.DiGraph()
    g.add_nodes_from(mods)
    for name, path in mods.items():
        for dst in _imports(name, path, set(mods)):
            assert dst in mods, f"{name} imports {dst}, which is not a module of mpsearch"
            g.add_edge(name, dst)
    return g


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


GRAPH = _graph()


def test_every_module_belongs_to_a_layer():
    loose = [m for m in GRAPH if _layer(m) is None and m not in TOP]
    assert not loose, f"modules outside the layered packages: {loose}"
    assert {m.split(".")[1] for m in GRAPH if m not in TOP} == set(LAYERS)


def test_no_import_cycles():
    cycles = [sorted(c) for c in nx.strongly_connected_components(GRAPH) if len(c) > 1]
    assert not cycles, f"import loops: {cycles}"


def test_imports_run_down_the_layers():
    rank = {p: i for i, p in enumerate(LAYERS)}
    upward = [(a, b) for a, b in GRAPH.edges
              if a not in TOP and (b in TOP or rank[_layer(b)] > rank[_layer(a)])]
    assert not upward, "imports from a lower layer to a higher one: " + ", ".join(
        f"{a} -> {b}" for a, b in upward)


def test_package_inits_only_describe():
    """A package's ``__init__`` says what it owns and imports nothing: a package is entered
    through its modules, so importing one never loads its siblings (or cvxpy, or torch)."""
    for layer in LAYERS:
        name = f"mpsearch.{layer}"
        assert not list(GRAPH.successors(name)), f"{name}/__init__.py imports modules"
        assert ast.get_docstring(ast.parse((PACKAGE / layer / "__init__.py").read_text())), \
            f"{name}/__init__.py has no docstring"


@pytest.mark.parametrize("layer", LAYERS)
def test_each_package_imports_only_what_its_docstring_allows(layer):
    """Each ``__init__`` docstring ends with ``May import: a, b, ...`` (or ``nothing``): the
    contract, checked against the code and against the layer order."""
    doc = ast.get_docstring(ast.parse((PACKAGE / layer / "__init__.py").read_text()))
    found = re.search(r"May import: ([^.\n]+)\.", doc or "")
    assert found, f"mpsearch/{layer}/__init__.py does not say what it may import"
    allowed = set() if found.group(1).strip() == "nothing" else {
        p.strip() for p in found.group(1).split(",")}
    assert allowed <= set(LAYERS[:LAYERS.index(layer)]), \
        f"{layer} may import only lower layers, its docstring says {sorted(allowed)}"
    used = {_layer(b) for a, b in GRAPH.edges if _layer(a) == layer and _layer(b) != layer}
    assert used <= allowed, f"{layer} imports {sorted(used - allowed)} beyond its docstring"


def test_the_checker_sees_function_level_and_relative_imports(tmp_path):
    """The checker can fail: an import inside a function, and a relative one, are edges."""
    pkg = tmp_path / "mpsearch" / "core"
    pkg.mkdir(parents=True)
    src = pkg / "x.py"
    src.write_text("def f():\n    from mpsearch.job import search\n"
                   "from .errors import UsageError\n")
    known = {"mpsearch.job", "mpsearch.job.search", "mpsearch.core.errors"}
    assert _imports("mpsearch.core.x", src, known) == {"mpsearch.job.search",
                                                       "mpsearch.core.errors"}
