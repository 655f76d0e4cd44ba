"""Bearer-token auth for the REST API: named tokens with a read-only or a read-write role.

No token or an unknown one → 401 `unauthorized` (with `WWW-Authenticate: Bearer`); a read-only
token on a write → 403 `forbidden`. Probes and documents (`OPEN_PATHS`) stay open. The name of
the token (`api.tokens`) is kept on the request (`ACTOR`) for the audit trail.

With no tokens configured every request is allowed, and `api.start_api` refuses to bind anything
but loopback. A loopback socket is still reachable from a browser through DNS rebinding (a page
whose name resolves to 127.0.0.1), so in that mode the `Host` header must name a loopback
address or `localhost` (with any port); anything else is refused with 421 `misdirected`.
"""

from __future__ import annotations

import hmac
import ipaddress
from enum import StrEnum

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from repstage_mesh.api.errors import ApiError
from repstage_mesh.api.models import ApiTokens

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/openapi.json"})
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
ACTOR: web.RequestKey[str] = web.RequestKey("actor", str)  # the token's name, or "loopback"
LOOPBACK_ACTOR = "loopback"


class Access(StrEnum):
    NONE = "none"
    READ_ONLY = "read_only"
    READ_WRITE = "read_write"


class TokenChecker:
    """Looks a presented token up in constant time (every configured token is compared)."""

    def __init__(self, tokens: ApiTokens) -> None:
        self._tokens = [
            (entry.token.get_secret_value().encode(), entry.name, Access(entry.role))
            for entry in tokens.entries()
        ]

    @property
    def enabled(self) -> bool:
        return bool(self._tokens)

    def access(self, presented: str) -> Access:
        return self.identify(presented)[0]

    def identify(self, presented: str) -> tuple[Access, str]:
        """(role, token name) of a presented token; (NONE, "") for an unknown one."""
        token = presented.encode()
        found: tuple[Access, str] = (Access.NONE, "")
        for known, name, role in self._tokens:
            if hmac.compare_digest(token, known):
                found = (role, name)
        return found


def _bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def loopback_host(header: str) -> bool:
    """True when a Host header names localhost or a loopback address (any port)."""
    host = header.strip().lower()
    if host.startswith("["):
        host = host[1:host.find("]")] if "]" in host else ""
    elif host.count(":") == 1:
        host = host.rsplit(":", 1)[0]
    if host in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_host(request: web.Request) -> None:
    header = request.headers.get("Host")
    if header is not None and not loopback_host(header):
        raise ApiError(
            421,
            "misdirected",
            f"Host: {header[:100]!r} is not a loopback name; this API has no tokens and answers "
            "only requests addressed to localhost or a loopback address (configure api.tokens to "
            "serve other names)",
            "Host",
        )


def auth_middleware(checker: TokenChecker) -> Middleware:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not checker.enabled:
            _check_host(request)
            request[ACTOR] = LOOPBACK_ACTOR
            return await handler(request)
        if request.path in OPEN_PATHS:
            return await handler(request)
        token = _bearer(request)
        challenge = {"WWW-Authenticate": 'Bearer realm="repstage-mesh"'}
        if token is None:
            raise ApiError(
                401,
                "unauthorized",
                "this API needs a bearer token: send 'Authorization: Bearer <token>' "
                "(CLI: --token or REPSTAGE_TOKEN)",
                headers=challenge,
            )
        access, name = checker.identify(token)
        if access is Access.NONE:
            raise ApiError(
                401,
                "unauthorized",
                "the bearer token is not one of the configured api.tokens",
                headers={"WWW-Authenticate": 'Bearer realm="repstage-mesh", error="invalid_token"'},
            )
        if request.method not in READ_METHODS and access is not Access.READ_WRITE:
            raise ApiError(
                403,
                "forbidden",
                f"this token is read-only; {request.method} {request.path} needs a read_write token from api.tokens",
            )
        request[ACTOR] = name
        return await handler(request)

    return middleware
