"""The package layout: imports point one way along the pipeline, and no module cycle exists.

Reads every module's imports with ``ast`` (lazy imports inside functions included), so it
runs in milliseconds and imports nothing.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "lora_kit"

# Lower layers never import higher ones. Within a layer, packages do not import each other.
LAYERS = [
    {"__init__", "errors", "paths", "logs"},
    {"chat", "models"},
    {"adapters"},
    {"registry"},
    {"engine"},
    {"evaluation"},
    {"training"},
    {"server"},
    {"cli"},
    {"__main__"},
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The lora_kit modules ``path`` imports: ``from lora_kit.x import y`` is module ``lora_kit.x.y``
    when that is a module, else module ``lora_kit.x`` (y is a name defined there)."""
    found: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("lora_kit"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lora_kit"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
    return found & modules


def _runtime_nodes(tree: ast.AST):
    """Every node but those under ``if TYPE_CHECKING:`` (annotations only, never executed)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and getattr(child.test, "id", None) == "TYPE_CHECKING":
                stack.extend(child.orelse)
                continue
            stack.append(child)


def graph() -> dict[str, set[str]]:
    """Module -> the lora_kit modules it imports (at the top or inside functions)."""
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: imports_of(path, set(paths)) - {name} for name, path in paths.items()}


def top_package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"  # lora_kit itself: only __version__


def layer_of(package: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if package in layer)


def test_every_package_has_a_layer():
    packages = {top_package(m) for m in graph()}
    assert packages <= set().union(*LAYERS), f"add {packages - set().union(*LAYERS)} to LAYERS"


def test_imports_point_down_the_pipeline():
    wrong = []
    for module, targets in graph().items():
        src = top_package(module)
        for target in targets:
            dst = top_package(target)
            if src != dst and layer_of(dst) >= layer_of(src) and dst != "__init__":
                wrong.append(f"{module} -> {target}")
    assert wrong == []


def test_no_import_cycle_between_modules():
    edges = graph()
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert cycles == []
