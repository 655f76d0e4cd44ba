"""Judging a chaos run: the must-be-0 rows, RTO per fault type, and the RESULTS.md section.

- split-brain writes: a data write acknowledged by member M while the committed primary of
  `cache` was another member (or none). Judged conservatively from the watcher's linearizable
  reads: two sightings of the same (primary != M, epoch) with the first answered before the
  write was sent and the second asked after it was acknowledged bracket the write, so the
  state held throughout it.
- acknowledged control writes missing: acknowledged `set_primary`s of `ctl` whose epoch is
  above the final committed epoch (an acknowledged change rolled back); the linearizability
  check below catches any other loss (a read that misses an acknowledged write).
- non-linearizable control histories: integration/linearizability.py on the recorded `ctl`
  history (`None` when the search hit its bound: reported, and counted as a failure).
- NACK resend loops: every NACK any Envoy sent (`update_rejected` counters; Envoys are never
  restarted, so these are the whole run's): no NACK, no loop.
- forwarding loops: forwarded reads (`GET /v1/failovers` on followers) answered 508 or never.
"""

from __future__ import annotations

import bisect
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from integration.chaos.suite import FAULTS, Chaos, Round
from integration.linearizability import PrimaryRegister, check_key

ROOT = Path(__file__).resolve().parent.parent.parent
RESULTS = ROOT / "bench" / "RESULTS.md"
PLOT = ROOT / "bench" / "chaos_rto.png"


@dataclass
class Verdict:
    split_brain_writes: int  # acknowledged by M while the committed primary was another member
    fail_closed_writes: int  # acknowledged by M while the committed state had no primary
    missing_control_writes: int
    non_linearizable: int
    nack_loops: int
    forwarding_loops: int
    thread_errors: list[str]
    unexpected_answers: list[str]
    not_recovered: list[str]
    data_writes: int
    control_ops: int
    updates_accepted: int  # Envoys' update_success: shows the NACK row reads real counters

    def failures(self) -> dict[str, int]:
        rows = {
            "split-brain writes": self.split_brain_writes,
            "writes to a demoted member while fail-closed": self.fail_closed_writes,
            "acknowledged control writes missing": self.missing_control_writes,
            "non-linearizable control histories": self.non_linearizable,
            "NACKs (resend loops)": self.nack_loops,
            "forwarding loops": self.forwarding_loops,
            "writer/watcher thread errors": len(self.thread_errors),
        }
        return {k: v for k, v in rows.items() if v}


def split_brain(chaos: Chaos) -> int:
    """Writes acknowledged by a member while another member, or none, was the committed primary."""
    return len(split_brain_writes(chaos))


def split_brain_writes(chaos: Chaos) -> list[tuple[Any, Any, Any]]:
    """(write, sighting before, sighting after) for every split-brain write."""
    seen = chaos.watcher.seen
    answered = [s[1] for s in seen]
    found = []
    for writer in chaos.data:
        for write in writer.acked:
            i = bisect.bisect_left(answered, write.invoked) - 1  # last sighting answered before
            if i < 0:
                continue
            _, _, primary, epoch = seen[i]
            if primary == write.member:
                continue
            later = next((s for s in seen[i + 1:] if s[0] > write.acked), None)
            if later is not None and later[2] == primary and later[3] == epoch:
                found.append((write, seen[i], later))
    return found


def control_verdict(chaos: Chaos, initial: tuple[str | None, int], final: tuple[str | None, int]) -> tuple[int, int]:
    ops = [op for op in chaos.recorder.operations() if not (op.output or {}).get("not_applied")]
    acked_epochs = [int(op.output["epoch"]) for op in ops
                    if op.name == "set_primary" and op.output and "epoch" in op.output]  # fmt: skip
    missing = sum(1 for e in acked_epochs if e > final[1])
    result = check_key("ctl", ops, PrimaryRegister(initial[0], initial[1]))
    return missing, (0 if result.ok else 1)


def judge(chaos: Chaos, initial: tuple[str | None, int], final: tuple[str | None, int]) -> Verdict:
    missing, non_linear = control_verdict(chaos, initial, final)
    found = split_brain_writes(chaos)
    closed = sum(1 for _, before, _ in found if before[2] is None)
    return Verdict(
        split_brain_writes=len(found) - closed,
        fail_closed_writes=closed,
        missing_control_writes=missing,
        non_linearizable=non_linear,
        nack_loops=chaos.mesh.envoy_stat_sum("update_rejected"),
        forwarding_loops=sum(c.result.forwarding_loops for c in chaos.control),
        thread_errors=[f"{t.name}: {t.error!r}" for t in chaos.threads if t.error is not None],
        unexpected_answers=[u for c in chaos.control for u in c.result.unexpected],
        not_recovered=[f"round {r.index} (seed {r.seed}, {r.fault}): {r.note}" for r in chaos.rounds
                       if not r.recovered],
        data_writes=sum(len(w.acked) for w in chaos.data),
        control_ops=len(chaos.recorder.operations()),
        updates_accepted=chaos.mesh.envoy_stat_sum("update_success"),
    )


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def rto_table(rounds: list[Round]) -> list[dict[str, Any]]:
    rows = []
    for fault in FAULTS:
        mine = [r for r in rounds if r.fault == fault]
        row: dict[str, Any] = {"fault": fault, "rounds": len(mine),
                               "recovered": sum(r.recovered for r in mine)}  # fmt: skip
        for kind in ("data_rto", "control_rto"):
            values = [getattr(r, kind) * 1000 for r in mine if getattr(r, kind) is not None]
            row[kind] = (_pct(values, 50), _pct(values, 99), max(values)) if values else None
        rows.append(row)
    return rows


def render(verdict: Verdict, rounds: list[Round], command: str, seconds: float, load: str) -> str:
    def fmt(v: tuple[float, float, float] | None) -> str:
        return " | ".join(f"{x:.0f}" for x in v) if v else "- | - | -"

    rows = rto_table(rounds)
    lines = [
        "## Chaos: random faults under traffic on namespaced nodes (integration/chaos)",
        "",
        f"Command: `{command}`  ",
        f"{len(rounds)} rounds in {seconds / 60:.1f} min; load average after {load} (2 cores "
        f"shared with other engineers' jobs). Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        "Three `serve` nodes, each in its own network namespace binding 0.0.0.0 with advertised "
        "addresses; a real Envoy per node (attached to all three); Redis r0 + 2 replicas in their "
        "own namespaces, orchestrate mode; one writer per Envoy (SET after SET, each "
        "acknowledgement recorded with the member that gave it), two control writers (set/read "
        "the `ctl` primary through random nodes, forwarded failover reads). See "
        "integration/chaos/suite.py for the faults and integration/chaos/report.py for the rows.",
        "",
        "| must be 0 | count |",
        "| --- | ---: |",
        f"| split-brain writes (acknowledged by a member while another was the committed primary) | {verdict.split_brain_writes} |",
        f"| writes acknowledged by a demoted member while the committed state had no primary (fail-closed) | {verdict.fail_closed_writes} |",
        f"| acknowledged control writes missing | {verdict.missing_control_writes} |",
        f"| non-linearizable control histories | {verdict.non_linearizable} |",
        f"| NACK resend loops (NACKs sent by any Envoy) | {verdict.nack_loops} |",
        f"| forwarding loops | {verdict.forwarding_loops} |",
        "",
        f"Recorded: {verdict.data_writes} acknowledged data writes, {verdict.control_ops} control "
        f"operations; xDS updates accepted by the Envoys: {verdict.updates_accepted}; rounds not "
        f"recovered within 60 s: {len(verdict.not_recovered)}; unexpected API answers: "
        f"{len(verdict.unexpected_answers)}.",
        "",
        "RTO, ms from the fault: data = until a write through every Envoy was acknowledged again; "
        "control = until a control write was acknowledged again.",
        "",
        "| fault | rounds | recovered | data p50 | data p99 | data max | control p50 | control p99 | control max |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        *[f"| {r['fault']} | {r['rounds']} | {r['recovered']} | {fmt(r['data_rto'])} | "
          f"{fmt(r['control_rto'])} |" for r in rows],
        "",
        f"![RTO per fault type]({PLOT.name})",
    ]
    return "\n".join(lines)


def plot(rounds: list[Round]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_fault: dict[str, list[float]] = defaultdict(list)
    ctl: dict[str, list[float]] = defaultdict(list)
    for r in rounds:
        if r.data_rto is not None:
            by_fault[r.fault].append(r.data_rto * 1000)
        if r.control_rto is not None:
            ctl[r.fault].append(r.control_rto * 1000)
    faults = [f for f in FAULTS if by_fault.get(f) or ctl.get(f)]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    positions = range(len(faults))
    ax.boxplot([by_fault.get(f) or [0.0] for f in faults], positions=[p - 0.2 for p in positions],
               widths=0.35, patch_artist=True, boxprops={"facecolor": "#9ecae1"})  # fmt: skip
    ax.boxplot([ctl.get(f) or [0.0] for f in faults], positions=[p + 0.2 for p in positions],
               widths=0.35, patch_artist=True, boxprops={"facecolor": "#fdae6b"})  # fmt: skip
    ax.set_xticks(list(positions), faults, rotation=20, ha="right")
    ax.set_yscale("symlog", linthresh=100)
    ax.set_ylim(bottom=0)
    ax.set_ylabel("RTO (ms, symlog)")
    ax.set_title("Chaos RTO per fault type: data through Envoy (blue), control writes (orange)")
    fig.tight_layout()
    fig.savefig(PLOT, dpi=110)
    plt.close(fig)


def write_results(text: str) -> None:
    begin, end = "<!-- chaos:begin -->", "<!-- chaos:end -->"
    block = f"{begin}\n{text.rstrip()}\n{end}\n"
    current = RESULTS.read_text()
    if begin in current and end in current:
        head, rest = current.split(begin, 1)
        current = head + block + rest.split(end, 1)[1].lstrip("\n")
    else:
        current = current.rstrip("\n") + "\n\n" + block
    RESULTS.write_text(current)
