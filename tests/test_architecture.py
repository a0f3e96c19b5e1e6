"""Acceptance checks of the package's shape (issue 9): no import cycle inside ``batchmates``, small source files,
and the floors of docs/ARCHITECTURE.md (lower floors never import upper ones).

The import graph is read from the source with ``ast`` (nothing is imported). Its rule:

* a node is a module of ``src/batchmates``; a package is its ``__init__.py``;
* ``import batchmates.a.b`` and ``from batchmates.a.b import c`` give an edge to ``batchmates.a.b``, to
  ``batchmates.a.b.c`` when that is a module, and to every package on the way (``batchmates.a``: importing a
  module runs its packages' ``__init__`` first), except the importing module's own ancestor packages (they are
  already being imported when it runs) and the root ``batchmates`` (every module's ancestor);
* relative imports are resolved against the importing module's package;
* imports inside functions count too (a deferred import still closes a circle: the issue's ``methods`` ->
  ``config`` -> ``methods`` circle ran through a function), imports under ``if TYPE_CHECKING:`` do not (they never
  run).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
MAX_LINES = 450


def _modules() -> dict[str, tuple[Path, bool]]:
    out = {}
    for path in sorted((SRC / "batchmates").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return out


def _type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child):
                for stmt in child.orelse:
                    visit_one(stmt)
            else:
                visit_one(child)

    def visit_one(node: ast.AST) -> None:
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        visit(node)

    visit(tree)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the ``batchmates`` modules it imports, by the rule of the module docstring."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, (path, is_pkg) in mods.items():
        package = mod if is_pkg else mod.rsplit(".", 1)[0]
        for node in _import_nodes(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                targets = [source] + [f"{source}.{a.name}" for a in node.names]
            for target in targets:
                parts = target.split(".")
                for i in range(2, len(parts) + 1):
                    name = ".".join(parts[:i])
                    if name in mods and name != mod and not mod.startswith(name + "."):
                        graph[mod].add(name)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    component.append(top)
                    if top == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_counts_package_inits_and_function_level_imports():
    graph = import_graph()
    # `from batchmates.nn.ba2m import BA2M` in models/layers runs batchmates/nn/__init__.py first
    assert {"batchmates.nn", "batchmates.nn.ba2m"} <= graph["batchmates.models.layers"]
    # the bench runner imports batchmates.io inside its functions only (the CLI imports the runner for its table)
    assert "batchmates.io" in graph["batchmates.bench.runner"]
    # imports under `if TYPE_CHECKING:` never run and do not count; imports in functions (and else-branches) do
    code = "if TYPE_CHECKING:\n import batchmates.x\nelse:\n import batchmates.y\ndef f():\n import batchmates.z\n"
    assert [a.name for n in _import_nodes(ast.parse(code)) for a in n.names] == ["batchmates.y", "batchmates.z"]


def test_no_import_cycle_inside_batchmates():
    cycles = _cycles(import_graph())
    assert not cycles, "import cycles (each line one strongly connected set of modules):\n" + "\n".join(
        " <-> ".join(c) for c in cycles
    )


def test_no_source_file_over_450_lines():
    long = {
        str(p.relative_to(SRC)): n
        for p in sorted((SRC / "batchmates").rglob("*.py"))
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert not long, f"source files over {MAX_LINES} lines (split them): {long}"


# Floors (docs/ARCHITECTURE.md): a module may import its own floor and the floors below it, never above.
FLOORS: dict[str, int] = {
    # 0: vocabulary and plumbing
    "registry": 0, "distributed": 0, "_checks": 0, "io": 0, "options": 0, "schema": 0, "config": 0,
    "seeding": 0,
    # 1: the building blocks
    "losses": 1, "nn": 1, "curation": 1, "data": 1, "optim": 1,
    # 2: backbones (they import the layers they register)
    "models": 2,
    # 3: trainable methods
    "methods": 3,
    # 4: the trainer, benchmarks, test helpers, export
    "training": 4, "bench": 4, "testing": 4, "export": 4,
    # 5: the command line
    "cli": 5, "cli_takeout": 5, "__main__": 5,
}  # fmt: skip


def _floor(module: str) -> int | None:
    parts = module.split(".")
    return FLOORS.get(parts[1]) if len(parts) > 1 else None


@pytest.mark.parametrize("floor", sorted(set(FLOORS.values()))[:-1])
def test_floors_import_only_downwards(floor):
    graph = import_graph()
    upward = sorted(
        f"{m} -> {t}"
        for m, targets in graph.items()
        if _floor(m) == floor
        for t in targets
        if (tf := _floor(t)) is not None and tf > floor
    )
    assert not upward, f"floor {floor} imports an upper floor:\n" + "\n".join(upward)


def test_every_top_level_module_has_a_floor():
    tops = {m.split(".")[1] for m in _modules() if m.count(".") >= 1}
    assert tops <= set(FLOORS), f"add {sorted(tops - set(FLOORS))} to FLOORS and to docs/ARCHITECTURE.md"


def test_importing_nn_builds_no_backbone():
    """Registries point down: ``batchmates.nn`` imports nothing of ``batchmates.models`` (in a fresh process)."""
    import subprocess
    import sys

    code = "import sys, batchmates.nn; print(sorted(m for m in sys.modules if m.startswith('batchmates.models')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", f"importing batchmates.nn imported {out}"
