"""FailoverRecord.as_dict: the same answer as `dataclasses.asdict` (tuples as lists), a copy."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from repstage_mesh.decide.records import FailoverRecord

_JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.tuples(inner, inner)
    | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=10,
)


def _reference(record: FailoverRecord) -> dict[str, Any]:
    data = asdict(record)
    for name in ("missed_fence", "missed_route", "needs_rejoin"):
        data[name] = list(getattr(record, name))
    return data


def _record() -> FailoverRecord:
    return FailoverRecord(
        id="cp-1-1", service="orders", cause="announce", mode="orchestrate", kind="announce",
        old_primary="a", new_primary="b", started_at=10.0, missed_fence=("edge-1",),
        trace_parent={"traceparent": "00-ab-cd-01"},
    )


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["acked", "fenced", "committed"]),
                          st.dictionaries(st.sampled_from(["proxy", "node", "types", "n"]), _JSONISH, max_size=3)),
                max_size=6))
def test_as_dict_is_asdict_with_lists(events: list[tuple[str, dict[str, Any]]]) -> None:
    record = _record()
    for i, (name, detail) in enumerate(events):
        record.event(name, 10.0 + i / 1000, **detail)
    assert record.as_dict() == _reference(record)


def test_as_dict_is_a_copy_and_json() -> None:
    record = _record()
    record.event("acked", 10.5, proxy="edge-1", types=["EDS", "RDS"], nested={"a": [1, 2]})
    data = record.as_dict()
    data["timeline"][0]["detail"]["types"].append("CDS")
    data["timeline"][0]["detail"]["nested"]["a"].append(3)
    data["trace_parent"]["traceparent"] = "changed"
    assert record.timeline[0].detail == {"proxy": "edge-1", "types": ["EDS", "RDS"], "nested": {"a": [1, 2]}}
    assert record.trace_parent == {"traceparent": "00-ab-cd-01"}
    assert list(data) == list(_reference(record))  # the same keys, in the same order
    json.dumps(record.as_dict())
