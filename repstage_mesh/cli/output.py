"""What every CLI command shares: exit codes, the error it raises, and how it prints."""

from __future__ import annotations

import json
import os
import sys
from typing import Any
from urllib.parse import quote

from rich.console import Console

from repstage_mesh.core.errors import MeshError

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2


class CliError(MeshError):
    """A problem to print as `error: ...` with exit status 1."""


def path_segment(name: str) -> str:
    """A name quoted as one URL path segment (`/` and `..` cannot escape it)."""
    return quote(name, safe="")


class Output:
    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.console = Console(soft_wrap=False)
        if not self.console.is_terminal and "COLUMNS" not in os.environ:
            self.console.width = max(self.console.width, 120)  # piped: do not fold tables at 80

    def json(self, data: Any) -> None:
        sys.stdout.write(json.dumps(data, indent=2) + "\n")

    def show(self, data: Any, *renderables: Any) -> None:
        if self.as_json:
            self.json(data)
            return
        for item in renderables:
            self.console.print(item)


