"""ProbeTracker: interval/fall/rise hysteresis over raw probe results, driven by hypothesis."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from repstage_mesh.core.observations import (
    MemberStatus,
    Observation,
    ProbeOutcome,
    ProbeResult,
    ProbeTracker,
    parse_lsn,
)

PRIMARY = ProbeResult.ok(MemberStatus.PRIMARY, offset=100)
REPLICA = ProbeResult.ok(MemberStatus.REPLICA, offset=90, upstream="127.0.0.1:6379")
UP = ProbeResult.ok(MemberStatus.UNKNOWN, detail="up")
REFUSED = ProbeResult.failed(ProbeOutcome.REFUSED, "connection refused")
TIMEOUT = ProbeResult.failed(ProbeOutcome.TIMEOUT, "no answer within 0.25 s")
ERROR = ProbeResult.failed(ProbeOutcome.ERROR, "LOADING")

results = st.sampled_from([PRIMARY, REPLICA, UP, REFUSED, TIMEOUT, ERROR])


def tracker(
    fall: int = 3, rise: int = 2, refresh: float = 1.0, refused_fall: int | None = None
) -> ProbeTracker:
    return ProbeTracker(
        "orders",
        "a",
        fall=fall,
        rise=rise,
        source="probe:redis",
        offset_refresh=refresh,
        refused_fall=refused_fall,
    )


def run(
    t: ProbeTracker, feed: list[ProbeResult], step: float = 0.1
) -> list[tuple[int, Observation]]:
    out = []
    for i, result in enumerate(feed):
        obs = t.feed(result, i * step)
        if obs is not None:
            out.append((i, obs))
    return out


def status_changes(emitted: list[tuple[int, Observation]]) -> list[tuple[int, Observation]]:
    changes, last = [], None
    for i, obs in emitted:
        if obs.status is not last:
            changes.append((i, obs))
            last = obs.status
    return changes


def test_first_status_needs_rise_successes() -> None:
    t = tracker()
    assert t.feed(PRIMARY, 0.0) is None
    obs = t.feed(PRIMARY, 0.1)
    assert obs is not None
    assert (obs.status, obs.offset, obs.source, obs.at) == (
        MemberStatus.PRIMARY,
        100,
        "probe:redis",
        0.1,
    )
    assert t.status is MemberStatus.PRIMARY


def test_tcp_up_is_emitted_as_unknown() -> None:
    t = tracker()
    emitted = run(t, [UP, UP, UP])
    assert [(i, o.status, o.detail) for i, o in emitted] == [(1, MemberStatus.UNKNOWN, "up")]


def test_down_after_fall_refusals_says_refused() -> None:
    t = tracker()  # refused_fall not given: refused counts like any failure
    emitted = run(t, [PRIMARY, PRIMARY, REFUSED, REFUSED, REFUSED, REFUSED])
    assert [(i, o.status) for i, o in emitted] == [
        (1, MemberStatus.PRIMARY),
        (4, MemberStatus.DOWN),
    ]
    down = emitted[-1][1]
    assert down.detail.startswith("refused: connection refused")
    assert "3 consecutive failures: refused, refused, refused" in down.detail
    assert down.offset is None


def test_since_is_when_the_streak_began() -> None:
    t = tracker()
    slow = ProbeResult.failed(ProbeOutcome.TIMEOUT, "silent", latency=0.25)
    t.feed(PRIMARY, 0.0)
    up = t.feed(PRIMARY, 0.1)
    assert up is not None and up.since == 0.0
    assert t.feed(slow, 0.5) is None
    assert t.feed(slow, 0.75) is None
    down = t.feed(slow, 1.0)
    assert down is not None and down.status is MemberStatus.DOWN
    assert down.since == 0.25  # the first failed probe started at 0.5 - 0.25


def test_down_after_timeouts_says_timeout() -> None:
    t = tracker()
    emitted = run(t, [REPLICA, REPLICA, TIMEOUT, REFUSED, TIMEOUT])
    down = emitted[-1][1]
    assert down.status is MemberStatus.DOWN
    assert down.detail.startswith("timeout")
    assert "timeout, refused, timeout" in down.detail


def test_a_single_lost_probe_changes_nothing() -> None:
    t = tracker()
    emitted = run(t, [PRIMARY, PRIMARY, TIMEOUT, PRIMARY, REFUSED, REFUSED, PRIMARY, PRIMARY])
    assert [o.status for _, o in emitted] == [MemberStatus.PRIMARY]


def test_promotion_needs_rise_agreeing_answers() -> None:
    t = tracker()
    emitted = run(t, [REPLICA, REPLICA, PRIMARY, REPLICA, PRIMARY, PRIMARY])
    assert [(i, o.status) for i, o in emitted] == [
        (1, MemberStatus.REPLICA),
        (5, MemberStatus.PRIMARY),
    ]


def test_offset_refresh_is_rate_limited() -> None:
    t = tracker(refresh=1.0)
    t.feed(ProbeResult.ok(MemberStatus.PRIMARY, offset=1), 0.0)
    assert t.feed(ProbeResult.ok(MemberStatus.PRIMARY, offset=1), 0.1) is not None
    assert t.feed(ProbeResult.ok(MemberStatus.PRIMARY, offset=5), 0.5) is None
    latest = t.latest
    assert latest is not None and latest.offset == 5  # fresh offset available without emission
    obs = t.feed(ProbeResult.ok(MemberStatus.PRIMARY, offset=9), 1.2)
    assert obs is not None and (obs.status, obs.offset) == (MemberStatus.PRIMARY, 9)
    assert t.feed(ProbeResult.ok(MemberStatus.PRIMARY, offset=9), 5.0) is None  # unchanged offset


def test_upstream_change_is_emitted_at_once() -> None:
    t = tracker()
    run(t, [REPLICA, REPLICA])
    moved = ProbeResult.ok(MemberStatus.REPLICA, offset=90, upstream="127.0.0.1:7000")
    obs = t.feed(moved, 0.3)
    assert (
        obs is not None and obs.upstream == "127.0.0.1:7000" and obs.status is MemberStatus.REPLICA
    )


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="fall"):
        ProbeTracker("s", "m", fall=0, rise=1, source="x")
    with pytest.raises(ValueError, match="rise"):
        ProbeTracker("s", "m", fall=1, rise=0, source="x")
    with pytest.raises(ValueError, match="role"):
        ProbeResult(ProbeOutcome.OK, MemberStatus.DOWN)
    with pytest.raises(ValueError, match="role"):
        ProbeResult(ProbeOutcome.REFUSED, MemberStatus.PRIMARY)


def test_parse_lsn() -> None:
    assert parse_lsn("0/3000060") == 0x3000060
    assert parse_lsn("1/0") == 1 << 32
    with pytest.raises(ValueError):
        parse_lsn("3000060")


@given(
    ok=st.sampled_from([PRIMARY, REPLICA, UP]),
    fail=st.sampled_from([REFUSED, TIMEOUT, ERROR]),
    n=st.integers(min_value=1, max_value=200),
    ok_first=st.booleans(),
)
def test_alternating_flap_changes_status_at_most_once(
    ok: ProbeResult, fail: ProbeResult, n: int, ok_first: bool
) -> None:
    pattern = [ok, fail] if ok_first else [fail, ok]
    feed = [pattern[i % 2] for i in range(n)]
    assert len(status_changes(run(tracker(fall=3, rise=2), feed))) == 0


@settings(max_examples=300)
@given(
    feed=st.lists(results, max_size=300),
    fall=st.integers(min_value=1, max_value=5),
    rise=st.integers(min_value=1, max_value=5),
)
def test_every_change_is_earned_by_a_full_streak(
    feed: list[ProbeResult], fall: int, rise: int
) -> None:
    emitted = run(tracker(fall=fall, rise=rise), feed)
    changes = status_changes(emitted)
    for i, obs in changes:
        needed = fall if obs.status is MemberStatus.DOWN else rise
        window = feed[i - needed + 1 : i + 1]
        assert len(window) == needed
        if obs.status is MemberStatus.DOWN:
            assert all(not r.succeeded for r in window)
            assert obs.detail.startswith(str(feed[i].outcome))
        else:
            assert all(r.succeeded and r.role is obs.status for r in window)
    # Two consecutive changes are at least min(fall, rise) probes apart.
    for (i, _), (j, _) in itertools.pairwise(changes):
        assert j - i >= min(fall, rise)


@settings(max_examples=300)
@given(
    feed=st.lists(st.sampled_from([PRIMARY, REFUSED, TIMEOUT]), max_size=300),
    fall=st.integers(min_value=1, max_value=5),
    rise=st.integers(min_value=1, max_value=5),
)
def test_one_member_up_down_changes_at_most_once_per_fall_plus_rise(
    feed: list[ProbeResult], fall: int, rise: int
) -> None:
    """Between a member going down and going down again lie at least rise + fall probes."""
    changes = status_changes(run(tracker(fall=fall, rise=rise), feed))
    downs = [i for i, o in changes if o.status is MemberStatus.DOWN]
    ups = [i for i, o in changes if o.status is MemberStatus.PRIMARY]
    for a, b in itertools.pairwise(downs):
        assert b - a >= fall + rise
    for a, b in itertools.pairwise(ups):
        assert b - a >= fall + rise


@settings(max_examples=200)
@given(feed=st.lists(results, max_size=200), fall=st.integers(1, 5), rise=st.integers(1, 5))
def test_emission_matches_the_tracked_status(feed: list[ProbeResult], fall: int, rise: int) -> None:
    t = tracker(fall=fall, rise=rise)
    for i, result in enumerate(feed):
        before = t.status
        obs = t.feed(result, i * 0.1)
        if obs is None:
            assert t.status is before
        else:
            assert obs.status is t.status
            assert obs == t.last_emitted


# --- refused is conclusive sooner than silent ------------------------------------------------


def test_two_refusals_are_down_and_say_so() -> None:
    t = tracker(fall=3, refused_fall=2)
    assert t.feed(PRIMARY, 0.0) is None
    assert t.feed(PRIMARY, 0.1) is not None
    assert not t.confirming
    assert t.feed(REFUSED, 0.2) is None
    assert t.confirming  # the runner probes again after retry_interval
    down = t.feed(REFUSED, 0.22)
    assert down is not None and down.status is MemberStatus.DOWN
    assert down.cause is ProbeOutcome.REFUSED
    assert "2 consecutive refused connections" in down.detail
    assert down.since == 0.2
    assert not t.confirming  # down: back to the interval


def test_timeouts_keep_fall_and_set_no_retry() -> None:
    t = tracker(fall=3, refused_fall=2)
    run(t, [PRIMARY, PRIMARY])
    assert t.feed(TIMEOUT, 0.2) is None
    assert not t.confirming
    assert t.feed(TIMEOUT, 0.3) is None
    down = t.feed(TIMEOUT, 0.4)
    assert down is not None and down.cause is ProbeOutcome.TIMEOUT
    assert "3 consecutive failures: timeout, timeout, timeout" in down.detail


def test_one_refusal_between_answers_is_no_failover() -> None:
    t = tracker(fall=3, refused_fall=2)
    emitted = run(t, [PRIMARY, PRIMARY, REFUSED, PRIMARY, REFUSED, PRIMARY, REFUSED, PRIMARY])
    assert [o.status for _, o in emitted] == [MemberStatus.PRIMARY]


def test_refusals_after_a_timeout_count_from_the_first_refusal() -> None:
    t = tracker(fall=5, refused_fall=2)
    run(t, [PRIMARY, PRIMARY])
    assert t.feed(TIMEOUT, 0.2) is None
    assert t.feed(REFUSED, 0.3) is None
    assert t.feed(TIMEOUT, 0.4) is None  # a timeout breaks the refused run
    assert not t.confirming
    assert t.feed(REFUSED, 0.5) is None
    down = t.feed(REFUSED, 0.52)
    assert down is not None and down.cause is ProbeOutcome.REFUSED
    assert down.since == 0.2  # the failure streak began with the timeout


def test_refused_fall_above_fall_is_fall() -> None:
    t = tracker(fall=2, refused_fall=5)
    assert t.refused_fall == 2
    with pytest.raises(ValueError, match="refused_fall"):
        tracker(refused_fall=0)


@settings(max_examples=300)
@given(
    feed=st.lists(results, max_size=300),
    fall=st.integers(min_value=1, max_value=5),
    refused_fall=st.integers(min_value=1, max_value=5),
    rise=st.integers(min_value=1, max_value=5),
)
def test_down_is_earned_by_fall_failures_or_refused_fall_refusals(
    feed: list[ProbeResult], fall: int, refused_fall: int, rise: int
) -> None:
    t = tracker(fall=fall, rise=rise, refused_fall=refused_fall)
    changes = status_changes(run(t, feed))
    for i, obs in changes:
        if obs.status is MemberStatus.DOWN:
            by_fall = i >= fall - 1 and all(not r.succeeded for r in feed[i - fall + 1 : i + 1])
            n = min(fall, refused_fall)
            by_refused = i >= n - 1 and all(r is REFUSED for r in feed[i - n + 1 : i + 1])
            assert by_fall or by_refused
            assert obs.cause is feed[i].outcome
        else:
            assert all(r.succeeded and r.role is obs.status for r in feed[i - rise + 1 : i + 1])
