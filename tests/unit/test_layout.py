"""The package layout's rules: dependencies point one way.

Every import counts, also those inside functions and under `if TYPE_CHECKING:`: a module never imports (directly
or through others) a module that imports it back, nodes know nothing of Celery, and the core's executor protocol
knows no node classes.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("tasktree_dist", "worker", "broker_config")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {
        module_name(path): path
        for package in PACKAGES
        for path in (PACKAGE_ROOT / package).rglob("*.py")
    }


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules `name` imports anywhere in its source; `from pkg import sub` names the submodule."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source
                       for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = all_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def visit(start: str) -> None:
        nonlocal counter
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
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

    for name in sorted(graph):
        if name not in index:
            visit(name)
    return found


def test_no_module_imports_a_module_that_imports_it_back() -> None:
    graph = import_graph()
    assert "tasktree_dist.core.context" in graph and len(graph) > 30
    found = cycles(graph)
    detail = "\n".join(
        " <-> ".join(component) + "\n    " + "\n    ".join(
            f"{a} imports {sorted(graph[a] & set(component))}" for a in component
        )
        for component in found
    )
    assert not found, f"import circles:\n{detail}"


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("tasktree_dist.nodes", ("tasktree_dist.distributed", "tasktree_dist.runs", "celery", "kombu")),
        ("tasktree_dist.core", ("tasktree_dist.distributed", "tasktree_dist.runs", "celery", "kombu")),
        ("tasktree_dist.llm", ("tasktree_dist.distributed", "tasktree_dist.runs", "celery", "kombu")),
        ("tasktree_dist.tracing", ("tasktree_dist.distributed", "celery", "kombu")),
    ],
)
def test_dependencies_point_one_way(package: str, forbidden: tuple[str, ...]) -> None:
    """Nodes, the core and LLM know nothing of Celery or of the distributed/runs packages."""
    modules = all_modules()
    offending = []
    for name, path in modules.items():
        if name != package and not name.startswith(package + "."):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                targets = [node.module or ""]
            resolved = imports_of(name, path, modules) if isinstance(node, ast.ImportFrom) and node.level else set()
            for target in [*targets, *resolved]:
                if any(target == f or target.startswith(f + ".") for f in forbidden):
                    offending.append(f"{name} imports {target}")
    assert not offending, "\n".join(sorted(set(offending)))


def test_executor_protocol_knows_no_node_classes() -> None:
    graph = import_graph()
    assert not {m for m in graph["tasktree_dist.core.executor"] if m.startswith("tasktree_dist.nodes")}


#: The floors, bottom up (DESIGN.md "Layout"): a package imports only packages on floors below it. web and metrics
#: share a floor; cli sits on top (it serves the web app). testing and the package's top-level modules
#: (__init__, _wiring, __main__) sit above everything and may wire any of them.
FLOORS = [
    ("core",), ("nodes",), ("llm",), ("builder",), ("tracing",), ("distributed",), ("runs",), ("web", "metrics"),
    ("cli",),
]


def floor_of(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "tasktree_dist" or len(parts) < 2:
        return None
    for level, packages in enumerate(FLOORS):
        if parts[1] in packages:
            return level
    return None


def test_every_package_imports_only_packages_below_it() -> None:
    graph = import_graph()
    upward = sorted(
        f"{module} (floor {floor_of(module)}) imports {target} (floor {floor_of(target)})"
        for module, targets in graph.items()
        for target in targets
        if floor_of(module) is not None and floor_of(target) is not None and floor_of(target) > floor_of(module)
    )
    assert not upward, "\n".join(upward)


def test_every_library_package_is_on_a_floor() -> None:
    packages = {name.split(".")[1] for name in all_modules() if name.startswith("tasktree_dist.")}
    placed = {package for floor in FLOORS for package in floor}
    assert packages - placed <= {"testing", "_wiring", "__main__"}, sorted(packages - placed)


def test_the_library_never_imports_the_configuration_packages() -> None:
    """worker/ and broker_config/ only wire configuration for `celery -A worker`; the library depends on neither."""
    graph = import_graph()
    offending = sorted(
        f"{module} imports {target}" for module, targets in graph.items() if module.startswith("tasktree_dist.")
        for target in targets if target.split(".")[0] in ("worker", "broker_config")
    )
    assert not offending, "\n".join(offending)
