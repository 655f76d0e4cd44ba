"""Shared pieces of the xDS benchmarks: a small service snapshot, free ports, percentiles,
process RSS, real Envoy processes, and the RESULTS.md section writer.

Nothing here asserts timings: the benchmarks print and record figures, they never pass/fail.
"""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, timedelta
from pathlib import Path

from envoy_data_plane.envoy.config.cluster.v3 import (
    Cluster,
    ClusterDiscoveryType,
    ClusterEdsClusterConfig,
)
from envoy_data_plane.envoy.config.core.v3 import (
    Address,
    AggregatedConfigSource,
    ApiVersion,
    ConfigSource,
    SocketAddress,
)
from envoy_data_plane.envoy.config.endpoint.v3 import (
    ClusterLoadAssignment,
    Endpoint,
    LbEndpoint,
    LocalityLbEndpoints,
)
from envoy_data_plane.envoy.config.listener.v3 import Filter, FilterChain, Listener
from envoy_data_plane.envoy.extensions.filters.network.tcp_proxy.v3 import TcpProxy
from envoy_data_plane.google.protobuf import Any as PbAny

from repstage_mesh.xds import resources as R
from repstage_mesh.xds.cache import Snapshot

ROOT = Path(__file__).resolve().parent.parent
ENVOY = ROOT / ".venv" / "bin" / "envoy"
OUT = ROOT / "bench" / "out"
RESULTS = ROOT / "bench" / "RESULTS.md"
TCP_PROXY_URL = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"


def free_port() -> int:
    """A free port below the kernel's ephemeral range: with 50 Envoys opening connections, a
    port the kernel handed out as free (bind to 0) was often taken by one of their outgoing
    connections before the Envoy meant to listen on it started ("Address already in use")."""
    import sys

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from integration.harness import free_low_port

    return free_low_port()


# --- the resources -----------------------------------------------------------------------------


def service_names(count: int) -> list[str]:
    return [f"svc{i}" for i in range(count)]


def build_snapshot(version: int, listen_ports: Sequence[int], backend_port: int, changed: int = 0) -> Snapshot:
    """One EDS cluster, its load assignment and a tcp_proxy listener per service.

    `backend_port` is the port of the endpoint of service `changed` (the others keep 9000+i):
    swapping it between two values is the failover-shaped change, one ClusterLoadAssignment.
    """
    ads = ConfigSource(ads=AggregatedConfigSource(), resource_api_version=ApiVersion.V3)
    clusters: dict[str, Cluster] = {}
    loads: dict[str, ClusterLoadAssignment] = {}
    listeners: dict[str, Listener] = {}
    for i, (name, lport) in enumerate(zip(service_names(len(listen_ports)), listen_ports, strict=True)):
        clusters[name] = Cluster(
            name=name,
            type=ClusterDiscoveryType.EDS,
            eds_cluster_config=ClusterEdsClusterConfig(eds_config=ads),
            connect_timeout=timedelta(seconds=1),
        )
        port = backend_port if i == changed else 9000 + i
        endpoint = Endpoint(address=Address(socket_address=SocketAddress(address="127.0.0.1", port_value=port)))
        loads[name] = ClusterLoadAssignment(
            cluster_name=name, endpoints=[LocalityLbEndpoints(lb_endpoints=[LbEndpoint(endpoint=endpoint)])]
        )
        proxy = TcpProxy(stat_prefix=name, cluster=name)
        listeners[name] = Listener(
            name=name,
            address=Address(socket_address=SocketAddress(address="127.0.0.1", port_value=lport)),
            filter_chains=[
                FilterChain(filters=[Filter(name="tcp", typed_config=PbAny(type_url=TCP_PROXY_URL, value=bytes(proxy)))])
            ],
        )
    return Snapshot.build(version, {R.CLUSTER: clusters, R.ENDPOINT: loads, R.LISTENER: listeners})


# --- statistics ---------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def ms(value: float) -> str:
    return "-" if math.isnan(value) else f"{value * 1000:.2f}"


def rss_bytes(pid: int | None = None) -> int:
    """Resident set size of a process (VmRSS from /proc)."""
    path = f"/proc/{pid or os.getpid()}/status"
    with open(path) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS in {path}")


def cpu_seconds() -> float:
    """CPU seconds of this process, all threads (CLOCK_PROCESS_CPUTIME_ID, fine-grained)."""
    return time.process_time()


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system, all threads) of another process, from /proc (10 ms ticks)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_of(pid: int) -> list[int]:
    """The direct children of `pid` (from /proc/*/stat)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid:
            out.append(int(entry))
    return out


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def machine() -> str:
    model = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} cores ({model}), load average before the run {loadavg()}"


# --- real Envoys --------------------------------------------------------------------------------


BOOTSTRAP = """\
node: {{id: {node_id}, cluster: bench}}
admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}}}
dynamic_resources:
  ads_config: {{api_type: {api_type}, transport_api_version: V3, set_node_on_first_message_only: true,
               grpc_services: [{{envoy_grpc: {{cluster_name: xds}}}}]}}
  cds_config: {{ads: {{}}, resource_api_version: V3}}
  lds_config: {{ads: {{}}, resource_api_version: V3}}
static_resources:
  clusters:
  - name: xds
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment:
      cluster_name: xds
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {xds_port}}}}}}}}}]}}]
"""

# Microsecond timestamps (spdlog %f) so Envoy's log can be lined up with the server's clock.
LOG_FORMAT = "[%Y-%m-%d %T.%f][%l][%n] %v"


@dataclass
class EnvoyProc:
    node_id: str
    admin_port: int
    base_id: int
    process: subprocess.Popen[bytes]
    log_path: Path
    workdir: Path = field(repr=False)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_envoy(
    node_id: str, xds_port: int, delta: bool, base_id: int, *, debug_config_log: bool = False, nice: int = 0,
    parent: Path | None = None,
) -> EnvoyProc:
    """One Envoy (concurrency 1) on its own base id and admin port, taking everything over ADS
    (`nice`: run it at that niceness, below the control plane sharing its cores). Its bootstrap
    and log go to a new directory under `parent` (the caller removes it) or, without one, under
    the system's temporary directory, kept for the report to point at."""
    workdir = Path(tempfile.mkdtemp(prefix=f"xdsbench-{node_id}-", dir=parent))
    admin = free_port()
    boot = BOOTSTRAP.format(
        node_id=node_id, admin=admin, api_type="DELTA_GRPC" if delta else "GRPC", xds_port=xds_port
    )
    (workdir / "bootstrap.yaml").write_text(boot)
    log_path = workdir / "envoy.log"
    cmd = [
        str(ENVOY), "-c", str(workdir / "bootstrap.yaml"), "--base-id", str(base_id),
        "--concurrency", "1", "-l", "warning", "--log-format", LOG_FORMAT, "--log-path", str(log_path),
    ]
    if debug_config_log:
        cmd += ["--component-log-level", "config:debug"]
    if nice:
        cmd = ["nice", "-n", str(nice), *cmd]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return EnvoyProc(node_id, admin, base_id, proc, log_path, workdir)


def base_ids(count: int) -> list[int]:
    """Base ids unlikely to collide with other engineers' Envoys (derived from our pid)."""
    start = 200_000 + (os.getpid() % 50_000) * 40
    return [start + i for i in range(count)]


_LOG_LINE = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+)\]\[(\w+)\]\[(\w+)\] (.*)$")


def envoy_log_events(path: Path) -> list[tuple[float, str]]:
    """(unix time, message) of each line of an Envoy log written with LOG_FORMAT (UTC clock)."""
    from datetime import datetime

    events: list[tuple[float, str]] = []
    if not path.exists():
        return events
    for line in path.read_text(errors="replace").splitlines():
        m = _LOG_LINE.match(line)
        if not m:
            continue
        stamp = datetime.strptime(m.group(1)[:26], "%Y-%m-%d %H:%M:%S.%f").replace(tzinfo=UTC)
        events.append((stamp.timestamp(), m.group(4)))
    return events


# --- RESULTS.md ---------------------------------------------------------------------------------


def write_section(marker: str, text: str) -> None:
    """Replace (or append) the block between <!-- marker:begin --> and <!-- marker:end --> in
    bench/RESULTS.md, leaving everyone else's sections alone."""
    begin, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
    block = f"{begin}\n{text.rstrip()}\n{end}\n"
    current = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\n"
    if begin in current and end in current:
        head, rest = current.split(begin, 1)
        _, tail = rest.split(end, 1)
        current = head + block + tail.lstrip("\n")
    else:
        current = current.rstrip("\n") + "\n\n" + block
    RESULTS.write_text(current)


def wait_until(predicate: object, timeout: float, interval: float = 0.01) -> bool:
    """Poll `predicate()` until true or the deadline (synchronous)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(interval)
    return False
