"""Versioned snapshots of xDS resources, encoded once and shared by every stream.

`cache` decides *what* each node gets (go-control-plane's split): a `Snapshot` is a
consistent set of resources for one node group at one version. Each resource is encoded to
`Any` bytes exactly once, when the snapshot is built; streams only frame those bytes.

Versions: a snapshot carries the version its producer gives (RepStage uses the Raft index of
the last change, so every control-plane replica renders the same version for the same state).
The `version_info` sent for a type is `<version>-<digest>`, where the digest names the exact
set of resources sent. A client that comes back with a version whose digest matches what it
would be sent already has it, whichever replica it talks to, and gets no needless push.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property

import betterproto2

from . import encoding, wire
from . import resources as res

encoding.install()

DIGEST_BYTES = 8
_MAX_SELECTIONS = 4096  # distinct subscriptions memoised per snapshot (clients choose names)


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=DIGEST_BYTES).digest()


@dataclass(frozen=True, slots=True)
class EncodedResource:
    """One resource, encoded once: its `Any` bytes, content digest, and what it refers to."""

    type_url: str
    name: str
    any_bytes: bytes
    digest: bytes
    refs: frozenset[res.Ref] = frozenset()
    delta_bytes: bytes = b""
    ttl: float | None = None  # seconds: Envoy drops the resource unless it is re-sent within

    @property
    def version(self) -> str:
        """Per-resource version (Delta xDS): the content digest, the same on every replica."""
        return self.digest.hex()

    @classmethod
    def from_bytes(
        cls, type_url: str, name: str, value: bytes, refs: Iterable[res.Ref] = (), ttl: float | None = None
    ) -> EncodedResource:
        """With `ttl`, the resource goes out wrapped in a `Resource` with that TTL (SotW: as an
        `Any` of type Resource; Delta: the Resource carries it), so Envoy drops it `ttl`
        seconds after it last got it: a lease, renewed by sending it again."""
        any_bytes = wire.encode_any(type_url, value)
        digest = _digest(any_bytes)
        if ttl is None:
            delta = wire.encode_delta_resource(name, digest.hex(), any_bytes)
            return cls(type_url, name, any_bytes, digest, frozenset(refs), delta)
        digest = _digest(any_bytes + f"\0ttl={ttl!r}".encode())  # a new lease length is a new version
        delta = wire.encode_ttl_resource(name, digest.hex(), any_bytes, ttl)
        wrapped = wire.encode_any(wire.RESOURCE_TYPE, delta)
        return cls(type_url, name, wrapped, digest, frozenset(refs), delta, ttl)

    @classmethod
    def from_message(
        cls, message: betterproto2.Message, name: str | None = None, ttl: float | None = None
    ) -> EncodedResource:
        type_url = res.type_url_of(message)
        resource_name = name if name is not None else str(getattr(message, "name", "")) or str(
            getattr(message, "cluster_name", "")
        )
        if not resource_name:
            raise ValueError(f"{type(message).__name__} has no name")
        return cls.from_bytes(type_url, resource_name, bytes(message), res.references(type_url, message), ttl)


def set_digest(items: Iterable[EncodedResource]) -> str:
    """Digest of a set of resources (order-independent), as used in `version_info`."""
    h = hashlib.blake2b(digest_size=DIGEST_BYTES)
    for item in sorted(items, key=lambda r: r.name):
        h.update(item.name.encode())
        h.update(b"\0")
        h.update(item.digest)
    return h.hexdigest()


def sotw_version(snapshot_version: str, items: Iterable[EncodedResource]) -> str:
    return f"{snapshot_version}-{set_digest(items)}"


def split_version(version_info: str) -> tuple[int, str]:
    """(index, digest) of a `version_info` we produced; (-1, "") for anything else."""
    index, sep, digest = version_info.partition("-")
    if not sep or not index.isdigit():
        return -1, ""
    return int(index), digest


@dataclass(frozen=True, slots=True)
class Selection:
    """What a snapshot holds of one type for one subscription (all names, or a set of them),
    worked out once per snapshot and shared by every stream with that subscription: the
    resources (read-only), in name order, their set digest and SotW `version_info`."""

    resources: Mapping[str, EncodedResource]
    items: tuple[EncodedResource, ...]
    digest: str
    version: str


@dataclass(frozen=True)
class Snapshot:
    """A consistent set of resources at one version, by type URL then name."""

    version: str
    resources: Mapping[str, Mapping[str, EncodedResource]]
    # The order types go out in when several change at once. The default is the xDS protocol's
    # (clusters, endpoints, listeners, routes). A producer may move a type earlier when its
    # resources only answer questions (RepStage's fence routes must reach Envoy before the
    # endpoints that are checked against them); the protocol still holds back a listener or
    # route until the clusters it names are ACKed, whatever the order.
    order: tuple[str, ...] = res.ADS_ORDER
    _bodies: dict[tuple[str, str], bytes] = field(default_factory=dict, compare=False, repr=False)
    _messages: dict[tuple[str, str], tuple[betterproto2.Message, EncodedResource]] = field(
        default_factory=dict, compare=False, repr=False
    )
    _selections: dict[tuple[str, frozenset[str] | None], Selection] = field(
        default_factory=dict, compare=False, repr=False
    )

    def __post_init__(self) -> None:
        if not self.version.isdigit():
            raise ValueError(f"snapshot version must be a decimal index, got {self.version!r}")

    @classmethod
    def build(
        cls,
        version: str | int,
        messages: Mapping[str, Mapping[str, betterproto2.Message]],
        previous: Snapshot | None = None,
        order: tuple[str, ...] = res.ADS_ORDER,
        ttls: Mapping[res.Ref, float] | None = None,
    ) -> Snapshot:
        """Encode every message once. `messages` is {type_url: {name: message}}; `ttls` gives
        the resources that are leased ((type_url, name) -> seconds, see `EncodedResource`).

        With `previous`, a message that is the very same object as one `previous` was built
        from is not encoded again (a renderer that caches unchanged resources gets
        per-change cost, not per-state cost). Messages must be treated as read-only.
        """
        before = previous._messages if previous is not None else {}
        ttls = ttls or {}
        encoded: dict[str, dict[str, EncodedResource]] = {}
        sources: dict[tuple[str, str], tuple[betterproto2.Message, EncodedResource]] = {}
        for type_url, by_name in messages.items():
            out = encoded[type_url] = {}
            for name, msg in sorted(by_name.items()):
                key = (type_url, name)
                old = before.get(key)
                ttl = ttls.get(key)
                if old is not None and old[0] is msg and old[1].ttl == ttl:
                    item = old[1]
                else:
                    item = EncodedResource.from_message(msg, name, ttl)
                out[name] = item
                sources[key] = (msg, item)
        snap = cls(str(version), encoded, order, _messages=sources)
        missing = snap.dangling_references()
        if missing:
            raise ValueError(f"inconsistent snapshot {version}: missing {sorted(missing)}")
        return snap

    def get(self, type_url: str) -> Mapping[str, EncodedResource]:
        return self.resources.get(type_url, {})

    @cached_property
    def index(self) -> int:
        """The version as a number (read for every stream on every push and ACK: parsed once)."""
        return int(self.version)

    def dangling_references(self) -> set[res.Ref]:
        """References to resources this snapshot does not hold (must be empty)."""
        missing: set[res.Ref] = set()
        for by_name in self.resources.values():
            for item in by_name.values():
                for ref_type, ref_name in item.refs:
                    if ref_name not in self.get(ref_type):
                        missing.add((ref_type, ref_name))
        return missing

    def selection(self, type_url: str, names: frozenset[str] | None) -> Selection:
        """The resources of `type_url` a subscription to `names` (None: all) gets, memoised:
        a push to thousands of streams with the same subscription sorts and digests once."""
        key = (type_url, names)
        found = self._selections.get(key)
        if found is None:
            current = self.get(type_url)
            chosen = dict(current) if names is None else {n: current[n] for n in names if n in current}
            items = tuple(chosen[n] for n in sorted(chosen))
            digest = set_digest(items)
            found = Selection(chosen, items, digest, f"{self.version}-{digest}")
            if len(self._selections) < _MAX_SELECTIONS:  # names come from clients: bounded
                self._selections[key] = found
        return found

    def sotw_body(self, type_url: str, items: tuple[EncodedResource, ...], version: str) -> bytes:
        """The shared part of a DiscoveryResponse, memoised per (type, version_info)."""
        key = (type_url, version)
        body = self._bodies.get(key)
        if body is None:
            body = wire.sotw_body(version, (item.any_bytes for item in items), type_url)
            self._bodies[key] = body
        return body


Listener = Callable[[str, Snapshot], None]


class SnapshotCache:
    """The current snapshot per node group, and who to tell when one changes.

    `group_of` maps a node (id, cluster) to its group; the default puts every node in one.
    Callbacks run synchronously in the caller (the event loop thread in the server).
    """

    def __init__(self, group_of: Callable[[str, str], str] | None = None) -> None:
        self._snapshots: dict[str, Snapshot] = {}
        self._listeners: dict[str, set[Listener]] = {}
        self.group_of: Callable[[str, str], str] = group_of or (lambda node_id, cluster: "")

    def set_snapshot(self, group: str, snapshot: Snapshot) -> None:
        current = self._snapshots.get(group)
        if current is not None and snapshot.index < current.index:
            raise ValueError(
                f"snapshot version would go backwards for group {group!r}: {current.version} -> {snapshot.version}"
            )
        self._snapshots[group] = snapshot
        for listener in list(self._listeners.get(group, ())):
            listener(group, snapshot)

    def get(self, group: str) -> Snapshot | None:
        return self._snapshots.get(group)

    def groups(self) -> list[str]:
        return sorted(self._snapshots)

    def watch(self, group: str, listener: Listener) -> Callable[[], None]:
        self._listeners.setdefault(group, set()).add(listener)

        def cancel() -> None:
            self._listeners.get(group, set()).discard(listener)

        return cancel
