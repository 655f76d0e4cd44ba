"""A fix for betterproto2's serialisation cost, applied when the xDS package is imported.

betterproto2 (0.9) validates a pydantic-dataclass message on every `bytes(message)`, and does
so by building a fresh `pydantic_core.SchemaValidator` from the class's schema each time:
~0.2 ms per message and per nested message, which made encoding one small Envoy listener cost
milliseconds (measured: 20 ms to encode the 6 resources of one fenced service). Building the
validator once per class keeps exactly the same validation and removes that cost.

It also looks up each field's default (`Message._get_field_default`, which `bytes(message)`
compares every field with, to leave defaults out) once per class and field instead of building
it anew inside a `warnings.catch_warnings()` block on every call: that block (it saves and
restores the warnings filters) was two thirds of encoding the health fence's route
configuration, the one resource every announced switch re-encodes. Only immutable defaults (numbers,
strings, bytes, enums, None) are kept; a repeated field's default is a fresh empty list each
time, as before. The result is the same comparison (betterproto2 0.9 uses the default for
nothing else: `__bytes__`, `__bool__`, `__repr__`, `is_set`).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any

import betterproto2
import pydantic_core

_VALIDATORS: dict[type, pydantic_core.SchemaValidator] = {}
_PATCHED = False
_IMMUTABLE = (bool, int, float, str, bytes, enum.Enum, type(None))
# (class, field) -> a callable returning the field's default without the warnings block
_DEFAULTS: dict[tuple[type, str], Callable[[], Any]] = {}
_ORIGINAL_DEFAULT = getattr(betterproto2.Message, "_get_field_default", None)


def _validate(self: betterproto2.Message) -> None:
    cls = type(self)
    validator = _VALIDATORS.get(cls)
    if validator is None:
        if not self._is_pydantic():
            raise TypeError("Validation is only available for pydantic dataclasses.")
        schema: Any = cls.__pydantic_core_schema__  # type: ignore[attr-defined]
        validator = _VALIDATORS[cls] = pydantic_core.SchemaValidator(schema)
    values = self.__dict__.copy()
    values.pop("_unknown_fields", None)
    validator.validate_python(values)


def _get_field_default(self: betterproto2.Message, field_name: str) -> Any:
    key = (type(self), field_name)
    known = _DEFAULTS.get(key)
    if known is not None:
        return known()
    assert _ORIGINAL_DEFAULT is not None
    value = _ORIGINAL_DEFAULT(self, field_name)
    if isinstance(value, _IMMUTABLE):
        _DEFAULTS[key] = lambda: value
    elif type(value) is list and not value:
        _DEFAULTS[key] = list
    return value


def install() -> None:
    """Idempotent. Only replaces how the validator and the defaults are obtained, not what
    is checked or encoded."""
    global _PATCHED
    if not _PATCHED and hasattr(betterproto2.Message, "_validate") and _ORIGINAL_DEFAULT is not None:
        betterproto2.Message._validate = _validate  # type: ignore[method-assign]
        betterproto2.Message._get_field_default = _get_field_default  # type: ignore[method-assign]
        _PATCHED = True
