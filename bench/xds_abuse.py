"""Abusive xDS clients against one `repstage-mesh serve` (issue 13): RSS and /metrics after
each abuse, two rounds (bounded means the second round adds nothing), and switchover times
with no abuser, and with a never-ACKing Delta client and a version claim from the future
connected. One real Envoy stays connected throughout (its stream must be unaffected).

    .venv/bin/python bench/xds_abuse.py [--switchovers 5] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from integration.harness import ask_once, wait_until
from integration.test_xds_abuse import Target, running_target
from integration.xds_abuse import (
    Abuse,
    AdsClient,
    holders,
    huge_type_url,
    many_names,
    many_streams,
    unknown_types,
)


def switchovers(target: Target, count: int) -> list[float]:
    times = []
    for _ in range(count):
        to = "r0" if target.cp.get("/v1/services/cache")["primary"] == "r1" else "r1"
        record: dict[str, Any] = {}

        def attempt(to: str = to, record: dict[str, Any] = record) -> bool:
            # 409 until the probes saw the old primary as a replica
            status, body = target.cp.call("POST", "/v1/services/cache/switchover", {"to": to})
            record.update(body)
            return status == 200

        wait_until(attempt, 20, 0.2, f"switchover to {to}")
        assert record["status"] == "done" and not record["missed_fence"] and not record["missed_route"], record
        times.append(float(record["duration_ms"]))
    return times


async def round_of_abuse(target: Target, abuse: Abuse, rows: list[tuple[str, int, int]]) -> list[AdsClient]:
    from grpc import aio

    channel = aio.insecure_channel(target.cp.xds_address, options=[("grpc.max_send_message_length", 64 << 20)])

    def mark(step: str) -> None:
        rows.append((step, target.rss_kib(), len(target.metrics())))

    await unknown_types(channel, abuse.unknown_types)
    mark(f"{abuse.unknown_types} unknown type URLs on one stream")
    await huge_type_url(channel, abuse.huge_type_url_bytes)
    mark("one 1 MiB type URL")
    await many_names(channel, abuse.resource_names)
    mark(f"{abuse.resource_names} resource names (one request; Delta chunks)")
    kept = await holders(channel)
    mark("a never-ACKing Delta client + a version claim from the future")
    served, refused, open_streams = await many_streams(channel, abuse.streams_from_one_peer)
    mark(f"{abuse.streams_from_one_peer} streams from one peer ({served} served, {refused} refused)")
    for client in open_streams:
        client.close()
    return kept


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--switchovers", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2, help="rounds of abuse (does RSS level off?)")
    args = parser.parse_args()
    with running_target() as target:
        rows: list[tuple[str, int, int]] = [("start (after warm-up)", 0, 0)]
        base = switchovers(target, args.switchovers + 1)[1:]  # first one warms up
        rows[0] = ("start (after warm-up switchovers)", target.rss_kib(), len(target.metrics()))

        async def abuse_and_switch() -> list[float]:
            kept: list[AdsClient] = []
            for n in range(1, args.rounds + 1):
                kept += await round_of_abuse(target, Abuse(), rows)
                rows.append((f"-- end of round {n}", target.rss_kib(), len(target.metrics())))
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, lambda: wait_until(
                lambda: all(p["never_acked"] for p in target.cp.get("/v1/proxies")
                            if p["node_id"] == "evil-never-acks" and p["connected"]),
                15, what="never-ACKing flagged"))
            during = await loop.run_in_executor(None, switchovers, target, args.switchovers)
            for client in kept:
                client.close()
            return during

        during = asyncio.run(abuse_and_switch())
        assert ask_once(target.port).startswith("a:") and target.proxy("edge-ok")["synced"]
        load = os.getloadavg()
    print(f"load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print("| step | serve RSS (MiB) | /metrics (bytes) |\n| --- | --- | --- |")
    for step, rss, size in rows:
        print(f"| {step} | {rss / 1024:.1f} | {size} |")

    def fmt(xs: list[float]) -> str:
        return f"median {statistics.median(xs):.1f} ms (min {min(xs):.1f}, max {max(xs):.1f}, n={len(xs)})"

    print(f"\nswitchover duration, no abuser: {fmt(base)}")
    print(f"switchover duration, never-ACKing + future-version clients connected: {fmt(during)}")


if __name__ == "__main__":
    main()
