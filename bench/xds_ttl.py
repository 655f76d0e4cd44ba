"""What does Envoy 1.40 do when an xDS resource's TTL runs out? (issue 11, primary-route leases)

A minimal SotW ADS server (in this process) gives a real Envoy one tcp_proxy listener to an EDS
cluster `primary` whose one endpoint is a TCP member `a`. One resource type carries a TTL: the
resource is wrapped in `envoy.service.discovery.v3.Resource{name, version, ttl, resource}`.
While heartbeats run (a response whose `Resource` has name, version and ttl but no body, every
`--heartbeat` seconds), traffic must flow; then heartbeats stop with the stream left open (a
node partitioned from its cluster but alive) and a fresh connection is tried every 20 ms: the
time from the last heartbeat to the first refused connection is the lease's real length. An
open connection held through the Envoy is watched too.

Usage::

    .venv/bin/python bench/xds_ttl.py --ttl-on cds      # the cluster carries the TTL
    .venv/bin/python bench/xds_ttl.py --ttl-on eds      # the ClusterLoadAssignment does

Prints what it saw; never passes or fails on time.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import queue
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import yaml
from envoy_data_plane.envoy.service.discovery.v3 import (
    DiscoveryRequest,
    DiscoveryResponse,
    Resource,
)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from integration.harness import (
    LineClient,
    NamedTcpBackend,
    Proc,
    ask_once,
    free_low_port,
    wait_until,
    workdir,
)
from repstage_mesh.filters import build_bootstrap
from repstage_mesh.filters.clusters import eds_cluster
from repstage_mesh.filters.endpoints import lb_endpoint, load_assignment
from repstage_mesh.filters.listeners import tcp_proxy_listener
from repstage_mesh.filters.type_urls import CLUSTER, CLUSTER_LOAD_ASSIGNMENT, LISTENER, pack

ENVOY = Path(__file__).resolve().parent.parent / ".venv" / "bin" / "envoy"
SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"
RESOURCE = "type.googleapis.com/envoy.service.discovery.v3.Resource"
SHORT = {"cds": CLUSTER, "eds": CLUSTER_LOAD_ASSIGNMENT, "lds": LISTENER}


class Ads:
    """One SotW stream at a time; `send(type_url, heartbeat=False)` pushes a response."""

    def __init__(self, resources: dict[str, Any], ttl_type: str, ttl: float) -> None:
        self.resources = resources  # type_url -> (name, message)
        self.ttl_type = ttl_type
        self.ttl = ttl
        self.out: queue.Queue[bytes | None] = queue.Queue()
        self.nonces = itertools.count(1)
        self.requested: set[str] = set()
        self.ready = threading.Event()

    def body(self, type_url: str, heartbeat: bool) -> Any:
        name, message = self.resources[type_url]
        if type_url != self.ttl_type:
            return pack(message)
        wrapped = Resource(name=name, version=getattr(self, "version", "1"), ttl=timedelta(seconds=self.ttl),
                           resource=None if heartbeat else pack(message))
        return pack(wrapped)

    def send(self, type_url: str, heartbeat: bool = False, version: str = "1") -> None:
        self.version = version
        response = DiscoveryResponse(version_info=version, resources=[self.body(type_url, heartbeat)],
                                     type_url=type_url, nonce=str(next(self.nonces)))
        self.out.put(bytes(response))

    def handler(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        def read() -> None:
            with contextlib.suppress(grpc.RpcError):  # the stream ended
                self._read(requests)
            self.out.put(None)

        threading.Thread(target=read, daemon=True).start()
        while (item := self.out.get()) is not None:
            yield item

    def _read(self, requests: Iterator[bytes]) -> None:
        for raw in requests:
            request = DiscoveryRequest.parse(raw)
            if request.error_detail is not None and request.error_detail.message:
                print(f"  NACK {request.type_url.rsplit('.', 1)[-1]}: {request.error_detail.message}")
            if request.type_url not in self.requested:
                self.requested.add(request.type_url)
                self.send(request.type_url)
                if request.type_url == LISTENER:
                    self.ready.set()

def serve(ads: Ads) -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(4), options=[
        ("grpc.http2.min_ping_interval_without_data_ms", 100), ("grpc.http2.max_ping_strikes", 0)])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
        "StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(ads.handler)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def probe(port: int) -> str:
    try:
        return ask_once(port, "p", timeout=0.3).split(":", 1)[0]
    except OSError:
        return "-"


def run(ttl_on: str, ttl: float, heartbeat: float, beats: int, full: bool) -> None:
    with workdir() as wd, NamedTcpBackend("a") as a:
        port = free_low_port()
        resources = {
            CLUSTER: ("primary", eds_cluster("primary")),
            CLUSTER_LOAD_ASSIGNMENT: ("primary", load_assignment("primary", [lb_endpoint("127.0.0.1", a.port)])),
            LISTENER: ("orders", tcp_proxy_listener("orders", address="127.0.0.1", port=port,
                                                    cluster="primary", stat_prefix="orders")),
        }
        ads = Ads(resources, SHORT[ttl_on], ttl)
        server, xds_port = serve(ads)
        boot = build_bootstrap("ttl-probe", [("127.0.0.1", xds_port)], free_low_port())
        path = wd / "envoy.yaml"
        path.write_text(yaml.safe_dump(boot))
        envoy = Proc([str(ENVOY), "-c", str(path), "--base-id", str(7000 + port % 1000), "-l", "warning",
                      "--component-log-level", "config:debug,upstream:debug"],
                     wd / "envoy.log")
        envoy.start()
        try:
            wait_until(ads.ready.is_set, 20, 0.05, "Envoy subscribed to listeners")
            wait_until(lambda: probe(port) == "a", 20, 0.02, "traffic through the listener")
            held = LineClient(port)
            assert held.ask("hold").startswith("a:")
            kind = "the whole resource again" if full else "body-less Resource"
            print(f"TTL {ttl:g} s on {ttl_on}; heartbeats ({kind}) every {heartbeat:g} s for {beats} beats")
            failures = 0
            for _ in range(beats):
                time.sleep(heartbeat)  # the heartbeat period of this experiment
                ads.send(SHORT[ttl_on], heartbeat=not full)
                failures += probe(port) != "a"
            last = time.monotonic()
            print(f"  during heartbeats ({beats * heartbeat:g} s > TTL): {failures} failed probes")
            refused_at = None
            while time.monotonic() - last < ttl + 5.0:
                if probe(port) != "a":
                    refused_at = time.monotonic() - last
                    break
                time.sleep(0.02)
            print("  heartbeats stopped: " + (f"new connections refused {refused_at:.2f} s after the last heartbeat"
                                              if refused_at is not None else f"still routed {ttl + 5:g} s later"))
            time.sleep(0.3)
            print(f"  the connection held open through it: {'closed' if held.closed_by_peer() else 'still open'}")
            held.close()
            ads.send(SHORT[ttl_on], version="2")  # the full resource at a new version: back?
            if ttl_on == "cds":
                time.sleep(0.2)  # the re-added EDS cluster subscribes again; answer it
                ads.send(CLUSTER_LOAD_ASSIGNMENT, version="2")
            deadline = time.monotonic() + 5
            while probe(port) != "a" and time.monotonic() < deadline:
                time.sleep(0.05)
            back = probe(port) == "a"
            print(f"  after re-sending the resource: {'routed again' if back else 'not routed'}")
            log = (wd / "envoy.log").read_text()
            for line in log.splitlines():
                if any(w in line.lower() for w in ("ttl", "expir", "heartbeat", "segmentation", "removed cluster")):
                    print("  envoy log:", line[:200])
        finally:
            envoy.stop()
            server.stop(0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ttl-on", choices=sorted(SHORT), default="cds")
    parser.add_argument("--ttl", type=float, default=1.5)
    parser.add_argument("--heartbeat", type=float, default=0.5)
    parser.add_argument("--beats", type=int, default=8)
    parser.add_argument("--full", action="store_true",
                        help="heartbeat = the whole resource again (same version), not a body-less Resource")
    args = parser.parse_args()
    run(args.ttl_on, args.ttl, args.heartbeat, args.beats, args.full)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
