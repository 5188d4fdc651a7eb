"""The import graph of gateway/: no import circle, and the store imports no stage.

Read from the source with `ast` (nothing is imported), so an import inside a function
counts as much as one at the top: a circle through a function-level import is still a
circle, only hidden until that function first runs.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

GATEWAY = Path(__file__).resolve().parent.parent / "gateway"

# The stages (issue 10): what a message or a command goes through, and the infrastructure
# that serves them (the parser pool, bounce reading, mail building). The store sits below
# them all; it may use value types (gateway.model) and pure helpers (gateway.lookalike).
STAGES = frozenset(
    f"gateway.{name}"
    for name in (
        "pipeline",
        "policy",
        "tickets",
        "classify",
        "authn",
        "notify",
        "render",
        "quarantine",
        "server",
        "cli",
        "app",
        "scheduler",
        "outbox",
        "inbound",
        "readable",
        "parserpool",
        "bounce",
        "mailbuild",
        "urgency",
        "upset",
    )
)


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph(root: Path) -> dict[str, set[str]]:
    """module -> the modules of the same package it imports (anywhere in its source)."""
    files = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                # `from . import store` names a module; `from .store import Writer` a name
                # in one.
                targets = [
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base
                    for alias in node.names
                ]
            else:
                continue
            for target in targets:
                # `import gateway.store.messages` imports that module; a name imported
                # from a module belongs to the longest module prefix we have.
                while target and target not in files:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def circles(graph: Mapping[str, Iterable[str]]) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def reachable(graph: Mapping[str, Iterable[str]], start: str) -> dict[str, str]:
    """Every module `start` imports, directly or not -> the module that imports it."""
    via: dict[str, str] = {}
    todo = [start]
    while todo:
        node = todo.pop()
        for nxt in graph.get(node, ()):
            if nxt not in via and nxt != start:
                via[nxt] = node
                todo.append(nxt)
    return via


def describe(circle: frozenset[str], graph: Mapping[str, Iterable[str]]) -> str:
    edges = sorted(f"{a} -> {b}" for a in circle for b in graph[a] if b in circle)
    return "{" + ", ".join(sorted(circle)) + "}: " + "; ".join(edges)


def test_no_import_circle_in_gateway() -> None:
    graph = import_graph(GATEWAY)
    assert "gateway.store.writer" in graph  # the walk sees the store package
    found = [describe(c, graph) for c in circles(graph)]
    assert not found, "import circles: " + " | ".join(found)


def test_delivery_does_not_import_planning() -> None:
    # The outbox builds mail (mailbuild); which mail to send is planning's (notify).
    graph = import_graph(GATEWAY)
    assert "gateway.mailbuild" in graph["gateway.outbox"]
    assert "gateway.notify" not in reachable(graph, "gateway.outbox")


def test_the_store_imports_no_stage() -> None:
    graph = import_graph(GATEWAY)
    store = sorted(
        name for name in graph if name == "gateway.store" or name.startswith("gateway.store.")
    )
    assert len(store) > 5
    problems = []
    for module in store:
        via = reachable(graph, module)
        for stage in sorted(STAGES & via.keys()):
            path = [stage]
            while path[-1] != module:
                path.append(via[path[-1]])
            problems.append(" -> ".join(reversed(path)))
    assert not problems, "the store imports a stage: " + "; ".join(problems)


def test_the_graph_sees_every_kind_of_import(tmp_path: Path) -> None:
    """The checks above can only be as good as the graph: a circle made of relative,
    absolute and function-level imports is found, and a package's submodule is told
    apart from the top-level module of the same name."""
    root = tmp_path / "gateway"
    (root / "store").mkdir(parents=True)
    sources = {
        "__init__.py": "",
        "tickets.py": "def f():\n    from gateway import app\n",
        "app.py": "import gateway.store.messages\n",
        "model.py": "",
        "store/__init__.py": "from .messages import Row\nfrom . import tickets\n",
        "store/messages.py": "from ..model import X\nfrom .. import tickets\n",
        "store/tickets.py": "from ..model import Y\n",
    }
    for name, text in sources.items():
        (root / name).write_text(text)
    graph = import_graph(root)
    assert graph["gateway.store"] == {"gateway.store.messages", "gateway.store.tickets"}
    assert graph["gateway.store.messages"] == {"gateway.model", "gateway.tickets"}
    assert graph["gateway.store.tickets"] == {"gateway.model"}
    assert circles(graph) == [
        frozenset({"gateway.tickets", "gateway.app", "gateway.store.messages"})
    ]
    assert "gateway.tickets" in reachable(graph, "gateway.store")
    assert "gateway.tickets" not in reachable(graph, "gateway.store.tickets")
