"""Print pins for tickmesh's runtime dependency closure, from the current environment.

    .venv/bin/python deploy/tools/constraints.py > deploy/constraints.txt

The images install with ``pip -c deploy/constraints.txt`` so they run the versions the test
suite ran against.
"""

from __future__ import annotations

import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
BUILD_BACKEND = "setuptools==80.9.0"


def closure(requirements: list[str]) -> dict[str, str]:
    """Installed name -> version for ``requirements`` and everything they need."""
    pins: dict[str, str] = {}
    todo = [Requirement(text) for text in requirements]
    while todo:
        requirement = todo.pop()
        if requirement.marker and not requirement.marker.evaluate({"extra": ""}):
            continue
        distribution = metadata.distribution(requirement.name)
        name = distribution.metadata["Name"]
        if name.lower() in {key.lower() for key in pins}:
            continue
        pins[name] = distribution.version
        todo.extend(Requirement(text) for text in distribution.requires or [])
    return pins


def main() -> int:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    print("# Pins of tickmesh's runtime dependencies (and theirs) for the images: the versions the")
    print("# test suite runs against in the project's venv. Used as `pip -c`, so a dependency")
    print("# missing here still installs (unpinned); a pin that contradicts pyproject.toml breaks")
    print("# the build, which tests/test_deploy_compose.py catches first. Regenerate after")
    print("# changing dependencies:")
    print("#   .venv/bin/python deploy/tools/constraints.py > deploy/constraints.txt")
    pins = closure(project["dependencies"])
    for name, version in sorted(pins.items(), key=lambda pin: pin[0].lower()):
        print(f"{name}=={version}")
    print("# build backend (pip's isolated build of the tickmesh wheel)")
    print(BUILD_BACKEND)
    return 0


if __name__ == "__main__":
    sys.exit(main())
