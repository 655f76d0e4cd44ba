"""What one xDS client may cost this server: the limits, and the checks that apply them.

Sans-IO: plain values and functions over a stream's state; the server (`server.py`) calls
them and turns a `LimitExceeded` into a gRPC status that closes the stream. Every limit has a
name (the `limit` label of `repstage_xds_limit_hits_total`, a fixed set: `LIMIT_NAMES`), so a
client cannot create metric labels, per-type state or cache entries by inventing names.

| limit | what happens when it is hit |
| --- | --- |
| `type_url` | a type URL this server does not serve: the stream is closed (INVALID_ARGUMENT) before any state is kept for it |
| `request_bytes` | a request larger than `max_request_bytes`: stream closed (RESOURCE_EXHAUSTED) |
| `resource_name_bytes` | a resource name (or an `initial_resource_versions` key or version) longer than `max_resource_name_bytes`: closed (INVALID_ARGUMENT) |
| `resource_names` | the stream would subscribe to more than `max_resource_names` names in all: closed (RESOURCE_EXHAUSTED) |
| `initial_resource_versions` | a Delta request with more entries than `max_initial_resource_versions`: closed (RESOURCE_EXHAUSTED) |
| `node_id` | a node id (or cluster) longer than `max_node_id_bytes`: closed (INVALID_ARGUMENT) |
| `node_metadata` | node metadata larger than `max_node_metadata_bytes`: dropped (not stored, not echoed); the stream goes on |
| `streams_per_peer`, `streams` | a new stream over the limit is refused (RESOURCE_EXHAUSTED), as Consul does |
| `outgoing_queue` | more than `max_outgoing_queue` responses waiting for a client that does not read: closed (RESOURCE_EXHAUSTED) |
| `unacked_delta` | `max_unacked_delta` Delta responses of one type not yet ACKed: nothing more of that type is sent until the client answers |
| `error_detail` | a NACK's error text longer than `max_error_detail_bytes` is cut to it (it is stored and shown in `/v1/proxies`) |
| `admission` | more new streams than `admission_burst` at once, or faster than `admission_rate` per second: the new stream waits its turn (it is not refused), so a reconnect storm is served at a steady rate; a stream reset while it waits hands its turn back (h2 transport: HEADERS + RST_STREAM floods, CVE-2023-44487, do not queue honest streams) |
| `connection_buffer` | more than `max_connection_buffer_bytes` wait to be written to one connection or, framed, for the peer's flow-control windows (h2 transport): a peer that sends (PINGs, SETTINGS, the same ACK again) but reads nothing, or keeps its windows shut, is disconnected |
| `early_resets` | a connection's client reset more than `max_early_resets` streams before their first response (HEADERS then RST_STREAM, CVE-2023-44487's pattern; h2 transport): GOAWAY (ENHANCE_YOUR_CALM) and the connection is closed |
| `settings_frames` | a connection's client sends SETTINGS frames faster than `max_settings_per_second` (averaged over 10 s; h2 walks every stream of the connection for one that changes the initial window; h2 transport): GOAWAY (ENHANCE_YOUR_CALM) and the connection is closed |
| `disconnected_proxies` | the tracker keeps at most `max_disconnected_proxies` disconnected proxies for `/v1/proxies`: the oldest are forgotten |
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from . import resources as res
from .protocol import DeltaStream, ProtocolError, SotwStream

LIMIT_NAMES: tuple[str, ...] = (
    "type_url",
    "request_bytes",
    "resource_names",
    "initial_resource_versions",
    "node_id",
    "node_metadata",
    "streams_per_peer",
    "streams",
    "outgoing_queue",
    "unacked_delta",
    "disconnected_proxies",
    "error_detail",
    "resource_name_bytes",
    "admission",
    "connection_buffer",
    "early_resets",
    "settings_frames",
)

KNOWN_TYPE_URLS: frozenset[str] = frozenset(res.ADS_ORDER)
_SHOWN = 80  # characters of a refused value quoted back in an error message


@dataclass(frozen=True)
class XdsLimits:
    """Per-client limits of the xDS server (the `xds.limits` config section)."""

    max_request_bytes: int = 4 * 1024 * 1024
    max_resource_names: int = 10_000
    max_resource_name_bytes: int = 1024
    max_initial_resource_versions: int = 10_000
    max_node_id_bytes: int = 256
    max_node_metadata_bytes: int = 16 * 1024
    max_streams_per_peer: int = 1_000
    max_streams: int = 20_000
    max_outgoing_queue: int = 256
    max_unacked_delta: int = 16
    max_disconnected_proxies: int = 1_000
    max_error_detail_bytes: int = 4096
    admission_rate: float = 2_000.0  # new streams served per second once the burst is used
    admission_burst: int = 500  # new streams served at once
    max_connection_buffer_bytes: int = 64 * 1024 * 1024  # unwritten bytes of one connection (h2)
    max_early_resets: int = 100  # streams a connection's client resets before their first response (h2)
    max_settings_per_second: float = 10.0  # SETTINGS frames from a connection's client, over 10 s (h2)
    known_type_urls: frozenset[str] = KNOWN_TYPE_URLS

    def __post_init__(self) -> None:
        if not self.admission_rate > 0:
            raise ValueError("admission_rate: must be above 0")
        if not self.max_settings_per_second > 0:
            raise ValueError("max_settings_per_second: must be above 0")
        for name in (
            "max_request_bytes", "max_resource_names", "max_resource_name_bytes", "max_initial_resource_versions",
            "max_node_id_bytes", "max_node_metadata_bytes", "max_streams_per_peer",
            "max_streams", "max_outgoing_queue", "max_unacked_delta", "max_error_detail_bytes",
            "admission_burst", "max_connection_buffer_bytes", "max_early_resets",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be at least 1")


class LimitExceeded(ProtocolError):
    """A client went over a limit; `limit` is one of LIMIT_NAMES, `code` the name of the
    gRPC status that closes the stream."""

    def __init__(self, limit: str, message: str, code: str = "RESOURCE_EXHAUSTED") -> None:
        assert limit in LIMIT_NAMES, limit
        super().__init__(message)
        self.limit = limit
        self.code = code


def shown(text: str) -> str:
    """A client-supplied string as quoted in an error: at most _SHOWN characters."""
    return repr(text[:_SHOWN]) + (f"... ({len(text)} characters)" if len(text) > _SHOWN else "")


def check_type_url(type_url: str, limits: XdsLimits) -> None:
    if type_url and type_url not in limits.known_type_urls:
        raise LimitExceeded(
            "type_url",
            f"unknown type URL {shown(type_url)}: this server serves "
            + ", ".join(sorted(res.short_name(t) for t in limits.known_type_urls)),
            "INVALID_ARGUMENT",
        )


def check_names(
    stream: SotwStream | DeltaStream, type_url: str, names: Iterable[str], limits: XdsLimits,
    unsubscribe: Iterable[str] = (),
) -> None:
    """Would the stream hold more than `max_resource_names` names once this request is applied?
    SotW requests replace a type's names; Delta subscriptions add to them, then unsubscriptions
    remove (in that order, as the protocol applies them)."""
    total = sum(len(state.names) for state in stream.types.values())
    current = stream.types.get(type_url)
    held = current.names if current is not None else set()
    wanted = set(names)
    if isinstance(stream, SotwStream):
        after = total - len(held) + len(wanted - {"*"})
    else:
        wanted -= {"*"}
        after = total + len(wanted - held) - len(set(unsubscribe) & (held | wanted))
    if after > limits.max_resource_names:
        raise LimitExceeded(
            "resource_names",
            f"this stream would subscribe to {after} resource names; the limit is "
            f"{limits.max_resource_names} (xds.limits.max_resource_names)",
        )


def check_name(name: bytes, limits: XdsLimits) -> None:
    if len(name) > limits.max_resource_name_bytes:
        raise LimitExceeded(
            "resource_name_bytes",
            f"a resource name of {len(name)} bytes; the limit is {limits.max_resource_name_bytes} "
            "(xds.limits.max_resource_name_bytes)",
            "INVALID_ARGUMENT",
        )


def count_or_raise(count: int, limit: int, name: str, what: str) -> None:
    """Used while parsing: stop as soon as a repeated field goes over its limit."""
    if count > limit:
        raise LimitExceeded(name, f"{what}: more than {limit} (xds.limits.max_{name})")


def unacked_delta_full(stream: DeltaStream, type_url: str, limits: XdsLimits) -> bool:
    state = stream.types.get(type_url)
    return state is not None and len(state.pending) >= limits.max_unacked_delta


# --- peers and stream counts -------------------------------------------------------------------


def peer_host(peer: str) -> str:
    """The address part of grpc's peer string ("ipv4:127.0.0.1:5000", "ipv6:[::1]:5000",
    "unix:/path"); the whole string when it is something else."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    if kind == "ipv6":
        host = rest.rsplit(":", 1)[0]
        return host[1:-1] if host.startswith("[") and host.endswith("]") else host
    return peer


def is_loopback_peer(peer: str) -> bool:
    """True for a loopback IP (IPv4-mapped included) or a Unix socket."""
    if peer.startswith("unix:"):
        return True
    host = peer_host(peer).split("%", 1)[0]
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


class StreamSlots:
    """Open streams per peer address and in total; `take` refuses one over either limit."""

    def __init__(self, limits: XdsLimits) -> None:
        self.limits = limits
        self.by_peer: dict[str, int] = {}
        self.total = 0

    def take(self, peer: str) -> Callable[[], None]:
        """Count a new stream from `peer`; returns the function that releases it."""
        host = peer_host(peer)
        if self.total >= self.limits.max_streams:
            raise LimitExceeded(
                "streams", f"this server holds {self.total} xDS streams, its limit (xds.limits.max_streams)"
            )
        if self.by_peer.get(host, 0) >= self.limits.max_streams_per_peer:
            raise LimitExceeded(
                "streams_per_peer",
                f"{self.limits.max_streams_per_peer} xDS streams from {host} are open, the limit "
                "per peer (xds.limits.max_streams_per_peer)",
            )
        self.by_peer[host] = self.by_peer.get(host, 0) + 1
        self.total += 1
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            self.total -= 1
            left = self.by_peer[host] - 1
            if left:
                self.by_peer[host] = left
            else:
                del self.by_peer[host]

        return release


class AdmissionGate:
    """New streams admitted at a steady rate: up to `admission_burst` at once, then one every
    1/`admission_rate` seconds (the generic cell rate algorithm: one number of state, the time
    the next stream is due). A stream over it is not refused but told how long to wait, so
    when a restarted node sees all its proxies come back at once it serves them in turn, none
    cancelled, instead of starving its event loop on thousands of first pushes together.
    Sans-IO: the caller passes the clock and does the waiting."""

    def __init__(self, limits: XdsLimits) -> None:
        self.interval = 1.0 / limits.admission_rate
        self.tolerance = (limits.admission_burst - 1) * self.interval
        self.due = 0.0  # when the next stream would be admitted with no burst left
        self.waiting = 0  # streams told to wait that have not been admitted yet

    def reserve(self, now: float) -> float:
        """Seconds the new stream must wait before it is served (0.0: at once)."""
        due = max(self.due, now)
        self.due = due + self.interval
        wait = due - self.tolerance - now
        return wait if wait > 1e-9 else 0.0  # (float sums: a burst's last one is not 1e-15 late)

    def release(self) -> None:
        """A stream told to wait left before its turn (a client that opens and resets streams
        at once, CVE-2023-44487's pattern): the turn is given back, not spent."""
        self.due -= self.interval
