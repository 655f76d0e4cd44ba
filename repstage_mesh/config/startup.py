"""What `serve` needs beyond a well-formed file, checked before anything starts.

`startup_problems(settings)` is run by `repstage-mesh validate` and by `serve` before Raft, xDS
or the API start, so that a config that validates also starts (issue 13): the API is not
served without tokens on a non-loopback address, its TLS files load, every secret can be
read, and the data directory can be created. Add a check here when `serve` gains a new way to
refuse a config.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from pathlib import Path

from repstage_mesh.config.sections import ErrorList
from repstage_mesh.config.settings import Settings
from repstage_mesh.core.addresses import is_loopback

__all__ = ["startup_problems"]


def startup_problems(settings: Settings, env: Mapping[str, str] | None = None) -> ErrorList:
    """(field, message) for everything that would stop `serve` (env: default os.environ)."""
    return [
        *_api_problems(settings),
        *settings.secret_store(env).problems(),
        *_data_dir_problems(Path(settings.node.data_dir)),
    ]


def _api_problems(settings: Settings) -> ErrorList:
    problems: ErrorList = []
    api = settings.api
    host, _ = settings.host_port("api.listen")
    if not (api.tokens is not None and api.tokens.enabled) and not is_loopback(host):
        problems.append(("api.listen", (
            f"{api.listen} is not a loopback address and api.tokens is empty: the API would "
            "have no authentication; configure api.tokens or listen on 127.0.0.1")))
    if api.tls is not None:
        try:
            api.tls.server_context()
        except (OSError, ssl.SSLError, ValueError) as exc:
            problems.append(("api.tls.cert_file", f"cannot load {api.tls.cert_file} with {api.tls.key_file}: {exc}"))
        try:
            api.tls.client_context()
        except (OSError, ssl.SSLError, ValueError) as exc:
            problems.append(("api.tls.ca_file", f"cannot load {api.tls.ca_file}: {exc}"))
    return problems


def _data_dir_problems(data_dir: Path) -> ErrorList:
    if data_dir.exists():
        if not data_dir.is_dir():
            return [("node.data_dir", f"{data_dir} exists and is not a directory")]
        if not os.access(data_dir, os.W_OK | os.X_OK):
            return [("node.data_dir", f"{data_dir} is not writable")]
        return []
    parent = data_dir.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        return [("node.data_dir", f"{data_dir} cannot be created: {parent} is not writable")]
    return []
