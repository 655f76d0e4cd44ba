"""What `serve` needs beyond a well-formed file, checked before anything starts.

`startup_problems(settings)` is run by `repstage-mesh validate` and by `serve` before Raft, xDS
or the API start, so that a config that validates also starts (issue 13): the API is not
served without tokens on a non-loopback address, its TLS files load, every secret can be
read, and the data directory can be created. Add a check here when `serve` gains a new way to
refuse a config.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import ssl
from collections.abc import Iterator, Mapping
from pathlib import Path

from repstage_mesh.config.sections import ErrorList
from repstage_mesh.config.settings import Settings
from repstage_mesh.core.addresses import is_loopback
from repstage_mesh.core.errors import ListenError

__all__ = ["bind_problems", "bind_refused_reason", "listening", "startup_problems"]


def startup_problems(settings: Settings, env: Mapping[str, str] | None = None) -> ErrorList:
    """(field, message) for everything that would stop `serve` (env: default os.environ)."""
    return [
        *_api_problems(settings),
        *settings.secret_store(env).problems(),
        *_data_dir_problems(Path(settings.node.data_dir)),
        *_snapshot_program_problems(settings),
    ]


def _snapshot_program_problems(settings: Settings) -> ErrorList:
    """The programs the snapshot actions and drills run, where the operator named them."""
    snap = settings.snapshots
    problems: ErrorList = []
    if snap.pg_bindir is not None and not Path(snap.pg_bindir).is_dir():
        problems.append(("snapshots.pg_bindir", f"{snap.pg_bindir} is not a directory"))
    server = snap.verify.redis_server
    if server is not None and not (Path(server).is_file() and os.access(server, os.X_OK)):
        problems.append(("snapshots.verify.redis_server", f"{server} is not an executable file"))
    return problems


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


def bind_problems(settings: Settings) -> ErrorList:
    """(field, message) for each of this node's sockets that cannot be bound right now: the
    port is taken (another node, another program) or the address is not this host's.

    Only `serve` runs this, just before it starts: `validate` does not, because the node a file
    describes may well be running (and holding its ports) while its file is checked. `serve`
    still turns a bind that fails later (a race) into the same one-line error."""
    fields = ["xds.listen", "api.listen"] + (["raft.bind"] if settings.raft.multi_node else [])
    problems: ErrorList = []
    for field in fields:
        host, port = settings.host_port(field)
        reason = _bind_refused(host, port)
        if reason is not None:
            problems.append((field, f"cannot listen on {host}:{port}: {reason}; stop what uses it or "
                             f"choose another port for {field}"))
    return problems


def _bind_refused(host: str, port: int) -> str | None:
    """Why binding host:port fails now (None: it would bind), with the options our servers use
    (SO_REUSEADDR, no SO_REUSEPORT). Port 0 always binds."""
    if port == 0:
        return None
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"the address does not resolve ({exc.strerror})"
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            return bind_refused_reason(exc)
    return None


def bind_refused_reason(exc: OSError) -> str:
    if exc.errno is None:
        return "the port is in use or the address is not this host's"
    if exc.errno == errno.EADDRINUSE:
        return "the port is already in use (another node or program)"
    if exc.errno == errno.EADDRNOTAVAIL:
        return "the address is not one of this host's"
    if exc.errno == errno.EACCES:
        return "permission denied (ports below 1024 need privileges)"
    return exc.strerror or str(exc)


@contextlib.contextmanager
def listening(field: str, host: str, port: int) -> Iterator[None]:
    """Around a listener's bind: a failure (another process was quicker than `bind_problems`)
    becomes a ListenError naming the config field."""
    try:
        yield
    except (OSError, RuntimeError) as exc:
        reason = bind_refused_reason(exc) if isinstance(exc, OSError) else bind_refused_reason(OSError())
        raise ListenError(field, f"cannot listen on {host}:{port}: {reason}; stop what uses it or "
                          f"choose another port for {field}") from exc
