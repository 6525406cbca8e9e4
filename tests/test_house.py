"""The shape of the house: rooms of a bounded size, services that never import each other, no
import cycle, a runtime library that never reaches into the dev harness, images without it."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 600
PACKAGES = ("libs", "services")


def modules() -> Iterator[tuple[str, Path]]:
    """(dotted name, path) of every module under libs/ and services/."""
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            yield ".".join(parts), path


def imports_of(path: Path) -> set[str]:
    """The absolute modules ``path`` imports (function-level imports included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_no_module_in_libs_or_services_is_over_the_size_limit() -> None:
    sizes = {name: len(path.read_text().splitlines()) for name, path in modules()}
    assert sizes, "no modules found"
    over = {name: lines for name, lines in sizes.items() if lines > MAX_LINES}
    assert not over, f"modules over {MAX_LINES} lines: {over}"


def test_no_service_imports_another_and_libs_import_no_service() -> None:
    wrong: list[str] = []
    for name, path in modules():
        parts = name.split(".")
        own = parts[1] if parts[0] == "services" and len(parts) > 1 else None
        for target in imports_of(path):
            words = target.split(".")
            if words[0] == "devstack":
                wrong.append(f"{name} imports the dev harness ({target})")
            elif words[0] == "services" and len(words) > 1:
                if own is None:
                    wrong.append(f"{name} (a library) imports {target}")
                elif words[1] != own:
                    wrong.append(f"{name} imports another service ({target})")
    assert not wrong, "\n".join(sorted(set(wrong)))


def test_there_is_no_import_cycle() -> None:
    names = dict(modules())
    graph = {
        name: sorted({target for target in imports_of(path) if target in names} - {name})
        for name, path in names.items()
    }
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_images_install_libs_and_services_only() -> None:
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert "devstack" not in allowed and {"libs", "services"} <= allowed
    for dockerfile in sorted((ROOT / "deploy" / "docker").glob("*.Dockerfile")):
        copies = [
            line.split()[1]
            for line in dockerfile.read_text().splitlines()
            if line.startswith("COPY ") and "--from" not in line
        ]
        assert not [c for c in copies if c.startswith("devstack")], dockerfile.name
