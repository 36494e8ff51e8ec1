"""The installed packages' import graph: no module imports itself through others, and the parts meet only through
fleet.config, fleet.store and fleet.notify (the wire contract, the database, the notification channels)."""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

PARTS = ("fleet.agent", "fleet.broker", "fleet.collector", "fleet.web")
SHARED = ("fleet.config", "fleet.store", "fleet.notify")


def _modules() -> dict[str, Path]:
    """Every module of the installed fleet package, by dotted name, with its source file."""
    found = {}
    # The parts' folders are mapped into fleet.<part> by the install, so each is walked from its own path.
    for package in ("fleet", *SHARED, *PARTS):
        module = importlib.import_module(package)
        found[package] = Path(module.__file__ or "")
        for info in pkgutil.walk_packages(module.__path__, f"{package}."):
            spec = importlib.util.find_spec(info.name)
            assert spec is not None, info.name
            assert spec.origin is not None, info.name
            found[info.name] = Path(spec.origin)
    return found


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """The tree's nodes, less what runs only for the type checker (``if TYPE_CHECKING:`` blocks)."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    return [node for node in ast.walk(tree) if id(node) not in skipped]


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The fleet modules ``name`` imports, at module level or inside functions."""
    out: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names if alias.name in modules)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            for alias in node.names:
                target = f"{base}.{alias.name}"
                if target in modules:
                    out.add(target)
                elif base in modules:
                    out.add(base)
    out.discard(name)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
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
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def _part(module: str) -> str:
    return ".".join(module.split(".")[:2])


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_itself_through_others():
    graph = _graph()
    assert "fleet.store.database" in graph
    assert "fleet.collector.alerts.engine" in graph
    assert _cycles(graph) == []


def test_parts_meet_only_through_the_contract_and_the_store():
    crossings = sorted(f"{module} imports {target}" for module, targets in _graph().items() for target in targets
                       if _part(module) in PARTS + SHARED and _part(target) in PARTS and _part(target) != _part(module))
    assert crossings == []
