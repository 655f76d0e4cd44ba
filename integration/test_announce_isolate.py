"""Issue 14's acceptance for announces (item 1), with real parts: one `repstage-mesh serve`, one
Envoy, Redis `r0` (primary) and `r1` (replica), a writer through Envoy. `r1` is promoted by hand
while `r0` stays up and still says master; then POST /v1/services/cache/primary {"member": "r1"}.

- No write is acknowledged by `r0` after the POST answered (break-before-make: the answer comes
  after every proxy ACKed the fence and closed its connections to `r0`).
- The change is one failover record, in `/v1/failovers`, with the same timeline as the answer.
- Its trace reaches a real OTLP receiver configured only through `OTEL_*` variables, as a child
  of the caller's trace when the POST carried a W3C `traceparent`.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from repstage_mesh.cli.workload import RedisWriter

from .databases import redis_server_binary
from .isolate import IsolateRig, isolate_rig, post_primary, switch
from .otlp_receiver import OtlpReceiver, ReceivedSpan

# timing windows that need the machine's cores: run alone (pyproject.toml, markers)
pytestmark = [
    pytest.mark.serial,
    pytest.mark.skipif(redis_server_binary() is None, reason="redis-server not installed"),
]

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN = "00f067aa0ba902b7"


@pytest.fixture
def receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[OtlpReceiver]:
    """An OTLP receiver the node finds through OTEL_* variables only (no telemetry section)."""
    for name in ("OTEL_SDK_DISABLED", "OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                 "OTEL_SERVICE_NAME", "REPSTAGE_TELEMETRY__OTLP_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    with OtlpReceiver() as otlp:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.endpoint)
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "200")  # export ended spans within 0.2 s
        yield otlp


@pytest.fixture
def rig(receiver: OtlpReceiver) -> Iterator[IsolateRig]:
    with isolate_rig() as r:
        yield r


def test_no_write_reaches_the_old_primary_after_the_announce_answered(rig: IsolateRig) -> None:
    with RedisWriter(rig.port) as writer:
        result = switch(rig, writer, headers={"Idempotency-Key": "isolate-1"})
    assert result.status == 200, result.answer
    answer = result.answer
    assert (answer["primary"], answer["previous_primary"], answer["changed"]) == ("r1", "r0", True)
    assert result.acked_after_answer > 100  # the writer kept going, on r1
    assert result.old_after_answer == 0, f"{result.old_after_answer} writes acknowledged by r0 after the answer"
    assert result.first_new is not None and result.first_new > result.sent
    # break-before-make, in the answer's timeline
    record = answer["failover"]
    names = [e["name"] for e in record["timeline"]]
    for name in ("fenced", "proxies_fenced", "connections_closed", "committed", "first_routable"):
        assert name in names, (name, names)
    assert names.index("proxies_fenced") < names.index("connections_closed") < names.index("committed")
    assert record["missed_fence"] == [] and record["missed_route"] == []
    # the same record in the history, as any other change
    history = rig.cp.get("/v1/failovers")["failovers"]
    assert [r["id"] for r in history if r["kind"] == "announce"] == [record["id"]]
    assert rig.cp.get(f"/v1/failovers/{record['id']}")["status"] == "done"
    # a retry with the same key answers the same change and changes nothing
    epoch = rig.cp.get("/v1/services/cache")["epoch"]
    status, again = post_primary(rig, "r1", {"Idempotency-Key": "isolate-1"})
    assert status == 200 and again["replayed"] is True and again["failover"]["id"] == record["id"]
    assert rig.cp.get("/v1/services/cache")["epoch"] == epoch
    print(f"switch (POST sent -> first write on r1): {result.switch_ms:.1f} ms; "
          f"POST answered after {(result.answered - result.sent) * 1000:.1f} ms")


def _failover_roots(spans: list[ReceivedSpan]) -> list[ReceivedSpan]:
    return [s for s in spans if s.name == "failover"]


def test_the_announce_is_one_trace_continuing_the_callers(rig: IsolateRig, receiver: OtlpReceiver) -> None:
    receiver.clear()
    traceparent = f"00-{TRACE_ID}-{PARENT_SPAN}-01"
    status, answer = post_primary(rig, "r1", {"traceparent": traceparent}, {"epoch": 41})
    assert status == 200, answer

    def complete(spans: list[ReceivedSpan]) -> bool:
        names = [s.name for s in spans if s.trace_id == TRACE_ID]
        return "failover" in names and names.count("push") >= 2  # the fence and the new primary
    spans = receiver.wait_for(complete, timeout=15.0)
    (root,) = _failover_roots(spans)
    assert root.trace_id == TRACE_ID and root.parent_span_id == PARENT_SPAN  # a child of the caller's
    attrs = root.attributes
    assert attrs["repstage.service"] == "cache" and attrs["repstage.new_primary"] == "r1"
    assert attrs["repstage.old_primary"] == "r0" and attrs["repstage.mode"] == "follow"
    ours = [s for s in spans if s.trace_id == TRACE_ID]
    assert {s.name for s in ours} >= {"failover", "push", "raft.commit"}
    assert all(s.trace_id == TRACE_ID for s in spans), sorted({(s.name, s.trace_id) for s in spans})

    # without a traceparent: a trace of its own
    receiver.clear()
    status, answer = post_primary(rig, "r0", body={"epoch": 42})
    assert status == 200, answer
    spans = receiver.wait_for(lambda s: bool(_failover_roots(s)), timeout=15.0)
    (root,) = _failover_roots(spans)
    assert root.trace_id != TRACE_ID and root.parent_span_id == ""
    # a stale claim is refused and starts nothing
    status, answer = post_primary(rig, "r1", body={"epoch": 42})
    assert status == 409 and answer["error"]["code"] == "stale_epoch" and answer["error"]["field"] == "epoch"
