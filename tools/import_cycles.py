"""Find import cycles between the modules of a package; exit 1 and print them if there is one.

    python tools/import_cycles.py [PACKAGE_DIR]     (default: keeplora_hf)

Reads the source (nothing is imported). An edge A -> B is any import of B in A, at module level or inside a function
(a deferred import still ties the two modules together); imports under `if TYPE_CHECKING:` never run and are skipped.
Importing `a.b.c` runs the package `a.b` as well, so it counts as an edge to `a.b` too, except to A's own parent
packages, which are always initialised before A runs.
"""

from __future__ import annotations

import ast
import sys
from collections import deque
from pathlib import Path


def module_names(package_dir: Path) -> dict[str, Path]:
    """Dotted module name -> source file, for every module of the package."""
    root = package_dir.parent
    names = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def imports(name: str, path: Path, modules: dict[str, Path]) -> dict[str, bool]:
    """The package modules `name` imports -> whether every such import is deferred (inside a function)."""
    is_package = path.name == "__init__.py"
    edges: dict[str, bool] = {}

    def add(target: str, deferred: bool) -> None:
        parts = target.split(".")
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            if prefix in modules and prefix != name and not name.startswith(prefix + "."):
                edges[prefix] = edges.get(prefix, True) and deferred

    def visit(node: ast.AST, deferred: bool) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            children = node.orelse  # the body never runs
        else:
            children = list(ast.iter_child_nodes(node))
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, deferred)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(name, is_package, node.module, node.level)
            add(base, deferred)
            for alias in node.names:
                if f"{base}.{alias.name}" in modules:
                    add(f"{base}.{alias.name}", deferred)
        deferred = deferred or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in children:
            visit(child, deferred)

    visit(ast.parse(path.read_text(encoding="utf-8"), str(path)), False)
    return edges


def _absolute(name: str, is_package: bool, module: str | None, level: int) -> str:
    if level == 0:
        return module or ""
    parts = name.split(".")
    base = parts if is_package else parts[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def strongly_connected(graph: dict[str, dict[str, bool]]) -> list[list[str]]:
    """Tarjan's components with more than one module (a module never imports itself here)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
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
                    components.append(sorted(component))
    return components


def shortest_cycle(graph: dict[str, dict[str, bool]], component: list[str]) -> list[str]:
    """A shortest cycle through the first module of the component, as the list of modules around it."""
    start, members = component[0], set(component)
    parent: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for child in sorted(graph[node]):
            if child not in members:
                continue
            if child == start:
                path = [node]
                while path[-1] != start:
                    path.append(parent[path[-1]])
                return [*reversed(path), start]
            if child not in parent:
                parent[child] = node
                queue.append(child)
    return [start]


def main(argv: list[str]) -> int:
    package_dir = Path(argv[0]) if argv else Path(__file__).resolve().parent.parent / "keeplora_hf"
    modules = module_names(package_dir)
    graph = {name: imports(name, path, modules) for name, path in modules.items()}
    components = strongly_connected(graph)
    edges = sum(len(targets) for targets in graph.values())
    print(f"{len(modules)} modules, {edges} import edges, {len(components)} cycle(s)")
    for component in components:
        cycle = shortest_cycle(graph, component)
        steps = [f"{a} -> {b}" + (" (in a function)" if graph[a][b] else "") for a, b in zip(cycle, cycle[1:])]
        print(f"cycle among {', '.join(component)}:\n    " + "\n    ".join(steps))
    return 1 if components else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
