"""The runtime's floors, read from its imports (every `import`, lazy ones in functions too): each module
imports only its own floor or those below, the module graph has no cycle, and nothing of the workstation
(exporter, sim, devtools, torch, ray) is imported by what ships to the robot."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUNTIME = ROOT / "runtime"

# Bottom to top. A module imports only modules on its own floor or below.
FLOORS = [
    ("runtime.errors", "runtime.npu"),
    ("runtime.bundle",),
    ("runtime.pipeline",),
    ("runtime.backends",),
    ("runtime.engine",),
    ("runtime.daemon",),
    ("runtime.cli",),
]
WORKSTATION = ("exporter", "sim", "devtools", "benchmarks", "torch", "transformers", "jax", "ray", "tests")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def floor_of(module: str) -> int:
    if module == "runtime":  # the package's own __init__: a docstring
        return 0
    for index, prefixes in enumerate(FLOORS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return index
    raise AssertionError(f"{module} is on no floor: add it to FLOORS in {__file__}")


def imports_of(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            # `from runtime.pipeline import transforms` imports the module runtime.pipeline.transforms
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


MODULES = {module_name(path): path for path in sorted(RUNTIME.rglob("*.py"))}


def runtime_imports(module: str) -> set[str]:
    return {name for name in imports_of(MODULES[module]) if name in MODULES and name != module}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_each_module_imports_only_its_floor_and_below(module: str) -> None:
    floor = floor_of(module)
    upward = {name: floor_of(name) for name in runtime_imports(module) if floor_of(name) > floor}
    assert not upward, f"{module} (floor {floor}) imports from above: {upward}"
    workstation = {n for n in imports_of(MODULES[module]) if n.split(".")[0] in WORKSTATION}
    assert not workstation, f"{module} imports workstation code: {sorted(workstation)}"


def test_the_module_graph_has_no_cycle() -> None:
    graph = {module: runtime_imports(module) for module in MODULES}
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            cycle = [*path[path.index(module) :], module]
            raise AssertionError(" -> ".join(cycle))
        if module in done:
            return
        for name in sorted(graph[module]):
            visit(name, [*path, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])


def test_the_floors_are_folders() -> None:
    """The layers are visible in the tree: one folder per floor between the format and the daemon."""
    for package in ("bundle", "pipeline", "backends", "daemon"):
        assert (RUNTIME / package / "__init__.py").is_file(), package
    loose = sorted(p.name for p in RUNTIME.glob("*.py"))
    assert loose == ["__init__.py", "cli.py", "engine.py", "errors.py", "npu.py"], loose
