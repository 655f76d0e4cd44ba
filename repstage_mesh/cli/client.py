"""A small synchronous client of the REST API for the CLI (urllib, no event loop).

Errors come back as exceptions that carry what the CLI prints: `ApiRequestError` (the server's
JSON error: code, message, field, status) and `ApiUnreachable` (which URL was tried and how to
point the CLI elsewhere).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from repstage_mesh.core.errors import ApiRequestError, ApiUnreachable

__all__ = ["API_ENV", "DEFAULT_API", "TOKEN_ENV", "ApiClient", "ApiRequestError", "ApiUnreachable"]

DEFAULT_API = "http://127.0.0.1:8080"
API_ENV = "REPSTAGE_API"
TOKEN_ENV = "REPSTAGE_TOKEN"


class ApiClient:
    def __init__(
        self, base_url: str = DEFAULT_API, token: str | None = None, timeout: float = 10.0
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token or None
        self.timeout = timeout

    def request(self, method: str, path: str, body: Any = None) -> Any:
        url = self.base_url + path
        data = None if body is None else json.dumps(body).encode()
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            raise self._error(exc.code, exc.reason, exc.read()) from None
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ApiUnreachable(
                f"cannot reach the RepStage Mesh API at {self.base_url} ({reason}); "
                f"is a node running there? Point the CLI elsewhere with --api URL or {API_ENV}"
            ) from None
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            raise ApiUnreachable(
                f"{url} did not answer JSON; is --api pointing at a RepStage Mesh node?"
            ) from None

    @staticmethod
    def _error(status: int, reason: str, raw: bytes) -> ApiRequestError:
        try:
            error = json.loads(raw)["error"]
            return ApiRequestError(
                status, str(error["code"]), str(error["message"]), error.get("field"),
                list(error.get("details") or []),
            )
        except (ValueError, KeyError, TypeError):
            return ApiRequestError(status, "http_error", f"HTTP {status} {reason}".strip())

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post(self, path: str, body: Any) -> Any:
        return self.request("POST", path, body)

    def put(self, path: str, body: Any) -> Any:
        return self.request("PUT", path, body)
