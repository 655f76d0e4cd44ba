"""The server's log: readable lines by default, one JSON object per line when asked.

Everything logs through the stdlib `logging`. An operational event (a role change, a failover
step, a fail-closed entry or exit) is one record with structured fields, written with `event`:

    event(log, "failover_step", "cache: failover r0 -> r1: fenced", service="cache", ...)

`configure(fmt, level)` installs one handler on the root logger with `TextFormatter`
(`2026-12-03T04:00:00.123Z INFO repstage_mesh.failover: cache: ...: fenced | event=failover_step
id=cp-1-2 ... service=cache old=r0 new=r1 epoch=12`: grep for the event's name) or
`JsonFormatter` (`{"ts": ..., "level": ..., "logger": ..., "msg": ..., "event": "failover_step",
"service": "cache", ...}`). A record without fields (every other log line) is written the same
way, with only ts, level, logger and msg.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, Literal, TextIO

__all__ = ["FIELDS", "JsonFormatter", "LogFormat", "TextFormatter", "configure", "event"]

LogFormat = Literal["text", "json"]
FIELDS = "repstage_fields"  # the LogRecord attribute that carries an event's fields


def event(logger: logging.Logger, name: str, message: str, *, level: int = logging.INFO, **fields: Any) -> None:
    """Log `message` with the structured `fields` (None values are kept: "no primary")."""
    if logger.isEnabledFor(level):
        logger.log(level, message, extra={FIELDS: {"event": name, **fields}})


def _timestamp(record: logging.LogRecord) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{seconds}.{int(record.msecs):03d}Z"


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = getattr(record, FIELDS, None)
    return fields if isinstance(fields, dict) else {}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (UTC, ISO 8601), level, logger, msg, the event's fields,
    and `exc` (the formatted traceback) when the record carries one."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in _fields(record).items():
            data.setdefault(key, value)
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    """`<ts> <LEVEL> <logger>: <msg>`, then the event's fields as key=value (values with spaces
    quoted, None as -), then the traceback if any."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{_timestamp(record)} {record.levelname} {record.name}: {record.getMessage()}"
        pairs = [f"{key}={_text(value)}" for key, value in _fields(record).items()]
        if pairs:
            line += " | " + " ".join(pairs)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:g}"
    text = value if isinstance(value, str) else json.dumps(value, default=str, separators=(",", ":"))
    return json.dumps(text) if (not text or any(c in text for c in " \"=")) else text


def configure(fmt: LogFormat = "text", level: str | int = "INFO", stream: TextIO | None = None) -> logging.Handler:
    """Replace the root logger's handlers with one writing `fmt` lines to `stream` (stderr)."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    return handler
