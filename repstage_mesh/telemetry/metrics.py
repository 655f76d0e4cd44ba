"""Prometheus metrics of one control-plane node (`/metrics`).

`MeshMetrics(registry, node_id)` creates every metric in the node's own registry
(`ControlPlane.registry`) and is a `TrackerObserver`: attach it to the node's ProxyTracker and
the xDS metrics move by themselves. The rest is observed by whoever knows the fact:

    metrics = MeshMetrics(node.registry, node_id, raft_status=store.status)
    tracker.observers.append(metrics)
    metrics.observe_commit(seconds)                      # every successful submit
    metrics.observe_write_failure(write_failure_code(exc))  # every failed submit
    metrics.observe_probe(service, member, "primary")    # every probe answer
    metrics.observe_failover(service, seconds, mode)     # every finished failover/switchover

Nothing polls: the connected-proxy and NACK gauges are counted from what the tracker told us,
and the Raft gauges read `raft_status()` (a `ReplicatedStore.status()`-shaped dict) only when
Prometheus scrapes. All hooks are cheap (a dict update and a counter increment) and run on the
thread that drives the tracker; scraping may run on another thread.

Metric names (Prometheus conventions: `_total` counters, `_seconds` histograms, base units):

    repstage_xds_connected_proxies{control_plane,type,stream}   gauge
    repstage_xds_streams{control_plane,stream}                  gauge
    repstage_xds_pushes_total{type}                             counter
    repstage_xds_acks_total{type}                               counter
    repstage_xds_nacks_total{type}                              counter
    repstage_xds_nacked_held{type}                              gauge
    repstage_xds_proxies{control_plane,type,state}              gauge (synced, behind, nacked)
    repstage_xds_push_ack_seconds{type}                         histogram
    repstage_xds_limit_hits_total{limit}                        counter (xds.limits)
    repstage_xds_streams_refused_total{reason}                  counter (mTLS, plaintext)
    repstage_xds_proxies_flagged{flag}                          gauge (version_ahead, never_acked)
    repstage_xds_worker_restarts_total                          counter (xds.workers: a worker exited)
    repstage_failover_duration_seconds{service,mode}            histogram
    repstage_raft_term / _commit_index / _applied_index         gauges
    repstage_raft_is_leader / _has_quorum                       gauges (0/1)
    repstage_xds_lease_renewals_total / _skipped_total          counters (xds.primary_lease_ms set)
    repstage_xds_lease_fresh                                    gauge (0: primaries failed closed)
    repstage_raft_peers / _peers_connected                      gauges
    repstage_raft_frames_refused_total                          counter (frames over
        raft.unauthenticated_frame_limit from a peer that had not proven the password)
    repstage_raft_commit_seconds                                histogram
    repstage_write_failures_total{code}                         counter
    repstage_probe_results_total{service,member,result}         counter
    repstage_service_* / repstage_member_*                      see telemetry/services.py
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from repstage_mesh.core.errors import CommitTimeout, NoQuorum, Rejected
from repstage_mesh.core.models import MeshState
from repstage_mesh.telemetry.services import ServiceCollector, ServiceWatch
from repstage_mesh.xds import resources as res
from repstage_mesh.xds import standing
from repstage_mesh.xds.lease import LeaseRenewer
from repstage_mesh.xds.limits import LIMIT_NAMES
from repstage_mesh.xds.protocol import Acked, Nacked, Send
from repstage_mesh.xds.tls import REFUSAL_REASONS
from repstage_mesh.xds.tracker import ProxyRecord

log = logging.getLogger(__name__)

__all__ = [
    "COMMIT_BUCKETS",
    "FAILOVER_BUCKETS",
    "PUSH_ACK_BUCKETS",
    "MeshMetrics",
    "RaftStatus",
    "write_failure_code",
]

RaftStatus = Callable[[], Mapping[str, Any] | None]

# 0.5 ms to 10 s: a loopback Envoy ACKs in ~1-15 ms; a loaded one in hundreds of ms.
PUSH_ACK_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)
# pysyncobj commits take ~0.25 ms unbatched on loopback, ~100 ms batched (FACTS.md).
COMMIT_BUCKETS = PUSH_ACK_BUCKETS
# the xDS types repstage_xds_proxies counts (a fixed label set: a client cannot add one)
KNOWN_TYPES = ("cds", "eds", "lds", "rds", "sds")
# Detection to the last ACK: sub-second with fast probes, tens of seconds with Consul TTLs.
FAILOVER_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)


def write_failure_code(exc: BaseException) -> str:
    """The `code` label for a failed write: a Rejection's code (not_found, stale_epoch,
    conflict, invalid), or no_quorum, commit_timeout, no_quorum_outcome_unknown, error."""
    if isinstance(exc, Rejected):
        return exc.rejection.code
    if isinstance(exc, NoQuorum) and isinstance(exc, CommitTimeout):
        return "no_quorum_outcome_unknown"
    if isinstance(exc, NoQuorum):
        return "no_quorum"
    if isinstance(exc, CommitTimeout):
        return "commit_timeout"
    return "error"


def _history_counter(registry: CollectorRegistry) -> Counter:
    return Counter(
        "repstage_failover_history",
        "Failover records committed to the replicated history, by event: published, failed (not "
        "replicated), dropped (the oldest record left the bounded history), keys_dropped (an "
        "idempotency key was forgotten)",
        ["event"],
        registry=registry,
    )


def _peer_counter(registry: CollectorRegistry) -> Counter:
    return Counter(
        "repstage_peer_unreachable",
        "Cluster-wide views in which another node did not answer within api.peer_timeout",
        ["peer"],
        registry=registry,
    )


def _consul_counters(registry: CollectorRegistry) -> tuple[Counter, Counter]:
    anomalies = Counter(
        "repstage_consul_anomalies",
        "Consul health answers that look wrong, by kind: acl_filtered, empty_answer, "
        "ambiguous, superseded, stale_check, no_checks, warning, rate_limited",
        ["service", "kind"],
        registry=registry,
    )
    reregistrations = Counter(
        "repstage_consul_reregistrations",
        "Times this node found its own Consul registration gone and registered again",
        registry=registry,
    )
    return anomalies, reregistrations


class MeshMetrics:
    """Every metric of one node, in `registry`; a TrackerObserver for the xDS ones."""

    def __init__(self, registry: CollectorRegistry, node_id: str, raft_status: RaftStatus | None = None,
                 state: Callable[[], MeshState] | None = None, leads: Callable[[], bool] = lambda: True) -> None:
        self.registry = registry
        self.node_id = node_id
        self.raft_status = raft_status
        self.lease: LeaseRenewer | None = None  # set by the node when the primary lease is on
        self.services = ServiceWatch()  # the node feeds it applied states and observations
        self._lock = threading.Lock()
        self._live: dict[int, ProxyRecord] = {}  # id(record) -> record, connected ones
        self._held: dict[tuple[int, str], None] = {}  # (id(record), type_url) NACKed, not since ACKed
        self._type_children: dict[str, tuple[Any, Any, Any, Any]] = {}
        self.pushes = Counter("repstage_xds_pushes", "xDS responses sent to proxies", ["type"], registry=registry)
        self.acks = Counter("repstage_xds_acks", "xDS responses proxies accepted (ACK)", ["type"], registry=registry)
        self.nacks = Counter("repstage_xds_nacks", "xDS responses proxies rejected (NACK)", ["type"], registry=registry)
        self.xds_worker_restarts = Counter("repstage_xds_worker_restarts", "xDS worker processes that exited and were "
                                           "started again (xds.workers)", registry=registry)
        self.push_ack = Histogram(
            "repstage_xds_push_ack_seconds",
            "Time from sending an xDS response to the proxy's ACK",
            ["type"],
            buckets=PUSH_ACK_BUCKETS,
            registry=registry,
        )
        self.failover = Histogram(
            "repstage_failover_duration_seconds",
            "Failover or switchover duration, from detection (or request) to the last proxy ACK",
            ["service", "mode"],
            buckets=FAILOVER_BUCKETS,
            registry=registry,
        )
        self.commit = Histogram(
            "repstage_raft_commit_seconds",
            "Time to commit and apply a write through the Raft log, as seen by its submitter",
            buckets=COMMIT_BUCKETS,
            registry=registry,
        )
        self.history = _history_counter(registry)
        self.write_failures = Counter(
            "repstage_write_failures",
            "Writes that did not commit, by code (rejection code, no_quorum, commit_timeout, ...)",
            ["code"],
            registry=registry,
        )
        self._add_forwarding_metrics(registry)
        self.probes = Counter(
            "repstage_probe_results",
            "Leadership probe outcomes per member",
            ["service", "member", "result"],
            registry=registry,
        )
        self.consul_anomalies, self.consul_reregistrations = _consul_counters(registry)
        self._limit_children, self._refusal_children = _guard_counters(registry)
        self.peer_unreachable = _peer_counter(registry)
        self._snapshot_metrics(registry)
        registry.register(_ScrapeTimeCollector(self))
        if state is not None:  # the service and member gauges (telemetry/services.py)
            registry.register(ServiceCollector(self.services, state, leads))

    def _snapshot_metrics(self, registry: CollectorRegistry) -> None:
        self.snapshots = Counter(
            "repstage_snapshots", "Snapshots ended, by service and status (completed, failed, aborted, unknown)",
            ["service", "status"], registry=registry,
        )
        self.snapshot_duration = Histogram(
            "repstage_snapshot_duration_seconds", "Snapshot duration from intent to the member's return to the pool",
            ["service", "status"], buckets=FAILOVER_BUCKETS, registry=registry,
        )
        self.snapshot_limits = Counter(
            "repstage_snapshot_limits", "Snapshot limits hit: lag_bound (no replica qualified, the primary "
            "was used), drain_timeout, take_timeout, keep (the oldest finished snapshot dropped), verify_concurrency "
            "(a drill refused), verify_timeout (a drill stopped at snapshots.verify.timeout), "
            "consistent_hold (a consistent point's window ended before its points were taken)",
            ["limit"], registry=registry,
        )
        self.snapshot_verifications = Counter(
            "repstage_snapshot_verifications", "Restore drills ended, by service and result (ok, failed, interrupted)",
            ["service", "result"], registry=registry,
        )
        self.snapshot_verification_duration = Histogram(
            "repstage_snapshot_verification_duration_seconds", "Restore drill duration, by service and result",
            ["service", "result"], buckets=(0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0),
            registry=registry,
        )
        self.consistent_hold = Histogram(
            "repstage_consistent_hold_seconds", "How long a consistent point held writes (from the pause "
            "to the last point taken), by how the point ended (completed, failed, aborted, unknown)",
            ["status"], buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.25, 0.5, 1.0, 2.5, 10.0), registry=registry,
        )

    def observe_verification(self, service: str, result: str, seconds: float) -> None:
        self.snapshot_verifications.labels(service, result).inc()
        self.snapshot_verification_duration.labels(service, result).observe(seconds)

    # --- TrackerObserver ----------------------------------------------------------------------

    def on_connect(self, record: ProxyRecord) -> None:
        with self._lock:
            self._live[id(record)] = record

    def on_disconnect(self, record: ProxyRecord) -> None:
        key = id(record)
        with self._lock:
            self._live.pop(key, None)
            for held in [h for h in self._held if h[0] == key]:
                del self._held[held]

    def on_send(self, record: ProxyRecord, send: Send) -> None:
        self._by_type(send.type_url)[0].inc()

    def on_ack(self, record: ProxyRecord, ack: Acked, latency: float | None) -> None:
        children = self._by_type(ack.type_url)
        children[1].inc()
        if latency is not None:
            children[3].observe(latency)
        if self._held:
            with self._lock:
                self._held.pop((id(record), ack.type_url), None)

    def on_nack(self, record: ProxyRecord, nack: Nacked) -> None:
        self._by_type(nack.type_url)[2].inc()
        with self._lock:
            self._held[(id(record), nack.type_url)] = None

    def _by_type(self, type_url: str) -> tuple[Any, Any, Any, Any]:
        """(pushes, acks, nacks, push_ack) children for a type: `labels()` takes a lock and
        validates on every call (~5 µs), this dict lookup does not."""
        children = self._type_children.get(type_url)
        if children is None:
            short = res.short_name(type_url)
            children = (
                self.pushes.labels(short), self.acks.labels(short),
                self.nacks.labels(short), self.push_ack.labels(short),
            )
            self._type_children[type_url] = children
        return children

    # --- xds.server.GuardObserver ---------------------------------------------------------------

    def on_limit(self, limit: str) -> None:
        child = self._limit_children.get(limit)
        if child is not None:
            child.inc()

    def on_refusal(self, reason: str) -> None:
        child = self._refusal_children.get(reason)
        if child is not None:
            child.inc()

    def _flagged_counts(self) -> dict[str, int]:
        with self._lock:
            records = list(self._live.values())
        counts = dict.fromkeys(standing.FLAGS, 0)
        for record in records:
            for flag in standing.FLAGS:
                if standing.flags(record, record.clock()).get(flag):
                    counts[flag] += 1
        return counts

    # --- facts observed elsewhere -------------------------------------------------------------

    def observe_failover(self, service: str, seconds: float, mode: str = "follow") -> None:
        """A failover or switchover finished (mode: follow, orchestrate, switchover)."""
        self.failover.labels(service, mode).observe(seconds)

    def observe_history(self, event: str) -> None:
        """A failover record was committed (`published`), not committed (`failed`), pushed the
        oldest one out of the bounded history (`dropped`) or the oldest idempotency key out of
        its bound (`keys_dropped`)."""
        self.history.labels(event).inc()

    def observe_snapshot(self, service: str, status: str, seconds: float) -> None:
        self.snapshots.labels(service, status).inc()
        self.snapshot_duration.labels(service, status).observe(seconds)

    def observe_snapshot_limit(self, limit: str) -> None:
        self.snapshot_limits.labels(limit).inc()

    def observe_consistent_hold(self, status: str, seconds: float) -> None:
        self.consistent_hold.labels(status).observe(seconds)

    def observe_commit(self, seconds: float) -> None:
        self.commit.observe(seconds)

    def observe_write_failure(self, code: str) -> None:
        """`code`: see write_failure_code."""
        self.write_failures.labels(code).inc()

    def _add_forwarding_metrics(self, registry: CollectorRegistry) -> None:
        """Requests carried between nodes (issue 11) and switchovers that outlived their wait."""
        self.forwards = Counter(
            "repstage_api_forwards",
            "Failover requests a follower carried to the leader or refused, by outcome (forwarded, "
            "not_leader: already forwarded once, no_answer: the leader did not answer in time)",
            ["outcome"],
            registry=registry,
        )
        self.switchover_wait_expired = Counter(
            "repstage_switchover_wait_expired",
            "Switchover requests answered 504 switchover_running: api.switchover_wait (or the "
            "request's wait) ended before the switchover",
            registry=registry,
        )

    def observe_forward(self, outcome: str) -> None:
        self.forwards.labels(outcome).inc()

    def observe_probe(self, service: str, member: str, result: str) -> None:
        """`result`: what the probe found, e.g. primary, replica, down, error."""
        self.probes.labels(service, member, result).inc()

    def observe_peer_unreachable(self, peer: str) -> None:
        """A cluster-wide view could not ask `peer` (a control-plane node id: bounded set)."""
        self.peer_unreachable.labels(peer).inc()

    def observe_consul_anomaly(self, service: str, kind: str) -> None:
        self.consul_anomalies.labels(service, kind).inc()

    # --- scrape-time views --------------------------------------------------------------------

    def _connected_counts(self) -> tuple[dict[tuple[str, str], int], dict[str, int], dict[tuple[str, str], int]]:
        """(connected by (type, stream kind), streams by kind, proxies by (type, sync state))."""
        with self._lock:
            records = list(self._live.values())
            held = set(self._held)
        by_type: dict[tuple[str, str], int] = {}
        streams: dict[str, int] = {}
        syncs: dict[tuple[str, str], int] = {}
        for record in records:
            streams[record.kind] = streams.get(record.kind, 0) + 1
            for type_url, requested, _ in record.type_flags():
                if requested:
                    short = res.short_name(type_url)
                    by_type[(short, record.kind)] = by_type.get((short, record.kind), 0) + 1
                    if short in KNOWN_TYPES:
                        sync = _sync_state(record, type_url, (id(record), type_url) in held)
                        syncs[(short, sync)] = syncs.get((short, sync), 0) + 1
        return by_type, streams, syncs

    def _held_counts(self) -> dict[str, int]:
        with self._lock:
            held = list(self._held)
        counts = {short: 0 for short in ("cds", "eds", "lds", "rds")}
        for _, type_url in held:
            short = res.short_name(type_url)
            counts[short] = counts.get(short, 0) + 1
        return counts


def _sync_state(record: ProxyRecord, type_url: str, nacked: bool) -> str:
    """nacked (its latest response for the type was NACKed, not since ACKed), behind (a response
    sent and not ACKed yet) or synced. From what the tracker recorded, O(1): the protocol's
    `type_sync_state` digests the proxy's resources (~300 ms a scrape at 5,000 proxies)."""
    if nacked:
        return "nacked"
    status = record.types.get(type_url)
    if status is not None and status.sent_version and status.sent_version != status.acked_version:
        return "behind"
    return "synced"


def _guard_counters(registry: CollectorRegistry) -> tuple[dict[str, Any], dict[str, Any]]:
    """The xDS limit-hit and refusal counters' children, one per name of a fixed set, created
    up front: clients cannot add labels."""
    limit_hits = Counter(
        "repstage_xds_limit_hits",
        "xDS clients that went over a limit (xds.limits), by limit",
        ["limit"],
        registry=registry,
    )
    refusals = Counter(
        "repstage_xds_streams_refused",
        "xDS streams refused before they were served (plaintext from a non-loopback peer, "
        "no client certificate, node id not matching the certificate), by reason",
        ["reason"],
        registry=registry,
    )
    return (
        {name: limit_hits.labels(name) for name in LIMIT_NAMES},
        {name: refusals.labels(name) for name in REFUSAL_REASONS},
    )


_RAFT_GAUGES: tuple[tuple[str, str, str], ...] = (
    ("repstage_raft_term", "term", "Current Raft term as this node sees it"),
    ("repstage_raft_commit_index", "commit_index", "Highest Raft log index known committed"),
    ("repstage_raft_applied_index", "applied_index", "Highest Raft log index applied on this node"),
    ("repstage_raft_is_leader", "is_leader", "1 when this node is the Raft leader"),
    ("repstage_raft_has_quorum", "has_quorum", "1 when this node sees a leader with a majority"),
)


class _ScrapeTimeCollector(Collector):
    """Gauges computed when Prometheus scrapes: no thread, no polling."""

    def __init__(self, metrics: MeshMetrics) -> None:
        self.metrics = metrics

    def describe(self) -> list[Metric]:
        return [*self._families({}, {}, {}, None), *self._lease_families()]

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        by_type, streams, syncs = m._connected_counts()
        status: Mapping[str, Any] | None = None
        if m.raft_status is not None:
            try:
                status = m.raft_status()
            except Exception:  # a scrape must not fail because the store is closing
                log.debug("raft status unavailable for metrics", exc_info=True)
        yield from self._families(by_type, streams, m._held_counts(), status)
        yield self._proxies(syncs)
        yield from self._lease_families()

    def _proxies(self, syncs: dict[tuple[str, str], int]) -> Metric:
        family = GaugeMetricFamily(
            "repstage_xds_proxies",
            "Connected proxies of this control-plane node by xDS type and state: synced (holds what "
            "this node would send), behind (sent, not ACKed yet) or nacked (rejected the latest)",
            labels=["control_plane", "type", "state"],
        )
        for short in KNOWN_TYPES:
            for state in ("synced", "behind", "nacked"):
                family.add_metric([self.metrics.node_id, short, state], syncs.get((short, state), 0))
        return family

    def _families(
        self,
        by_type: dict[tuple[str, str], int],
        streams: dict[str, int],
        held: dict[str, int],
        status: Mapping[str, Any] | None,
    ) -> Iterator[Metric]:
        node = self.metrics.node_id
        connected = GaugeMetricFamily(
            "repstage_xds_connected_proxies",
            "Connected proxies subscribed to an xDS type, by control-plane node and stream kind",
            labels=["control_plane", "type", "stream"],
        )
        for (short, kind), count in sorted(by_type.items()):
            connected.add_metric([node, short, kind], count)
        yield connected
        open_streams = GaugeMetricFamily(
            "repstage_xds_streams",
            "Open ADS streams on this control-plane node, by stream kind",
            labels=["control_plane", "stream"],
        )
        for kind in ("sotw", "delta"):
            open_streams.add_metric([node, kind], streams.get(kind, 0))
        yield open_streams
        nacked = GaugeMetricFamily(
            "repstage_xds_nacked_held",
            "Proxy xDS types whose latest response was NACKed and not since ACKed: "
            "the proxy holds back on its last good config",
            labels=["type"],
        )
        for short, count in sorted(held.items()):
            nacked.add_metric([short], count)
        yield nacked
        flagged = GaugeMetricFamily(
            "repstage_xds_proxies_flagged",
            "Connected proxies not waited for by a change: version_ahead (claims a version newer "
            "than this node's snapshot) or never_acked (never ACKed anything)",
            labels=["flag"],
        )
        for flag, count in sorted(self.metrics._flagged_counts().items()):
            flagged.add_metric([flag], count)
        yield flagged
        yield from self._raft_families(status)

    @staticmethod
    def _raft_families(status: Mapping[str, Any] | None) -> Iterator[Metric]:
        for name, key, doc in _RAFT_GAUGES:
            family = GaugeMetricFamily(name, doc)
            if status is not None and status.get(key) is not None:
                family.add_metric([], float(status[key]))
            yield family
        peers = status.get("peers") if status is not None else None
        total = GaugeMetricFamily("repstage_raft_peers", "Other Raft nodes in the cluster")
        up = GaugeMetricFamily("repstage_raft_peers_connected", "Other Raft nodes connected to this one")
        if isinstance(peers, list):
            total.add_metric([], len(peers))
            up.add_metric([], sum(1 for p in peers if isinstance(p, Mapping) and p.get("connected")))
        yield total
        yield up
        refused = CounterMetricFamily(
            "repstage_raft_frames_refused",
            "Raft connections dropped for a frame over raft.unauthenticated_frame_limit "
            "before the peer proved the password",
        )
        if status is not None and status.get("frames_refused") is not None:
            refused.add_metric([], float(status["frames_refused"]))
        yield refused

    def _lease_families(self) -> Iterator[Metric]:
        lease = self.metrics.lease
        renewals = CounterMetricFamily(
            "repstage_xds_lease_renewals", "Rounds that renewed the primary lease on every stream"
        )
        skipped = CounterMetricFamily(
            "repstage_xds_lease_skipped",
            "Rounds that did not renew the primary lease: no Raft majority confirmed this node in time",
        )
        fresh = GaugeMetricFamily(
            "repstage_xds_lease_fresh", "1 while this node is proven current; 0: it serves primaries failed closed"
        )
        if lease is not None:
            renewals.add_metric([], lease.counters.renewals)
            skipped.add_metric([], lease.counters.skipped)
            fresh.add_metric([], 1.0 if lease.fresh else 0.0)
        yield from (renewals, skipped, fresh)
