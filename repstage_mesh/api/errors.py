"""The API's error answers: one JSON shape for every error, and the middleware that guarantees it.

Every error is `{"error": {"code", "message", "field", "details"}}` (see `api_models.ErrorBody`),
whether it comes from a handler, from aiohttp's router (404, 405) or from a bug (500, logged).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler
from pydantic import ValidationError

from repstage_mesh.api.models import ErrorDetail
from repstage_mesh.core.errors import (
    ApiRequestError,
    MeshError,
    SwitchoverFailed,
    SwitchoverRunning,
)
from repstage_mesh.core.models import Rejection

log = logging.getLogger(__name__)

# The one table from a domain error's code to an HTTP status (core/errors.py lists the codes).
STATUS_OF_CODE: dict[str, int] = {
    "not_found": 404,
    "stale_epoch": 409,
    "conflict": 409,
    "switchover_failed": 409,
    "invalid": 422,
    "invalid_config": 422,
    "no_quorum": 503,
    "not_ready": 503,
    "not_leader": 503,
    "switchover_running": 504,
    "switchover_unknown": 504,
    "unreachable": 503,
    "commit_timeout": 504,
}
REJECTION_STATUS = STATUS_OF_CODE

Detail = ErrorDetail | Mapping[str, Any]

_FIELD_PREFIX = re.compile(
    r"^(?:Value error, )?([a-z_][a-z0-9_]*(?:\.[a-z0-9_]+)*): (.*)$", re.DOTALL
)


class ApiError(ApiRequestError):
    """Raised by handlers; the middleware turns it into the JSON error answer. The same fields
    as an answer received from an API (ApiRequestError), plus the headers to send."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        field: str | None = None,
        details: Sequence[Detail] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(status, code, message, field, list(details or []))
        self.headers = dict(headers or {})

    @classmethod
    def from_rejection(cls, rejection: Rejection) -> ApiError:
        return cls(
            REJECTION_STATUS.get(rejection.code, 422),
            rejection.code,
            rejection.message,
            rejection.field,
        )

    @classmethod
    def from_domain(cls, exc: MeshError) -> ApiError:
        """Any domain error as an HTTP answer: a relayed answer keeps its status; otherwise the
        status comes from STATUS_OF_CODE (a code it does not list is 500)."""
        if isinstance(exc, ApiError):
            return exc
        if isinstance(exc, ApiRequestError):
            return cls(exc.status, exc.code, exc.message, exc.field, exc.details)
        details = [exc.record] if isinstance(exc, SwitchoverFailed | SwitchoverRunning) else None
        return cls(STATUS_OF_CODE.get(exc.code, 500), exc.code, str(exc), exc.field, details)

    def response(self) -> web.Response:
        return error_response(
            self.status, self.code, self.message, self.field, self.details, self.headers
        )


def error_response(
    status: int,
    code: str,
    message: str,
    field: str | None = None,
    details: Sequence[Detail] | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    """The one JSON error shape (`api_models.ErrorBody`). A detail is an ErrorDetail, or a
    record relayed as it is (a failed switchover's record)."""
    body = {
        "error": {
            "code": code,
            "message": message,
            "field": field,
            "details": [
                d.model_dump(mode="json") if isinstance(d, ErrorDetail) else dict(d)
                for d in details or ()
            ],
        }
    }
    return web.json_response(body, status=status, headers=headers)


def _dotted(loc: tuple[int | str, ...], prefix: str | None = None) -> str | None:
    parts = [str(p) for p in loc]
    if prefix:
        parts.insert(0, prefix)
    return ".".join(parts) or None


def validation_details(exc: ValidationError, prefix: str | None = None) -> list[ErrorDetail]:
    """pydantic errors → details with dotted field paths (`members.1.port`).

    Model-level validators in models.py start their message with "<field>: "; that field is used.
    """
    details = []
    for err in exc.errors(include_url=False):
        loc = tuple(err.get("loc", ()))
        message = str(err.get("msg", "invalid value"))
        field = _dotted(loc, prefix)
        match = _FIELD_PREFIX.match(message)
        if match:
            named = match.group(1)
            field = ".".join(p for p in (prefix, *map(str, loc), named) if p)
            message = match.group(2)
        elif message.startswith("Value error, "):
            message = message.removeprefix("Value error, ")
        details.append(ErrorDetail(field=field, message=message, type=str(err.get("type")) or None))
    return details


def invalid(exc: ValidationError, prefix: str | None = None) -> ApiError:
    """A 422 naming the first offending field, with every problem in `details`."""
    details = validation_details(exc, prefix)
    first = details[0] if details else ErrorDetail(field=None, message="invalid request")
    where = f"{first.field}: " if first.field else ""
    more = f" (and {len(details) - 1} more problem(s), see details)" if len(details) > 1 else ""
    return ApiError(422, "invalid", f"{where}{first.message}{more}", first.field, details)


_HTTP_CODES: dict[int, tuple[str, str]] = {
    404: ("not_found", "no such route: {method} {path}; see /openapi.json for the API"),
    405: ("method_not_allowed", "{method} is not allowed on {path}; allowed: {allow}"),
    413: ("too_large", "request body too large"),
}


def _from_http_exception(request: web.Request, exc: web.HTTPException) -> web.Response:
    code, template = _HTTP_CODES.get(exc.status, ("http_error", exc.reason or "HTTP error"))
    allow = exc.headers.get("Allow", "")
    message = template.format(method=request.method, path=request.path, allow=allow or "none")
    headers = {"Allow": allow} if allow else None
    return error_response(exc.status, code, message, headers=headers)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Outermost middleware: whatever goes wrong, the client gets the JSON error shape."""
    try:
        return await handler(request)
    except MeshError as exc:
        if not isinstance(exc, ApiError) and exc.code not in STATUS_OF_CODE and not isinstance(exc, ApiRequestError):
            log.exception("unexpected error answering %s %s", request.method, request.path)
        return ApiError.from_domain(exc).response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _from_http_exception(request, exc)
    except Exception:
        log.exception("unexpected error answering %s %s", request.method, request.path)
        return error_response(500, "internal", "internal error; the server log has the details")


def json_of(value: Any) -> Any:
    """Helper for handlers: a pydantic model or list of them, dumped in JSON mode."""
    if isinstance(value, list):
        return [json_of(v) for v in value]
    dump = getattr(value, "model_dump", None)
    return dump(mode="json") if dump is not None else value
