"""Every module of rnnjax imports on its own, and module-level imports inside rnnjax form no cycle.

A cycle among module-level imports works or fails depending on which module a program imports first (the
second module of the cycle sees the first half-initialised), so it is caught statically here, independent of
import order. Imports inside functions and under ``if TYPE_CHECKING:`` are not module-level and may close a
loop; that is how a cycle is broken.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

PACKAGE = "rnnjax"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE


def module_names() -> dict[str, Path]:
    """Dotted name -> file, for every ``.py`` file under ``rnnjax/`` (a package is named by its ``__init__``)."""
    modules = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def test_module_names_cover_the_package():
    modules = module_names()
    assert {PACKAGE, f"{PACKAGE}.cells", f"{PACKAGE}.cells.base", f"{PACKAGE}.unrolling"} <= set(modules)


# Each module imports on its own.

# Runs in a fresh interpreter: for each module, forget every rnnjax module imported so far, then import it alone.
# ``__main__`` modules are included: both guard their command line with ``if __name__ == "__main__"``.
_IMPORT_EACH = """
import importlib, json, sys, traceback
failures = {}
for name in json.loads(sys.argv[1]):
    for loaded in [m for m in sys.modules if m == "rnnjax" or m.startswith("rnnjax.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except BaseException:
        failures[name] = traceback.format_exc(limit=-3)
print(json.dumps(failures))
"""


def test_every_module_imports_on_its_own():
    names = sorted(module_names())
    result = subprocess.run(
        [sys.executable, "-c", _IMPORT_EACH, json.dumps(names)],
        cwd=ROOT.parent,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    failures = json.loads(result.stdout.strip().splitlines()[-1])
    assert not failures, "modules that fail to import on their own:\n" + "\n".join(
        f"{name}:\n{tb}" for name, tb in failures.items()
    )


# No cycles among module-level imports.


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _module_level_imports(body: list[ast.stmt]):
    """Import statements that run when the module is imported: the top level, and inside top-level ``if``,
    ``try`` and ``with`` blocks (except ``if TYPE_CHECKING:``), but not inside functions or classes."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                yield from _module_level_imports(node.body)
            yield from _module_level_imports(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, *(h.body for h in node.handlers), node.orelse, node.finalbody):
                yield from _module_level_imports(block)
        elif isinstance(node, ast.With):
            yield from _module_level_imports(node.body)


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the rnnjax modules it imports at module level.

    ``import rnnjax.a.b`` and ``from rnnjax.a import b`` (``b`` a submodule) point at ``rnnjax.a.b``;
    ``from rnnjax.a import name`` (``name`` not a submodule) points at the package ``rnnjax.a`` (its
    ``__init__``). Importing ``rnnjax.a.b`` also runs ``rnnjax/a/__init__.py`` first, so the packages
    around a target are edges too, except those the importing module sits in (they are initialised before it
    runs): ``rnnjax.checkpoint`` importing ``rnnjax.train.state`` depends on ``rnnjax.train``'s ``__init__``.
    """
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        package = name if is_package else name.rpartition(".")[0]
        edges = graph.setdefault(name, set())
        for node in _module_level_imports(ast.parse(path.read_text(), str(path)).body):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:  # relative: strip (level - 1) trailing parts off the package
                    base_parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(base_parts + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                parts = target.split(".")
                for n in range(1, len(parts) + 1):
                    enclosing = ".".join(parts[:n])
                    if enclosing in modules and not (name == enclosing or name.startswith(enclosing + ".")):
                        edges.add(enclosing)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a closed path ``[a, b, ..., a]``) through each strongly connected component of size > 1."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_through(graph, component) for component in components if len(component) > 1]


def _cycle_through(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest cycle through the component's first module (breadth-first search back to it)."""
    start = min(component)
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if w not in parents:
                    parents[w] = v
                    following.append(w)
        frontier = following
    raise AssertionError(f"no cycle through {start} in {sorted(component)}")


def test_cycle_finder_on_a_known_graph():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"f"}, "f": {"e"}}
    assert sorted(cycles(graph)) == [["a", "b", "c", "a"], ["e", "f", "e"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_import_graph_reads_module_level_imports_only(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("from pkg.sub import thing\n")
    (package / "sub" / "__init__.py").write_text("thing = 1\n")
    (package / "sub" / "leaf.py").write_text(
        "from typing import TYPE_CHECKING\nfrom . import sibling\nif TYPE_CHECKING:\n    import pkg.other\n"
    )
    (package / "sub" / "sibling.py").write_text(
        "def f():\n    import pkg.other\ntry:\n    from .. import other\nexcept ImportError:\n    pass\n"
    )
    (package / "other.py").write_text("import pkg.sub.leaf\n")
    (package / "tools").mkdir()
    (package / "tools" / "__init__.py").write_text("from pkg.tools.one import f\n")
    (package / "tools" / "one.py").write_text("from pkg import loader\ndef f(): ...\n")
    (package / "tools" / "two.py").write_text("")
    (package / "loader.py").write_text("from pkg.tools.two import *\n")  # runs pkg/tools/__init__ first
    modules = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(tmp_path).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = import_graph(modules)
    assert graph == {
        "pkg": {"pkg.sub"},
        "pkg.sub": set(),
        "pkg.sub.leaf": {"pkg.sub.sibling"},
        "pkg.sub.sibling": {"pkg.other"},
        "pkg.other": {"pkg.sub", "pkg.sub.leaf"},
        "pkg.tools": {"pkg.tools.one"},
        "pkg.tools.one": {"pkg.loader"},
        "pkg.tools.two": set(),
        "pkg.loader": {"pkg.tools", "pkg.tools.two"},
    }
    assert sorted(cycles(graph)) == [
        ["pkg.loader", "pkg.tools", "pkg.tools.one", "pkg.loader"],
        ["pkg.other", "pkg.sub.leaf", "pkg.sub.sibling", "pkg.other"],
    ]


def test_no_import_cycles_inside_rnnjax():
    found = cycles(import_graph(module_names()))
    assert not found, "cycles among module-level imports (break each with a function-level import):\n" + "\n".join(
        " -> ".join(cycle) for cycle in found
    )
