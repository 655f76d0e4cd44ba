"""Turn messages into the dicts Envoy reads from a YAML/JSON file (proto field names)."""

from __future__ import annotations

from typing import Any

import betterproto2


def to_envoy_dict(message: betterproto2.Message) -> dict[str, Any]:
    """Proto-JSON with proto (snake_case) field names; `Any` values become `{"@type": ...}`.

    Durations come out as "1.500s", enums by name, 64-bit integers as strings: all forms
    Envoy's JSON/YAML loader accepts.
    """
    return message.to_dict(casing=betterproto2.Casing.SNAKE)
