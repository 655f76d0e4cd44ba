"""A small synchronous client of the REST API for the CLI (urllib, no event loop).

It knows one or more nodes' URLs (`--api` repeated or comma-separated) and tries them in order:
a request that cannot reach a node goes to the next one, and the node that answered is asked
first from then on. A GET is retried on any failure to get an answer; a write only when the
connection was refused (it never reached the node), so nothing is done twice.

Errors come back as exceptions that carry what the CLI prints: `ApiRequestError` (the server's
JSON error: code, message, field, status) and `ApiUnreachable` (which URLs were tried and how
to point the CLI elsewhere).
"""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from repstage_mesh.core.errors import ApiRequestError, ApiUnreachable

__all__ = [
    "API_ENV",
    "DEFAULT_API",
    "TOKEN_ENV",
    "ApiClient",
    "ApiRequestError",
    "ApiUnreachable",
    "split_urls",
]

DEFAULT_API = "http://127.0.0.1:8080"
API_ENV = "REPSTAGE_API"
TOKEN_ENV = "REPSTAGE_TOKEN"


def split_urls(values: str | Sequence[str]) -> list[str]:
    """`--api` values (each possibly comma-separated) as a list of base URLs, in order, once."""
    items = [values] if isinstance(values, str) else list(values)
    urls = [u.strip().rstrip("/") for item in items for u in item.split(",")]
    return list(dict.fromkeys(u if "://" in u else f"http://{u}" for u in urls if u))


@dataclass(frozen=True)
class _NoAnswer:
    """A node gave no answer (not an exception: the next node is tried); `sent`: the request
    may have reached it."""

    reason: str
    sent: bool


def _never_sent(exc: BaseException) -> bool:
    reason = getattr(exc, "reason", exc)
    return isinstance(reason, ConnectionRefusedError | socket.gaierror) or (
        isinstance(reason, OSError) and reason.errno in (101, 113)  # ENETUNREACH, EHOSTUNREACH
    )


class ApiClient:
    def __init__(
        self, base_url: str | Sequence[str] = DEFAULT_API, token: str | None = None, timeout: float = 10.0
    ) -> None:
        self.urls = split_urls(base_url) or [DEFAULT_API]
        self.token = token or None
        self.timeout = timeout

    @property
    def base_url(self) -> str:
        """The node asked first (the one that answered last)."""
        return self.urls[0]

    def request(self, method: str, path: str, body: Any = None) -> Any:
        failures: list[str] = []
        for url in list(self.urls):
            answer = self._once(url, method, path, body)
            if isinstance(answer, _NoAnswer):
                failures.append(f"{url} ({answer.reason})")
                if method != "GET" and answer.sent:
                    break  # a write may have been carried out: never send it twice
                continue
            if url != self.urls[0]:
                self.urls.remove(url)
                self.urls.insert(0, url)
            return answer
        raise ApiUnreachable(
            f"cannot reach the RepStage Mesh API at {'; '.join(failures)}; is a node running there? "
            f"Point the CLI elsewhere with --api URL[,URL...] or {API_ENV}"
        )

    def _once(self, base: str, method: str, path: str, body: Any) -> Any:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(base + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            raise self._error(exc.code, exc.reason, exc.read()) from None
        except (urllib.error.URLError, OSError) as exc:
            return _NoAnswer(str(getattr(exc, "reason", exc)), sent=not _never_sent(exc))
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return _NoAnswer("did not answer JSON: is it a RepStage Mesh node?", sent=True)

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
