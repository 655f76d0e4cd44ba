"""`load_config`: read the YAML file strictly and turn every validation problem into one
`ConfigError` naming each field (and the environment variable that set it)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    ValidationError,
)
from pydantic_settings.exceptions import SettingsError

from repstage_mesh.config.sections import ENV_DELIMITER, ENV_PREFIX, ErrorList
from repstage_mesh.config.settings import _INPUTS, Settings, _Inputs, error_path
from repstage_mesh.core.errors import ConfigError

# --- loading ----------------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} is given twice", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _read_yaml(path: Path) -> dict[str, Any]:
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([("", f"file not found: {source}")], source) from None
    except UnicodeDecodeError as exc:
        message = f"cannot read {source}: not UTF-8 text (byte {exc.start}); give a YAML file"
        raise ConfigError([("", message)], source) from None
    except OSError as exc:
        message = f"cannot read {source}: {exc.strerror or exc}; give a readable YAML file"
        raise ConfigError([("", message)], source) from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as exc:
        raise ConfigError([("", _yaml_message(exc))], source) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            [("", f"expected a mapping of sections at the top, got {type(data).__name__}")], source
        )
    return data


def _yaml_message(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        what = exc.problem or exc.context or "malformed YAML"
        if mark is not None:
            return f"line {mark.line + 1}, column {mark.column + 1}: {what}"
        return str(what)
    return f"malformed YAML: {exc}"


def load_config(path: str | Path | None, env: Mapping[str, str] | None = None) -> Settings:
    """Read the YAML file at `path` (None: no file) and `REPSTAGE_*` variables from `env`
    (None: os.environ). Raises ConfigError listing every problem with its field path."""
    source = str(path) if path is not None else None
    data = _read_yaml(Path(path)) if path is not None else {}
    token = _INPUTS.set(_Inputs(file_data=data, env=env))
    try:
        return Settings()
    except ValidationError as exc:
        raise ConfigError(_validation_errors(exc, env), source) from None
    except SettingsError as exc:
        raise ConfigError([_settings_error(exc)], source) from None
    finally:
        _INPUTS.reset(token)


_PREFIXED = re.compile(
    r"^([a-z_][a-z0-9_]*(?:\[\d+\])*(?:\.[a-z_][a-z0-9_]*(?:\[\d+\])*)*): (.+)$", re.DOTALL
)


def _join(path: str, sub: str) -> str:
    return f"{path}.{sub}" if path else sub


def _validation_errors(exc: ValidationError, env: Mapping[str, str] | None) -> ErrorList:
    import os

    environ = env if env is not None else os.environ
    env_names = {name.upper() for name in environ}
    errors: ErrorList = []
    raw = exc.errors(include_url=False)
    failed = [error_path(e["loc"]) for e in raw]
    for error in raw:
        path = error_path(error["loc"])
        if error["type"] == "too_short" and any(other.startswith(path + "[") for other in failed):
            continue  # a list that lost a bad item: the item's own error says what is wrong
        ctx = error.get("ctx") or {}
        if (error["type"] == "value_error" and "error" in ctx) or error["type"] == "semantic":
            # Our own validators: one problem per line, each may start with "sub.path: ".
            text = ctx["error"] if error["type"] == "value_error" else error["msg"]
            for line in str(text).splitlines():
                match = _PREFIXED.match(line)
                if match:
                    errors.append((_join(path, match.group(1)), match.group(2)))
                else:
                    errors.append((path, line))
        else:
            errors.append((path, error["msg"]))
    return [(path, _with_env_hint(path, message, env_names)) for path, message in errors]


def _with_env_hint(path: str, message: str, env_names: set[str]) -> str:
    """Say so when the bad value came from an environment variable."""
    parts = path.split(".")
    for n in range(len(parts), 0, -1):
        prefix = parts[:n]
        if any("[" in p for p in prefix):
            continue
        name = ENV_PREFIX + ENV_DELIMITER.join(p.upper() for p in prefix)
        if name in env_names:
            return f"{message} (from environment variable {name})"
    return message


def _settings_error(exc: SettingsError) -> tuple[str, str]:
    match = re.search(r'field "([^"]+)"', str(exc))
    field = match.group(1) if match else ""
    cause = f": {exc.__cause__}" if exc.__cause__ else ""
    name = f"{ENV_PREFIX}{field.upper()}*" if field else f"{ENV_PREFIX}*"
    return (
        field,
        f"cannot parse the {name} environment variables (lists and mappings must be JSON){cause}",
    )
