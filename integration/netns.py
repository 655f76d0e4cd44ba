"""Network namespaces for multi-node integration tests (Linux, root; needs only `ip`).

`network(n)` builds n namespaces joined by one Linux bridge, each with a veth pair and an
address in a private /24 picked for this network alone (10.200.0.0/13, reserved atomically by
creating the bridge `rsbr<k>`, so parallel runs never collide), and tears everything down when
the block ends, even on failure: every process still running inside a namespace is killed,
then the namespaces and the bridge are deleted.

    from integration import netns

    with netns.network(3) as net:
        a, b, c = net.hosts
        a.address                      # "10.203.17.2" (b is .3, c is .4)
        net.gateway                    # "10.203.17.1": the bridge, i.e. the test process
        argv = a.wrap(["redis-server", "--bind", "0.0.0.0"])  # runs inside a
        proc = a.popen(["envoy", ...], stdout=...)            # subprocess.Popen inside a
        a.run(["ip", "addr"])          # subprocess.run inside a (check=True, captured)
        net.cut(a, b)                  # a and b no longer reach each other (both ways)
        net.restore(a, b)
        net.isolate(c)                 # c reaches nobody and nobody reaches c (link down)
        net.rejoin(c)

- The test process (the root namespace) reaches every namespace at its `address` (the bridge
  holds `gateway`), and every namespace reaches the test process at `gateway`: a server the
  test starts on the host bound to `0.0.0.0` or to `gateway` serves all namespaces.
- Each namespace has its own loopback (brought up) and its own port space: processes in two
  namespaces may listen on the same port.
- `wrap(argv)` is `["ip", "netns", "exec", name, *argv]`; `ip netns exec` execs the command,
  so the Popen's pid is the command's own and signals (SIGSTOP, SIGTERM) reach it directly.
- `cut(a, b)` drops packets silently, like a partition (connects time out, established
  connections stall; nothing is refused): each side's neighbour entry for the other is
  replaced by a permanent one with an unused MAC address, so frames leave for a host that
  does not exist. `restore(a, b)` deletes those entries (ARP resolves again).
  The gateway (the test process) still reaches both sides.
- `isolate(h)` sets the bridge side of h's veth down: h is cut from everybody, including the
  test process; `rejoin(h)` sets it up again.

Real processes inside a namespace, with the stop-always classes of `integration/harness.py`:

    node = netns.serve_node(a, workdir, config, "cp-1", env={"REPSTAGE_API__ADVERTISE": ...})
    node.start(wait_ready=False); node.wait_ready()   # node.api: http://<advertised API>
    envoy = netns.envoy_in(a, workdir, "envoy-a", [f"{a.address}:18000"]).start()

`serve_node` is a `harness.ControlPlaneNode` whose `api` is the advertised API address
(`api.advertise` in the config or REPSTAGE_API__ADVERTISE in `env`); `envoy_in` a
`harness.Envoy` whose `start()` waits for its admin port from inside the namespace.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from integration.harness import ControlPlaneNode, Envoy, wait_until

_SUBNETS = 2048  # /24s in 10.200.0.0/13
_UNUSED_MAC = "02:00:5e:00:de:ad"  # locally administered, never given to a veth here


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


@dataclass
class Host:
    """One network namespace with one interface (`eth0`) on the shared bridge."""

    name: str  # the namespace's name (`ip netns`)
    address: str  # its IPv4 address on the bridge
    index: int  # 0-based position in `Network.hosts`
    bridge_port: str  # the bridge side of its veth pair (in the root namespace)
    _procs: list[subprocess.Popen[Any]] = field(default_factory=list, repr=False)

    def wrap(self, argv: list[str]) -> list[str]:
        """`argv` made to run inside this namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def popen(self, argv: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """`subprocess.Popen` inside this namespace; killed at teardown if still running."""
        proc: subprocess.Popen[Any] = subprocess.Popen(self.wrap(argv), **kwargs)
        self._procs.append(proc)
        return proc

    def run(self, argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        """`subprocess.run` inside this namespace (check, capture_output, text by default)."""
        kwargs.setdefault("check", True)
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        return subprocess.run(self.wrap(argv), **kwargs)

    def mac(self) -> str:
        out = _ip("-n", self.name, "-j", "link", "show", "eth0").stdout
        return str(json.loads(out)[0]["address"])

    def pids(self) -> list[int]:
        """Every process running in this namespace now."""
        out = _ip("netns", "pids", self.name, check=False).stdout
        return [int(p) for p in out.split()]


class Network:
    """n namespaces on one bridge; see the module docstring. Use `network(n)`."""

    def __init__(self, size: int) -> None:
        self.hosts: list[Host] = []
        self.index, self.bridge = self._reserve()
        prefix = f"10.{200 + self.index // 256}.{self.index % 256}"
        self.gateway = f"{prefix}.1"
        self.subnet = f"{prefix}.0/24"
        try:
            _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            for i in range(size):
                self._add_host(i, f"{prefix}.{i + 2}")
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _reserve() -> tuple[int, str]:
        """A free subnet index, taken by creating its bridge (atomic: the name is unique)."""
        start = random.randrange(_SUBNETS)
        for step in range(_SUBNETS):
            index = (start + step) % _SUBNETS
            bridge = f"rsbr{index}"
            if _ip("link", "add", bridge, "type", "bridge", check=False).returncode == 0:
                return index, bridge
        raise RuntimeError("no free subnet in 10.200.0.0/13 (stale rsbr* bridges?)")

    def _add_host(self, i: int, address: str) -> None:
        name = f"rs{self.index}-{i}-{os.getpid()}"
        port = f"rs{self.index}p{i}"
        _ip("netns", "add", name)
        host = Host(name, address, i, port)
        self.hosts.append(host)
        _ip("link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", name)
        _ip("link", "set", port, "master", self.bridge)
        _ip("link", "set", port, "up")
        _ip("-n", name, "link", "set", "lo", "up")
        _ip("-n", name, "addr", "add", f"{address}/24", "dev", "eth0")
        _ip("-n", name, "link", "set", "eth0", "up")

    def __getitem__(self, i: int) -> Host:
        return self.hosts[i]

    def cut(self, a: Host, b: Host) -> None:
        """a and b stop reaching each other, both ways; packets are dropped, not refused."""
        for src, dst in ((a, b), (b, a)):
            _ip("-n", src.name, "neigh", "replace", dst.address, "lladdr", _UNUSED_MAC,
                "dev", "eth0", "nud", "permanent")  # fmt: skip

    def restore(self, a: Host, b: Host) -> None:
        """Undo `cut(a, b)`."""
        for src, dst in ((a, b), (b, a)):
            _ip("-n", src.name, "neigh", "del", dst.address, "dev", "eth0", check=False)

    def isolate(self, host: Host) -> None:
        """host reaches nobody and nobody reaches host (its bridge port goes down)."""
        _ip("link", "set", host.bridge_port, "down")

    def rejoin(self, host: Host) -> None:
        _ip("link", "set", host.bridge_port, "up")

    def close(self) -> None:
        """Kill what still runs inside, delete the namespaces (and their veths) and the
        bridge. Safe to call twice."""
        for host in self.hosts:
            for proc in host._procs:
                if proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(5)
            for pid in host.pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
                    os.kill(pid, signal.SIGKILL)
            _ip("link", "del", host.bridge_port, check=False)
            _ip("netns", "del", host.name, check=False)
        self.hosts = []
        _ip("link", "del", self.bridge, check=False)


@contextlib.contextmanager
def network(size: int) -> Iterator[Network]:
    """n namespaces on one bridge, always torn down (see the module docstring)."""
    net = Network(size)
    try:
        yield net
    finally:
        net.close()


# --- real processes inside a namespace --------------------------------------------------------


class NamespacedNode(ControlPlaneNode):
    """`repstage-mesh serve` inside a namespace; `api` is its advertised API address."""

    def __init__(self, host: Host, workdir: Path, config: dict[str, Any], name: str,
                 env: dict[str, str] | None = None) -> None:  # fmt: skip
        super().__init__(workdir, config, name)
        self.host = host
        self.proc.argv = host.wrap(self.proc.argv)
        self.proc.env = {**(self.proc.env or {}), **(env or {})}
        self.advertised_api = (env or {}).get("REPSTAGE_API__ADVERTISE") or config["api"][
            "advertise"
        ]

    @property
    def api(self) -> str:
        return f"http://{self.advertised_api}"


def serve_node(host: Host, workdir: Path, config: dict[str, Any], name: str,
               env: dict[str, str] | None = None) -> NamespacedNode:  # fmt: skip
    """A `harness.ControlPlaneNode` that runs inside `host` (not started)."""
    return NamespacedNode(host, workdir, config, name, env)


class NamespacedEnvoy(Envoy):
    """A real Envoy inside a namespace; its admin port answers on the namespace's loopback."""

    def __init__(self, host: Host, workdir: Path, node_id: str, xds: list[str]) -> None:
        super().__init__(workdir, node_id, xds)
        self.host = host
        self.proc.argv = host.wrap(self.proc.argv)

    def start(self) -> NamespacedEnvoy:
        self.proc.start()
        wait_until(lambda: self.admin("/ready") is not None, 20, 0.1, f"envoy {self.node_id} admin")
        return self

    def admin(self, path: str) -> str | None:
        code = ("import sys,urllib.request\n"
                "print(urllib.request.urlopen(sys.argv[1], timeout=2).read().decode(), end='')")  # fmt: skip
        done = self.host.run([sys.executable, "-c", code, f"http://127.0.0.1:{self.admin_port}{path}"],
                             check=False)  # fmt: skip
        return done.stdout if done.returncode == 0 else None


def envoy_in(host: Host, workdir: Path, node_id: str, xds: list[str]) -> NamespacedEnvoy:
    """A `harness.Envoy` that runs inside `host` (not started)."""
    return NamespacedEnvoy(host, workdir, node_id, xds)
