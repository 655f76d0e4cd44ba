"""The demo's ports: each picked free, none picked twice (a pick is only bound later)."""

from __future__ import annotations

import itertools
import random

import pytest

from repstage_mesh.cli import demo


def test_the_demo_never_hands_out_a_port_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    # The generator offers the same ports again and again: free each time, since none is bound
    # yet. Before, the admin port could be the fence port (a config error at the demo's start).
    offers = itertools.cycle([25000, 25000, 25001, 25002, 25003, 25004, 25005, 25006, 25007, 25008])
    monkeypatch.setattr(random, "randrange", lambda *_: next(offers))
    monkeypatch.setattr(demo, "_HANDED_OUT", set())
    ports = demo.DemoPorts.pick()
    taken = [ports.listen, ports.fence, ports.fence + 1, ports.xds, ports.api, ports.admin]
    assert len(set(taken)) == len(taken), ports
