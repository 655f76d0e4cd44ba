"""Issue 14's isolate scenario, repeated: the time from POST /v1/services/cache/primary sent to
the first write acknowledged by the new primary, through one real Envoy, while the old primary
stays up and still says master (see integration/isolate.py), and the writes the old primary
acknowledged after the POST answered (must be 0).

    .venv/bin/python bench/announce_isolate.py --runs 20

Each run promotes the replica by hand, announces it, writes on, then re-joins the old primary
as a replica of the new one; the roles alternate. Prints a table and writes the
`announce-isolate` section of bench/RESULTS.md. Never passes or fails on time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import loadavg, machine, percentile, write_section
from integration.isolate import isolate_rig, rejoin, switch
from repstage_mesh.cli.workload import RedisWriter


def phases(answer: dict[str, object]) -> dict[str, float]:
    record = answer.get("failover") or {}
    assert isinstance(record, dict)
    at = {e["name"]: e["elapsed_ms"] for e in record.get("timeline", [])}
    return {name: float(at[name]) for name in ("fenced", "proxies_fenced", "connections_closed",
                                               "committed", "first_routable") if name in at}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--no-write", action="store_true", help="do not write bench/RESULTS.md")
    args = parser.parse_args()
    before = machine()
    switch_ms: list[float] = []
    answer_ms: list[float] = []
    old_after: list[int] = []
    breakdown: list[dict[str, float]] = []
    with isolate_rig() as rig:
        for run in range(args.runs):
            with RedisWriter(rig.port, prefix=f"w{run}:") as writer:
                result = switch(rig, writer, after=100)
            assert result.status == 200, result.answer
            assert result.switch_ms is not None, "no write reached the new primary"
            switch_ms.append(result.switch_ms)
            answer_ms.append((result.answered - result.sent) * 1000.0)
            old_after.append(result.old_after_answer)
            breakdown.append(phases(result.answer))
            print(f"run {run + 1}: {result.old} -> {result.new}: switch {result.switch_ms:.1f} ms, "
                  f"answered {answer_ms[-1]:.1f} ms, old primary after the answer {result.old_after_answer}, "
                  f"{breakdown[-1]}", flush=True)
            rejoin(rig, result.old, result.new)
    after = loadavg()

    def row(label: str, values: list[float]) -> str:
        return (f"| {label} | {percentile(values, 50):.1f} | {percentile(values, 99):.1f} | "
                f"{min(values):.1f} | {max(values):.1f} |")

    steps = ["fenced", "proxies_fenced", "connections_closed", "committed", "first_routable"]
    mean = {s: statistics.mean(b[s] for b in breakdown if s in b) for s in steps if any(s in b for b in breakdown)}
    text = "\n".join([
        "## Announce parity: the isolate scenario (issue 14)",
        "",
        f"`.venv/bin/python bench/announce_isolate.py --runs {args.runs}` — one `serve`, one Envoy, Redis "
        "primary + replica, a writer through Envoy; the replica promoted by hand (REPLICAOF NO ONE) while the "
        "old primary stays up as master, then POST /v1/services/cache/primary (break-before-make, the "
        f"default; health fence interval 100 ms). {before}; after: {after}.",
        "",
        "| measure (ms) | p50 | p99 | min | max |",
        "| --- | --- | --- | --- | --- |",
        row("POST sent -> first write acknowledged by the new primary", switch_ms),
        row("POST sent -> answered", answer_ms),
        "",
        f"Writes acknowledged by the old primary after the POST answered: {sum(old_after)} in {args.runs} runs "
        f"(before this change: 31 in one run, see issue 14).",
        "",
        "Where the time goes (mean ms since the request, from the answer's timeline): "
        + ", ".join(f"{k} {v:.1f}" for k, v in mean.items()) + ".",
        "Before (announce committed at once, make-before-break): POST -> first write 13.2 ms p50 "
        "(section 1 of the failover comparison below), but the old primary kept taking writes on its open "
        "connection until the fence closed it.",
    ])
    print(text)
    if not args.no_write:
        write_section("announce-isolate", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
