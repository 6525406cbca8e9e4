"""Summarise py-spy's raw (collapsed) stacks: where each service spends its CPU samples.

``py-spy record --format raw`` writes one line per distinct stack, root first, frames joined
by ``;``, then the number of samples. Without ``--idle`` only samples of a thread that was
running count, so the percentages are shares of the process's busy time.

- **self**: samples whose innermost frame is the function (what to make cheaper);
- **inclusive**: samples with the function anywhere on the stack (what to call less), shown
  for the project's own code (``libs/``, ``services/``) only, since the event loop's frames are
  on every stack; the service's entry point (its ``__main__``, the runner, anything on 95 % of
  the samples or more) is left out.

Run: ``.venv/bin/python bench/profile_summary.py PROFILE.txt [...] [--top 12]``.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

_FRAME = re.compile(r"^(?P<function>.*?) \((?P<file>[^():]*?)(?::\d+)?\)$")
_OWN = ("libs/", "services/")
ENTRY_POINTS = ("run_main (libs/common/runtime/service.py)", "ServiceCli.main (")
EVERY_STACK = 0.95
"""An own function on at least this share of the samples is the entry point, not news."""


def frame_name(frame: str) -> str:
    """``function (path/file.py:123)`` without the line: ``function (path/file.py)``."""
    match = _FRAME.match(frame.strip())
    if match is None:
        return frame.strip()
    return f"{match['function']} ({match['file']})"


def is_entry_point(name: str) -> bool:
    """The frames every stack of a service starts with (its ``__main__`` and the runner)."""
    return "__main__.py)" in name or name.startswith(ENTRY_POINTS)


def parse_collapsed(lines: Iterable[str]) -> list[tuple[list[str], int]]:
    """(frames root first, samples) per line of a raw py-spy profile."""
    stacks = []
    for line in lines:
        line = line.rstrip("\n")
        if not line.strip():
            continue
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        stacks.append(([frame_name(frame) for frame in stack.split(";")], int(count)))
    return stacks


def summarise(stacks: list[tuple[list[str], int]], top: int = 12) -> dict[str, object]:
    """Total samples and the top functions by self and by inclusive share (percent)."""
    total = sum(count for _, count in stacks)
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for frames, count in stacks:
        if frames:
            own[frames[-1]] += count
        for name in set(frames):
            if any(part in name for part in _OWN):
                inclusive[name] += count

    for name, count in list(inclusive.items()):
        if count >= EVERY_STACK * total or is_entry_point(name):
            del inclusive[name]  # on (nearly) every stack: no news

    def shares(counter: Counter[str]) -> list[tuple[str, float]]:
        return [(name, round(100 * n / total, 1)) for name, n in counter.most_common(top)]

    return {
        "samples": total,
        "self": shares(own) if total else [],
        "inclusive": shares(inclusive) if total else [],
    }


def markdown(name: str, summary: dict[str, object]) -> str:
    """One service's summary as Markdown."""
    lines = [f"#### {name}: {summary['samples']} samples while busy", ""]
    for title in ("self", "inclusive"):
        rows = summary[title]
        assert isinstance(rows, list)
        lines += [f"| {title} % | function |", "|---:|---|"]
        lines += [f"| {share:.1f} | `{function}` |" for function, share in rows]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Print the summary of each profile given."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profiles", nargs="+", type=Path)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args(argv)
    for path in args.profiles:
        stacks = parse_collapsed(path.read_text(errors="replace").splitlines())
        print(markdown(path.stem, summarise(stacks, args.top)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
