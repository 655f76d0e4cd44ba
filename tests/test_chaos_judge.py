"""The chaos suite's judge (integration/chaos/report.py) can fail: each must-be-0 row counts a
planted violation, and leaves alone the look-alikes that are not one."""

from __future__ import annotations

from types import SimpleNamespace

from integration.chaos import report
from integration.chaos.workload import DataWrite
from integration.history import HistoryRecorder


def chaos_with(seen: list[tuple[float, float, str | None, int]], writes: list[DataWrite]) -> object:
    return SimpleNamespace(watcher=SimpleNamespace(seen=seen), data=[SimpleNamespace(acked=writes)])


SEEN = [(0.0, 0.1, "r0", 5), (1.0, 1.1, "r1", 9), (3.0, 3.1, "r1", 9), (4.0, 4.1, "r0", 12), (5.0, 5.1, "r0", 12)]


def w(member: str, invoked: float, acked: float) -> DataWrite:
    return DataWrite(0, f"k{invoked}", member, invoked, acked)


def test_a_write_acknowledged_by_a_demoted_member_is_a_split_brain_write() -> None:
    assert report.split_brain(chaos_with(SEEN, [w("r0", 1.5, 1.6)])) == 1
    # fail-closed (no primary) counts too: the member was demoted
    closed = [(0.0, 0.1, None, 6), (2.0, 2.1, None, 6)]
    assert report.split_brain(chaos_with(closed, [w("r0", 0.5, 0.6)])) == 1


def test_writes_the_sightings_do_not_bracket_are_not_counted() -> None:
    writes = [
        w("r1", 1.5, 1.6),  # the primary itself
        w("r0", 0.5, 0.6),  # before the change was seen committed
        w("r0", 1.5, 3.5),  # acknowledged after the last sighting of r1: not bracketed
        w("r0", 3.5, 4.5),  # r0 is primary again by then (epoch 12)
    ]
    assert report.split_brain(chaos_with(SEEN, writes)) == 0


def recorder_with(ops: list[tuple[str, dict[str, object], dict[str, object] | None]]) -> HistoryRecorder:
    recorder = HistoryRecorder()
    for name, given, output in ops:
        op = recorder.invoke("ctl", name, given)
        if output is None:
            recorder.unknown(op)
        else:
            recorder.ok(op, output)
    return recorder


def test_control_writes_lost_or_read_back_stale_are_counted() -> None:
    write = ("set_primary", {"member": "b", "expected_epoch": None}, {"primary": "b", "epoch": 10})
    good = SimpleNamespace(recorder=recorder_with([write, ("read", {}, {"primary": "b", "epoch": 10})]))
    assert report.control_verdict(good, ("a", 3), ("b", 10)) == (0, 0)
    lost = SimpleNamespace(recorder=recorder_with([write]))
    assert report.control_verdict(lost, ("a", 3), ("a", 3))[0] == 1
    stale = SimpleNamespace(recorder=recorder_with([write, ("read", {}, {"primary": "a", "epoch": 3})]))
    assert report.control_verdict(stale, ("a", 3), ("b", 10)) == (0, 1)
    refused = ("set_primary", {"member": "c", "expected_epoch": None}, {"not_applied": True})
    dropped = SimpleNamespace(recorder=recorder_with([refused, ("read", {}, {"primary": "a", "epoch": 3})]))
    assert report.control_verdict(dropped, ("a", 3), ("a", 3)) == (0, 0)
