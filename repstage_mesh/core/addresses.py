"""Network addresses as the config, the API and the sources write them: hosts and HOST:PORT.

A host is an IP address (IPv4, or IPv6 without a scope id) or a DNS name; nothing else. A
member address reaches the proxies' config and a promotion hook's arguments, so an IPv6 scope
id (`fe80::1%eth0`, where Python accepts any characters after the `%`) is refused outright.
"""

from __future__ import annotations

import ipaddress
import re

__all__ = ["HOSTNAME", "check_host", "is_loopback", "parse_host_port"]

HOSTNAME = re.compile(
    r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)


def check_host(value: str) -> str:
    """`value` when it is an IP address (no IPv6 scope id) or a DNS name; ValueError otherwise."""
    if not isinstance(value, str):
        raise ValueError("must be an IP address or a DNS name")
    if "%" in value:
        raise ValueError(
            "must be an IP address or a DNS name; IPv6 scope ids ('%...') are not accepted"
        )
    try:
        ipaddress.ip_address(value)
    except ValueError:
        if not HOSTNAME.match(value):
            raise ValueError("must be an IP address or a DNS name") from None
    return value


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
        if match.group(1) or not HOSTNAME.match(host):
            raise ValueError(
                f"expected HOST:PORT with an IP address or DNS name, got {value!r}"
            ) from None
    return host, port


def is_loopback(host: str) -> bool:
    """True for loopback addresses and the name localhost; False for wildcards and other names."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
