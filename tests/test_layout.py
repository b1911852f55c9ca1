"""The package layout: imports point one way along the pipeline, and no module cycle exists.

Reads every module's imports with ``ast`` (lazy imports inside functions and type-only imports
under ``if TYPE_CHECKING:`` included: a cycle of annotations is still a cycle), so it runs in
milliseconds and imports nothing.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "lora_kit"

# Lower layers never import higher ones. Within a layer, packages do not import each other.
LAYERS = [
    {"__init__", "errors", "paths", "logs", "config_cli", "widening"},
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


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The lora_kit modules ``path`` imports: ``from lora_kit.x import y`` is module ``lora_kit.x.y``
    when that is a module, else module ``lora_kit.x`` (y is a name defined there)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("lora_kit"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lora_kit"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
    return found & modules


def graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the lora_kit modules it imports (at the top, inside functions or for type checking)."""
    paths = {module_name(p, package): p for p in package.rglob("*.py")}
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


def cycles_in(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every import cycle a depth-first walk of ``edges`` meets, each as the path that closes it."""
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
    return cycles


def test_no_import_cycle_between_modules():
    assert cycles_in(graph()) == []


def test_a_type_only_import_cycle_is_a_cycle(tmp_path):
    """The old engine/output.py <-> engine/sequence.py circle: one side imports the other only
    for its annotations, under ``if TYPE_CHECKING:``. The check must see it."""
    engine = tmp_path / "lora_kit" / "engine"
    engine.mkdir(parents=True)
    (tmp_path / "lora_kit" / "__init__.py").write_text("")
    (engine / "__init__.py").write_text("")
    (engine / "sequence.py").write_text("from lora_kit.engine.output import OutputState\n")
    (engine / "output.py").write_text(
        "from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from lora_kit.engine.sequence import Sequence\n"
        "\n\nclass OutputState:\n    pass\n"
    )
    edges = graph(tmp_path / "lora_kit")
    assert edges["lora_kit.engine.output"] == {"lora_kit.engine.sequence"}
    assert cycles_in(edges) == [["lora_kit.engine.output", "lora_kit.engine.sequence", "lora_kit.engine.output"]]
