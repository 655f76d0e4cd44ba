"""Bearer-token auth for the REST API: a read-only and a read-write role.

No token or an unknown one → 401 `unauthorized` (with `WWW-Authenticate: Bearer`); a read-only
token on a write → 403 `forbidden`. Probes and documents (`OPEN_PATHS`) stay open. With no tokens
configured every request is allowed; `api.start_api` then refuses to bind anything but loopback.
"""

from __future__ import annotations

import hmac
from enum import StrEnum

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from repstage_mesh.api.errors import ApiError
from repstage_mesh.api.models import ApiTokens

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/openapi.json"})
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class Access(StrEnum):
    NONE = "none"
    READ_ONLY = "read_only"
    READ_WRITE = "read_write"


class TokenChecker:
    """Looks a presented token up in constant time (every configured token is compared)."""

    def __init__(self, tokens: ApiTokens) -> None:
        self._read_write = [t.get_secret_value().encode() for t in tokens.read_write]
        self._read_only = [t.get_secret_value().encode() for t in tokens.read_only]

    @property
    def enabled(self) -> bool:
        return bool(self._read_write or self._read_only)

    def access(self, presented: str) -> Access:
        token = presented.encode()
        rw = False
        ro = False
        for known in self._read_write:
            rw |= hmac.compare_digest(token, known)
        for known in self._read_only:
            ro |= hmac.compare_digest(token, known)
        if rw:
            return Access.READ_WRITE
        return Access.READ_ONLY if ro else Access.NONE


def _bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def auth_middleware(checker: TokenChecker) -> Middleware:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not checker.enabled or request.path in OPEN_PATHS:
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
        access = checker.access(token)
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
                f"this token is read-only; {request.method} {request.path} needs a token from api.tokens.read_write",
            )
        return await handler(request)

    return middleware
