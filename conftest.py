"""For every test (tests/ and integration/): the CLI's tables are rendered at the width
`COLUMNS` says, else 120 when piped (cli/output.py); a pytest-xdist worker runs with
`COLUMNS=80`, which truncates cells the tests read. Every test, and every CLI it starts, sees
no `COLUMNS`, whatever the terminal or the runner."""

from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _no_terminal_width(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("COLUMNS", raising=False)
    yield
