"""What only the operator defines: named hooks and named secrets (`hooks:` and `secrets:`).

A service (config file or `PUT /v1/services/{name}`) refers to them by name only
(`leadership.promote_hook`, `leadership.probe.password_secret`); the API can never define a
command, a URL or which environment variable or file a secret is read from.

    secrets:
      redis-password: {env: REDIS_PASSWORD}        # or {file: /run/secrets/redis}
    hooks:
      promote-pg: {command: [/usr/local/bin/promote, "{member}", "{address}"], timeout: 10,
                   secret_env: {PGPASSWORD: pg-password}}

`Secrets` resolves a name to its value when it is needed (a file is re-read, so a rotated
secret is used by the next connection). `hook_environment` builds a command hook's minimal
environment: only `HOOK_ENV_ALLOW_LIST` is inherited, plus the hook's own `env` and
`secret_env`; no `REPSTAGE_*` variable (the Raft password) ever reaches a hook.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from repstage_mesh.core.models import HookSpec

__all__ = [
    "HOOK_ENV_ALLOW_LIST",
    "HookSpec",
    "SecretSource",
    "Secrets",
    "hook_environment",
    "hook_problems",
]

ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
HOOK_ENV_ALLOW_LIST = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR")
_DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
_SECRET_FILE_LIMIT = 64 * 1024


def _reserved(name: str) -> bool:
    """REPSTAGE_* variables configure the node itself (REPSTAGE_RAFT__PASSWORD among them)."""
    return name.upper().startswith("REPSTAGE_")


class SecretSource(BaseModel):
    """One entry of `secrets:`: an environment variable of the node or a file, never both."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    env: str | None = Field(default=None, description="environment variable holding the secret")
    file: Path | None = Field(default=None, description="file holding the secret (trailing newline dropped)")
    hosts: tuple[str, ...] | None = Field(
        default=None,
        description="the member addresses this secret may be sent to (default: any); a service "
        "naming it for another address is refused (422), and it is never sent elsewhere",
    )

    def allows(self, host: str) -> bool:
        return self.hosts is None or host in self.hosts

    @model_validator(mode="after")
    def _one(self) -> SecretSource:
        if (self.env is None) == (self.file is None):
            raise ValueError("env: give exactly one of env or file")
        if self.env is not None:
            if not ENV_NAME.match(self.env):
                raise ValueError(f"env: {self.env!r} is not an environment variable name")
            if _reserved(self.env):
                raise ValueError(
                    f"env: {self.env!r} is one of the node's own REPSTAGE_* settings (the Raft "
                    "password among them) and cannot be a secret"
                )
        return self


class Secrets:
    """Looks secrets up by name: `get(name)` is the value, or None for an unknown name or an
    unreadable source (a probe then connects without a password: it never falls back to
    another source)."""

    def __init__(self, sources: Mapping[str, SecretSource], environ: Mapping[str, str] | None = None) -> None:
        self._sources = dict(sources)
        self._environ = environ if environ is not None else os.environ

    def __contains__(self, name: object) -> bool:
        return name in self._sources

    def hosts(self) -> dict[str, frozenset[str] | None]:
        """Each secret's allowed member addresses (None: any)."""
        return {n: frozenset(s.hosts) if s.hosts is not None else None for n, s in self._sources.items()}

    def for_host(self, name: str | None, host: str) -> str | None:
        """The secret `name` when it may be sent to `host` (its `hosts`), else None."""
        source = self._sources.get(name) if name is not None else None
        if source is None or not source.allows(host):
            return None
        return self.get(name)

    def get(self, name: str | None) -> str | None:
        source = self._sources.get(name) if name is not None else None
        if source is None:
            return None
        if source.env is not None:
            return self._environ.get(source.env)
        assert source.file is not None
        try:
            with source.file.open("rb") as f:
                data = f.read(_SECRET_FILE_LIMIT + 1)
        except OSError:
            return None
        if len(data) > _SECRET_FILE_LIMIT:
            return None
        return data.decode(errors="replace").rstrip("\r\n")

    def problems(self) -> list[tuple[str, str]]:
        """(field, message) for every secret that cannot be read now (checked by validate and
        at serve start)."""
        problems: list[tuple[str, str]] = []
        for name, source in self._sources.items():
            if source.env is not None and source.env not in self._environ:
                problems.append((f"secrets.{name}.env", f"environment variable {source.env} is not set"))
            if source.file is not None:
                try:
                    size = source.file.stat().st_size
                    with source.file.open("rb"):
                        pass
                except OSError as exc:
                    problems.append((f"secrets.{name}.file", f"cannot read {source.file}: {exc.strerror}"))
                    continue
                if size > _SECRET_FILE_LIMIT:
                    problems.append((f"secrets.{name}.file", f"{source.file} is over {_SECRET_FILE_LIMIT} bytes"))
        return problems


def hook_problems(hooks: Mapping[str, HookSpec], secrets: Mapping[str, SecretSource]) -> list[tuple[str, str]]:
    """(field, message) for hook definitions that name unknown secrets or reserved variables."""
    problems: list[tuple[str, str]] = []
    for name, hook in hooks.items():
        for var in (*hook.env, *hook.secret_env):
            if not ENV_NAME.match(var):
                problems.append((f"hooks.{name}.env", f"{var!r} is not an environment variable name"))
            elif _reserved(var):
                problems.append((f"hooks.{name}.env", f"{var!r}: REPSTAGE_* variables cannot be given to a hook"))
        for var, secret in hook.secret_env.items():
            if secret not in secrets:
                problems.append((f"hooks.{name}.secret_env.{var}", f"no secret named {secret!r} in secrets:"))
    return problems


def hook_environment(hook: HookSpec, secrets: Secrets, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The whole environment of a command hook: the allow-list inherited from the node, then
    the hook's `env`, then its `secret_env` resolved. Nothing else (no REPSTAGE_* variable)."""
    source = environ if environ is not None else os.environ
    env = {k: source[k] for k in HOOK_ENV_ALLOW_LIST if k in source}
    env.setdefault("PATH", _DEFAULT_PATH)
    env.update(hook.env)
    for var, name in hook.secret_env.items():
        value = secrets.get(name)
        if value is not None:
            env[var] = value
    return {k: v for k, v in env.items() if not _reserved(k)}
