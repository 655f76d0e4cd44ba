"""A proxy whose host vanishes (its link goes down: no FIN, no RST, nothing more ACKed) is let go
by the xDS server's keepalive, so a failover's proxy wait stops waiting for it and
`/v1/proxies` shows it disconnected (README "Proxy wait": a PING after 2 s of silence, and the
socket's TCP_USER_TIMEOUT of 1 s: ~3 s). Without it, TCP would hold the dead connection for
many minutes. The client is a grpcio ADS client in a network namespace; the server (the
default h2 transport) runs in the test process on the bridge.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from integration import netns
from repstage_mesh.xds import resources as res
from repstage_mesh.xds.cache import EncodedResource, Snapshot, SnapshotCache
from repstage_mesh.xds.server import AdsServer
from repstage_mesh.xds.tls import XdsSecurity
from repstage_mesh.xds.tracker import ProxyTracker
from tests.fakes import eventually

# timing windows that need the machine's cores: run alone (pyproject.toml, markers)
pytestmark = pytest.mark.serial

ROOT = Path(__file__).resolve().parent.parent
CLIENT = """
import asyncio, sys
from grpc import aio
from tests.xds_client import AdsClient, sotw_request

async def main() -> None:
    channel = aio.insecure_channel(sys.argv[1])
    client = AdsClient(channel)
    client.send(sotw_request(node_id="edge-vanishing"))
    await client.receive(timeout=20)
    print("synced", flush=True)
    await asyncio.Event().wait()  # holds the stream until killed

asyncio.run(main())
"""


async def test_a_proxy_whose_host_vanishes_is_let_go_by_the_keepalive() -> None:
    cache = SnapshotCache()
    cache.set_snapshot("", Snapshot("1", {res.CLUSTER: {"db": EncodedResource.from_bytes(res.CLUSTER, "db", b"c")}}))
    tracker = ProxyTracker("cp")
    with netns.network(1) as net:
        (host,) = net.hosts
        server = AdsServer(cache, tracker, "cp", security=XdsSecurity(insecure=True))
        port = await server.start(net.gateway, 0)
        client = host.popen([sys.executable, "-c", CLIENT, f"{net.gateway}:{port}"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            await eventually(lambda: len(tracker.connected()) == 1, "the proxy is connected", timeout=30)
            (record,) = tracker.connected()
            await eventually(lambda: record.first_sent_at is not None, "it got its config", timeout=10)
            net.isolate(host)
            vanished = time.monotonic()
            await eventually(lambda: not tracker.connected(), "the vanished proxy is let go", timeout=20)
            assert record.disconnected_at is not None
            print(f"let go {time.monotonic() - vanished:.1f} s after its host vanished")
        finally:
            client.kill()
            client.wait(5)
            await server.stop(0)
