"""The network-namespace harness itself: addresses, reachability, cut/restore, isolate, and a
teardown that leaves nothing behind."""

from __future__ import annotations

import socket
import subprocess
import sys

from integration import netns
from integration.harness import wait_until

# Accepts connections on 0.0.0.0:7000 and answers each with the namespace's name.
_SERVER = (
    "import socket,sys\n"
    "s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "s.bind(('0.0.0.0', 7000)); s.listen(16); print('ready', flush=True)\n"
    "while True:\n"
    "    c,_=s.accept(); c.sendall(sys.argv[1].encode()); c.close()\n"
)
_CLIENT = (
    "import socket,sys\n"
    "try:\n"
    "    c=socket.create_connection((sys.argv[1], 7000), timeout=0.5); print(c.recv(64).decode())\n"
    "except OSError as e:\n"
    "    print('unreachable', type(e).__name__)\n"
)


def _ask_from(host: netns.Host, address: str) -> str:
    return host.run([sys.executable, "-c", _CLIENT, address]).stdout.strip()


def _ask(address: str) -> str:
    with socket.create_connection((address, 7000), timeout=2) as conn:
        return conn.recv(64).decode()


def test_three_namespaces_reach_each_other_and_cuts_drop_both_ways() -> None:
    with netns.network(3) as net:
        a, b, c = net.hosts
        assert len({a.address, b.address, c.address, net.gateway}) == 4
        for host in net.hosts:
            proc = host.popen([sys.executable, "-c", _SERVER, host.name], stdout=subprocess.PIPE)
            assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        assert _ask(b.address) == b.name  # from the test process
        assert _ask_from(a, b.address) == b.name
        assert _ask_from(a, "127.0.0.1") == a.name  # each namespace has its own loopback

        net.cut(a, b)
        assert _ask_from(a, b.address).startswith("unreachable TimeoutError")  # dropped
        assert _ask_from(b, a.address).startswith("unreachable")
        assert _ask_from(a, c.address) == c.name  # only the pair is cut
        assert _ask(a.address) == a.name and _ask(b.address) == b.name
        net.restore(a, b)
        wait_until(lambda: _ask_from(a, b.address) == b.name, 10, 0.1, "a reaches b again")

        net.isolate(c)
        assert _ask_from(a, c.address).startswith("unreachable")
        net.rejoin(c)
        wait_until(lambda: _ask_from(a, c.address) == c.name, 10, 0.1, "c rejoined")
        names, bridge = [h.name for h in net.hosts], net.bridge
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(name in listed for name in names)
    links = subprocess.run(["ip", "link", "show"], capture_output=True, text=True).stdout
    assert f"{bridge}:" not in links


def test_teardown_on_failure_kills_processes_inside() -> None:
    try:
        with netns.network(1) as net:
            proc = net.hosts[0].popen(["sleep", "600"])
            name = net.hosts[0].name
            raise RuntimeError("the test failed")
    except RuntimeError:
        pass
    assert proc.poll() is not None
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert name not in listed
