"""The events an xDS stream takes in and the actions it gives out (`protocol.py`'s vocabulary).

Plain values with no I/O: `requests.py` builds the requests from the wire, the server and the
proxy tracker act on the actions.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from .cache import EncodedResource, Snapshot

# --- events in -------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeInfo:
    id: str
    cluster: str = ""
    metadata: Mapping[str, object] = field(default_factory=dict)
    user_agent: str = ""


_STAR = frozenset({"*"})


@dataclass(frozen=True)
class SotwRequest:
    type_url: str
    version_info: str = ""
    response_nonce: str = ""
    resource_names: tuple[str, ...] = ()
    error: str | None = None
    node: NodeInfo | None = None
    # Worked out once per request (and a request's bytes seen again are parsed once: server.py),
    # so the streams that send the same ACK share one set: `resource_names` without "*", and
    # whether "*" was among them.
    names_key: frozenset[str] = field(init=False, repr=False, compare=False)
    star: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        names = frozenset(self.resource_names)
        star = "*" in names
        object.__setattr__(self, "names_key", names - _STAR if star else names)
        object.__setattr__(self, "star", star)


@dataclass(frozen=True)
class DeltaRequest:
    type_url: str
    subscribe: tuple[str, ...] = ()
    unsubscribe: tuple[str, ...] = ()
    initial_versions: Mapping[str, str] = field(default_factory=dict)
    response_nonce: str = ""
    error: str | None = None
    node: NodeInfo | None = None


# --- actions out -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Send:
    """Send a response. For SotW `version` is version_info and `removed` is empty; for Delta
    `version` is system_version_info and `resources` are the added or changed ones."""

    type_url: str
    version: str
    nonce: str
    resources: tuple[EncodedResource, ...]
    removed: tuple[str, ...]
    snapshot: Snapshot


@dataclass(frozen=True)
class Acked:
    type_url: str
    version: str
    nonce: str


@dataclass(frozen=True)
class Nacked:
    type_url: str
    version: str
    nonce: str
    error: str


@dataclass(frozen=True)
class Stale:
    """A request naming a nonce that is not the latest: ignored, as the protocol says."""

    type_url: str
    nonce: str


Action = Send | Acked | Nacked | Stale


class ProtocolError(Exception):
    """The client broke the xDS protocol (a remote error): the stream should be closed."""
