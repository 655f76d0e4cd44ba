"""The primary lease (issue 11): TTL-wrapped resources, renewals by the stream protocols, the
renewer that renews only after a proof, the proxy wait covered by the lease, the config field."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

import pytest
from envoy_data_plane.envoy.config.cluster.v3 import Cluster
from envoy_data_plane.envoy.service.discovery.v3 import (
    DeltaDiscoveryResponse,
    DiscoveryResponse,
    Resource,
)
from fakes import eventually

from repstage_mesh.api.progress import PeerProgress
from repstage_mesh.config import XdsConfig
from repstage_mesh.core.models import MeshState, ServiceSpec, ServiceState
from repstage_mesh.failover.proxies import await_proxies
from repstage_mesh.render.envoy import primary_clusters, render, without_primaries
from repstage_mesh.xds import resources as res
from repstage_mesh.xds import wire
from repstage_mesh.xds.cache import Snapshot
from repstage_mesh.xds.lease import LeaseRenewer
from repstage_mesh.xds.protocol import (
    Acked,
    DeltaRequest,
    DeltaStream,
    Send,
    SotwRequest,
    SotwStream,
)
from repstage_mesh.xds.sync_state import type_sync_state
from repstage_mesh.xds.tracker import ProxyTracker


def leased_snapshot(index: int, salt: str = "1", ttl: float | None = 1.5) -> Snapshot:
    clusters = {"p": Cluster(name="p", alt_stat_name=salt), "r": Cluster(name="r")}
    return Snapshot.build(index, {res.CLUSTER: clusters}, ttls={(res.CLUSTER, "p"): ttl} if ttl else None)


# --- wire and cache ------------------------------------------------------------------------------


def test_a_leased_resource_goes_out_wrapped_with_its_ttl_in_sotw_and_delta() -> None:
    snap = leased_snapshot(3)
    p, r = snap.get(res.CLUSTER)["p"], snap.get(res.CLUSTER)["r"]
    assert p.ttl == 1.5 and r.ttl is None
    body = wire.sotw_body("3-x", (p.any_bytes, r.any_bytes), res.CLUSTER) + wire.sotw_tail("1")
    parsed = DiscoveryResponse.parse(body)
    assert [a.type_url for a in parsed.resources] == [wire.RESOURCE_TYPE, res.CLUSTER]
    wrapped = Resource.parse(parsed.resources[0].value)
    assert wrapped.name == "p" and wrapped.ttl == timedelta(seconds=1.5) and wrapped.version == p.version
    assert wrapped.resource is not None and Cluster.parse(wrapped.resource.value).alt_stat_name == "1"
    delta = DeltaDiscoveryResponse.parse(wire.delta_response("3", (p.delta_bytes,), res.CLUSTER, (), "1"))
    assert delta.resources[0].ttl == timedelta(seconds=1.5) and delta.resources[0].version == p.version


def test_a_new_lease_length_is_a_new_version_and_unchanged_resources_are_not_encoded_again() -> None:
    one = leased_snapshot(1)
    again = Snapshot.build(2, {res.CLUSTER: {"p": one._messages[(res.CLUSTER, "p")][0]}}, one,
                           ttls={(res.CLUSTER, "p"): 1.5})
    assert again.get(res.CLUSTER)["p"] is one.get(res.CLUSTER)["p"]
    longer = Snapshot.build(3, {res.CLUSTER: {"p": one._messages[(res.CLUSTER, "p")][0]}}, one,
                            ttls={(res.CLUSTER, "p"): 3.0})
    assert longer.get(res.CLUSTER)["p"].version != one.get(res.CLUSTER)["p"].version
    assert wire.duration(0.25) == wire.varint(2 << 3) + wire.varint(250_000_000)


# --- the protocols --------------------------------------------------------------------------------


def acked_sotw(snap: Snapshot) -> tuple[SotwStream, Send]:
    s = SotwStream(snap)
    [send] = s.receive(SotwRequest(res.CLUSTER))
    assert isinstance(send, Send)
    s.receive(SotwRequest(res.CLUSTER, send.version, send.nonce))
    return s, send


def test_sotw_renewal_resends_the_whole_set_at_the_same_version_and_is_acked() -> None:
    s, first = acked_sotw(leased_snapshot(1))
    [renewal] = s.renew()
    assert isinstance(renewal, Send)
    assert renewal.version == first.version and renewal.nonce != first.nonce
    assert [r.name for r in renewal.resources] == ["p", "r"]  # SotW: everything of the type
    assert s.renew() == []  # in flight: that response renews
    assert s.receive(SotwRequest(res.CLUSTER, renewal.version, renewal.nonce)) == [
        Acked(res.CLUSTER, renewal.version, renewal.nonce)
    ]
    assert type_sync_state(s, res.CLUSTER) == "synced"


def test_sotw_no_renewal_without_a_lease_or_for_a_client_that_refused_the_current_config() -> None:
    unleased, _ = acked_sotw(leased_snapshot(1, ttl=None))
    assert unleased.renew() == []
    s, first = acked_sotw(leased_snapshot(1))
    [bad] = s.update(leased_snapshot(2, "BAD"))
    assert isinstance(bad, Send)
    s.receive(SotwRequest(res.CLUSTER, first.version, bad.nonce, error="refused"))
    assert type_sync_state(s, res.CLUSTER) == "nacked"
    assert s.renew() == []  # it keeps an older config: left to expire


def test_sotw_a_request_that_is_not_an_ack_is_answered_even_if_unchanged() -> None:
    s, first = acked_sotw(leased_snapshot(1))
    # Envoy asks again with the latest nonce (already ACKed): e.g. its leased cluster expired
    # and came back, and it watches the endpoints anew.
    [answer] = s.receive(SotwRequest(res.CLUSTER, first.version, first.nonce))
    assert isinstance(answer, Send) and answer.version == first.version


def test_sotw_a_type_the_client_watches_nothing_of_gets_no_answer_and_is_idle() -> None:
    eds = Snapshot.build(1, {res.ENDPOINT: {}})
    s = SotwStream(eds)
    assert s.receive(SotwRequest(res.ENDPOINT, "1-abc")) == []
    assert type_sync_state(s, res.ENDPOINT) == "idle"


def test_delta_renewal_resends_only_the_leased_resources_the_client_holds() -> None:
    s = DeltaStream(leased_snapshot(1))
    [send] = s.receive(DeltaRequest(res.CLUSTER))
    assert isinstance(send, Send)
    s.receive(DeltaRequest(res.CLUSTER, response_nonce=send.nonce))
    [renewal] = s.renew()
    assert isinstance(renewal, Send) and [r.name for r in renewal.resources] == ["p"]
    s.receive(DeltaRequest(res.CLUSTER, response_nonce=renewal.nonce))
    assert type_sync_state(s, res.CLUSTER) == "synced"
    assert DeltaStream(leased_snapshot(1, ttl=None)).renew() == []


# --- the renewer ----------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_the_renewer_renews_only_after_a_timely_proof_and_fails_closed_after_a_whole_lease() -> None:
    clock = Clock()
    answers: list[tuple[bool, float]] = []
    fresh: list[bool] = []
    renewed: list[float] = []

    async def confirm(timeout: float) -> bool:
        ok, takes = answers.pop(0)
        clock.now += takes
        return ok

    def renew() -> int:
        renewed.append(clock.now)
        return 2

    lease = LeaseRenewer(3.0, confirm, renew, fresh.append, clock=clock)
    assert (lease.period, lease.max_age, lease.bound) == (1.0, 0.5, 3.5)
    answers += [(True, 0.01), (True, 0.6), (False, 1.0), (False, 1.0), (False, 1.0), (True, 0.01)]
    assert await lease.round() and fresh == [True] and lease.counters.streams_renewed == 2
    assert not await lease.round()  # proven, but too late: the state may be older than max_age
    assert not await lease.round()
    assert fresh == [True]  # 1.6 s since the last proof that renewed: still within ttl - period
    assert not await lease.round()
    assert fresh == [True, False]  # 2.6 s: a period before Envoy's TTL runs out, fail closed here
    assert not await lease.round() and fresh == [True, False]
    assert await lease.round() and fresh == [True, False, True]
    assert (lease.counters.renewals, lease.counters.skipped) == (2, 4)
    assert len(renewed) == 2


async def test_a_failing_proof_is_no_proof() -> None:
    async def confirm(timeout: float) -> bool:
        raise OSError("no quorum")

    lease = LeaseRenewer(1.0, confirm, lambda: 0)
    assert not await lease.round() and lease.counters.skipped == 1 and not lease.fresh
    with pytest.raises(ValueError, match="ttl"):
        LeaseRenewer(0.0, confirm, lambda: 0)


# --- render, the proxy wait, the config -----------------------------------------------------------


def test_primary_clusters_and_failing_closed_without_primaries() -> None:
    spec = ServiceSpec.model_validate({
        "name": "orders", "protocol": "tcp", "listen_port": 7000,
        "members": [{"name": "a", "address": "10.0.0.1", "port": 1}, {"name": "b", "address": "10.0.0.2", "port": 1}],
    })
    state = MeshState(services={"orders": ServiceState(spec=spec, primary="a", epoch=3)}, index=3, last_change=3)
    [name] = primary_clusters(state)
    closed = without_primaries(state)
    assert closed.services["orders"].primary is None and closed.last_change == 3
    assert any(lo.lb_endpoints for lo in render(state)[res.ENDPOINT][name].endpoints)
    assert not any(lo.lb_endpoints for lo in render(closed)[res.ENDPOINT][name].endpoints)


async def test_an_unreachable_node_is_covered_by_the_lease_when_its_bound_fits_in_the_wait() -> None:
    here = ProxyTracker(control_plane="cp-1")
    dead = PeerProgress("cp-3", "127.0.0.1:9", None)  # discard port: connection refused
    started = time.monotonic()
    acks = await await_proxies(here, "cp-1", [dead], 7, timeout=1.0, lease=0.6)
    assert time.monotonic() - started >= 0.7  # the bound and the margin, within the timeout
    assert acks.leased == ("cp-3",) and acks.missed == () and acks.unreachable == ()
    acks = await await_proxies(here, "cp-1", [dead], 7, timeout=0.3)
    assert acks.leased == () and acks.unreachable == ("cp-3",)
    # A lease longer than the wait cannot cover the node: reported unreachable, as a risk.
    acks = await await_proxies(here, "cp-1", [dead], 7, timeout=0.3, lease=0.6)
    assert acks.leased == () and acks.unreachable == ("cp-3",) and acks.missed == ("cp-3:unreachable",)


def test_the_lease_field_is_off_by_default_and_bounded() -> None:
    assert XdsConfig().primary_lease_ms is None
    assert XdsConfig(primary_lease_ms=3000).primary_lease_ms == 3000
    with pytest.raises(ValueError, match="primary_lease_ms"):
        XdsConfig(primary_lease_ms=10)


async def test_the_renewer_runs_rounds_every_period_until_cancelled() -> None:
    renewed: list[float] = []

    async def confirm(timeout: float) -> bool:
        return True

    lease = LeaseRenewer(0.3, confirm, lambda: renewed.append(time.monotonic()) or 0)
    task = asyncio.create_task(lease.run())
    try:
        await eventually(lambda: len(renewed) >= 2, "two renewals")
    finally:
        task.cancel()
    assert renewed[1] - renewed[0] >= 0.09  # one period (0.1 s) apart
