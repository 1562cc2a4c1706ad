"""The ops modules import each other in one direction: no circle, counting imports inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

import freezekern.ops

OPS_DIR = Path(freezekern.ops.__file__).parent
PACKAGE = "freezekern.ops"


def _imports(path: Path) -> set[str]:
    """The freezekern.ops modules that ``path`` imports, at any depth of its code."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == PACKAGE:
                found.update(f"{PACKAGE}.{alias.name}" for alias in node.names)
            elif node.module.startswith(PACKAGE + "."):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith(PACKAGE + "."))
    return found


def _graph() -> dict[str, set[str]]:
    modules = {f"{PACKAGE}.{p.stem}": p for p in OPS_DIR.glob("*.py") if p.stem != "__init__"}
    return {name: _imports(path) & modules.keys() for name, path in modules.items()}


def test_ops_modules_form_no_import_circle():
    graph = _graph()
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for dep in sorted(graph[name]):
            if state.get(dep) == "open":
                raise AssertionError("import circle: " + " -> ".join(path[path.index(dep):] + [dep]))
            if dep not in state:
                visit(dep, path + [dep])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_native_loader_imports_no_other_ops_module():
    """Only the fake kernels' argument checks, a leaf that imports nothing of the package."""
    graph = _graph()
    assert graph[f"{PACKAGE}.native"] <= {f"{PACKAGE}.fake_checks"}
    assert graph.get(f"{PACKAGE}.fake_checks", set()) == set()


def _private_uses(path: Path) -> list[str]:
    """Private names (``_x``) of other ops modules that ``path`` imports or reads as ``module._x``."""
    tree = ast.parse(path.read_text())
    aliases, found = {}, []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == PACKAGE:
            aliases.update({alias.asname or alias.name: alias.name for alias in node.names})
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(PACKAGE + "."):
            found += [f"{node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
        elif isinstance(node, ast.Import):
            aliases.update({a.asname: a.name.rsplit(".", 1)[1] for a in node.names
                            if a.asname and a.name.startswith(PACKAGE + ".")})
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            found.append(f"{aliases[node.value.id]}.{node.attr}")
    return found


def test_no_ops_module_reaches_into_another_ones_private_names():
    reaching = {p.name: uses for p in OPS_DIR.glob("*.py") if (uses := _private_uses(p))}
    assert not reaching, f"private names used across modules: {reaching}"
