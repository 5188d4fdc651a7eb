"""No import circle among gateway's modules (issue 10): a module that needs a piece of
another imports it from where it belongs, never by a function-local import around a circle.
Every import counts, at the top of a module or inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "gateway"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in paths}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                graph[name].update(a.name for a in node.names if a.name in paths)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parent + ([base] if base else []))
                # `from . import tickets` names the module gateway.tickets; only a name that
                # is not a module (`from .store import Writer`) is taken from the package.
                modules = {f"{base}.{a.name}" for a in node.names} & set(paths)
                if len(modules) < len(node.names) and base in paths:
                    modules.add(base)
                graph[name].update(modules)
        graph[name].discard(name)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import circle, each as the path that closes it (depth-first search)."""
    found: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        path.append(name)
        for target in sorted(graph[name]):
            if state.get(target) == 1:
                found.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target)
        path.pop()
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)
    return found


def test_the_graph_is_read() -> None:
    graph = import_graph()
    # A few edges that exist, so that a broken reader cannot pass the test below.
    assert "gateway.parserpool" in graph["gateway.app"]
    assert "gateway.bounce" in graph["gateway.classify"]
    assert "gateway.mailbuild" in graph["gateway.outbox"]
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_no_import_circle() -> None:
    assert circles(import_graph()) == []


def test_delivery_does_not_import_planning() -> None:
    # The outbox builds mail (mailbuild); which mail to send is planning's (notify).
    assert "gateway.notify" not in import_graph()["gateway.outbox"]
