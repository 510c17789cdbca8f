"""Imports run one way, from the command line down to the metrics: no module imports a module that depends on it.

Read from the source with ``ast``: every ``import`` of a ``timm_ood`` module, at module level or inside a function
(a lazy import is still a dependency), except those under ``if TYPE_CHECKING:`` (annotations only, never executed).
A package's ``__init__`` re-exporting its submodules is not a dependency of those submodules on the package.
"""

from __future__ import annotations

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "timm_ood"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in PACKAGE.rglob("*.py")}


def _runtime_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _targets(module: str, node: ast.Import | ast.ImportFrom, is_package: bool) -> set[str]:
    """The ``timm_ood`` modules an import statement loads (the nearest known module of each name)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        if node.level:
            base = module.split(".") if is_package else module.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            source = ".".join([*base, *([node.module] if node.module else [])])
        else:
            source = node.module or ""
        names = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in MODULES else source for alias in node.names]
    targets = set()
    for name in names:
        while name not in MODULES and "." in name:
            name = name.rsplit(".", 1)[0]
        if name in MODULES and name.startswith("timm_ood") and name != module:
            targets.add(name)
    return targets


def import_graph() -> dict[str, set[str]]:
    """``module -> the timm_ood modules it imports at run time``."""
    graph = {}
    for module, path in MODULES.items():
        is_package = path.name == "__init__.py"
        graph[module] = {target for node in _runtime_imports(ast.parse(path.read_text(), str(path)))
                         for target in _targets(module, node, is_package)}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (its first module repeated at the end), or None (``graphlib``'s check)."""
    try:
        TopologicalSorter(graph).prepare()
    except CycleError as error:
        return list(error.args[1])
    return None


def test_the_checker_finds_a_cycle_and_a_type_only_import_is_not_one() -> None:
    cycle = find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}})
    assert cycle is not None and set(cycle) == {"a", "b", "c"} and cycle[0] == cycle[-1]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import x\nelse:\n    import y\n"
                     "def f():\n    import z\n")
    assert [alias.name for node in _runtime_imports(tree) for alias in node.names] == ["TYPE_CHECKING", "y", "z"]


def test_no_module_imports_a_module_that_depends_on_it() -> None:
    graph = import_graph()
    for package in [m for m, p in MODULES.items() if p.name == "__init__.py"]:  # re-exports are not dependencies
        graph[package] = {t for t in graph[package] if not t.startswith(package + ".")}
    cycle = find_cycle(graph)
    assert cycle is None, "an import cycle (each module is imported by the next): " + " -> ".join(cycle or [])


def test_the_metrics_are_the_bottom_layer() -> None:
    graph = import_graph()
    for module in (m for m in graph if m.startswith("timm_ood.metrics")):
        assert {t for t in graph[module] if not t.startswith("timm_ood.metrics")} <= {"timm_ood.errors"}, module
