"""gRPC over HTTP/2, the facts the h2 transport (`http2.py`) needs: status codes by name,
grpcio's peer strings, and the trailers that end a call."""

from __future__ import annotations

import urllib.parse
from typing import Any

STATUS = {  # gRPC status codes by name (grpc.StatusCode's numbers)
    "OK": 0, "CANCELLED": 1, "UNKNOWN": 2, "INVALID_ARGUMENT": 3, "DEADLINE_EXCEEDED": 4, "NOT_FOUND": 5,
    "ALREADY_EXISTS": 6, "PERMISSION_DENIED": 7, "RESOURCE_EXHAUSTED": 8, "FAILED_PRECONDITION": 9,
    "ABORTED": 10, "OUT_OF_RANGE": 11, "UNIMPLEMENTED": 12, "INTERNAL": 13, "UNAVAILABLE": 14,
    "DATA_LOSS": 15, "UNAUTHENTICATED": 16,
}

# grpc-message is percent-encoded (gRPC over HTTP/2 spec); printable ASCII but "%" stays as is
_MESSAGE_SAFE = " !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~"


def grpc_peer(address: Any) -> str:
    """grpcio's peer string for a socket address ("ipv4:127.0.0.1:5000", "ipv6:[::1]:5000")."""
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"ipv6:[{host}]:{port}" if ":" in str(host) else f"ipv4:{host}:{port}"
    return f"unix:{address}"


def trailers(code: str, message: str) -> list[tuple[bytes, bytes]]:
    """`grpc-status` (and `grpc-message` when there is one) for a status name."""
    out = [(b"grpc-status", str(STATUS[code]).encode())]
    if message:
        out.append((b"grpc-message", urllib.parse.quote(message, safe=_MESSAGE_SAFE).encode()))
    return out
