"""Lint: no module over 600 lines and no function over 60 lines in the shipped code.

`make lint` runs it. An exception is allowed only when ARCHITECTURE.md says why: list the
path (or `path:function`) in its "Size exceptions" section, in backticks.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROOMS = ("repstage_mesh", "xds", "filters")
MAX_MODULE = 600
MAX_FUNCTION = 60


def exceptions() -> set[str]:
    text = (ROOT / "ARCHITECTURE.md").read_text()
    match = re.search(r"^## Size exceptions\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    return set(re.findall(r"`([^`]+)`", match.group(1))) if match else set()


def problems(allowed: set[str]) -> list[str]:
    found = []
    for room in ROOMS:
        for path in sorted((ROOT / room).rglob("*.py")):
            if path.is_symlink() or any(p.is_symlink() for p in path.parents if ROOT in p.parents):
                continue
            rel = path.relative_to(ROOT).as_posix()
            source = path.read_text()
            lines = source.count("\n")
            if lines > MAX_MODULE and rel not in allowed:
                found.append(f"{rel}: {lines} lines (at most {MAX_MODULE})")
            for node in ast.walk(ast.parse(source)):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    length = (node.end_lineno or node.lineno) - node.lineno + 1
                    if length > MAX_FUNCTION and f"{rel}:{node.name}" not in allowed:
                        found.append(f"{rel}:{node.lineno} {node.name}: {length} lines (at most {MAX_FUNCTION})")
    return found


def main() -> int:
    found = problems(exceptions())
    for line in found:
        print(line)
    if found:
        print("split these, or say why in ARCHITECTURE.md under '## Size exceptions'")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
