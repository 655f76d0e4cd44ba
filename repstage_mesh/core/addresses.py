"""Network addresses as the config, the API and the sources write them: HOST:PORT parsing."""

from __future__ import annotations

import ipaddress
import re

from repstage_mesh.core.models import _HOSTNAME

__all__ = ["parse_host_port"]


def parse_host_port(value: str) -> tuple[str, int]:
    """ "host:port" or "[v6]:port" → (host, port). Raises ValueError naming what was expected."""
    error = ValueError(f"expected HOST:PORT, got {value!r}")
    if not isinstance(value, str):
        raise error
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([^:\[\]\s]+):(\d{1,5})", value)
    if match is None:
        raise error
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    if not 1 <= port <= 65535:
        raise ValueError(f"expected HOST:PORT with a port from 1 to 65535, got {value!r}")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if match.group(1) or not _HOSTNAME.match(host):
            raise ValueError(
                f"expected HOST:PORT with an IP address or DNS name, got {value!r}"
            ) from None
    return host, port
