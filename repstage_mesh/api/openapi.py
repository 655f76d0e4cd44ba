"""The OpenAPI 3.1 document, generated from the route table and the pydantic models.

`api.py` declares each endpoint once as an `Operation` (method, path, handler, request model,
success models, error statuses). The router is built from that table and so is this document, so
an endpoint cannot exist without being documented, and its schemas are the models the handler
validates and answers with.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp.typedefs import Handler
from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from repstage_mesh.api.models import ErrorBody
from repstage_mesh.core.models import NAME_PATTERN

REF_TEMPLATE = "#/components/schemas/{model}"
SECURITY_SCHEME = "bearerAuth"


@dataclass(frozen=True)
class ListOf:
    """A JSON array of `model`."""

    model: type[BaseModel]


@dataclass(frozen=True)
class Text:
    """A non-JSON body (the Prometheus exposition)."""

    media_type: str = "text/plain"


@dataclass(frozen=True)
class AnyObject:
    """A JSON object with no fixed schema (the OpenAPI document itself)."""


Body = type[BaseModel] | ListOf | Text | AnyObject

ERROR_DESCRIPTIONS: dict[int, str] = {
    400: "malformed JSON (code malformed_json), or nested deeper than api.max_json_depth (too_deep)",
    401: "no bearer token, or an unknown one (code unauthorized)",
    403: "the token is read-only and this is a write (code forbidden)",
    404: "no such service or member (code not_found)",
    409: "stale epoch or conflicting change (code stale_epoch or conflict)",
    413: "the body is larger than api.max_body_bytes (code too_large)",
    421: "no api.tokens and the Host header is not a loopback name (code misdirected)",
    422: "invalid input; `field` names it (code invalid)",
    500: "unexpected server error (code internal); logged on the server",
    503: "no quorum: the write could not be committed (code no_quorum), or the node is not ready (not_ready)",
    504: "commit timeout: the write may or may not have been applied (code commit_timeout); read back and retry",
}


@dataclass(frozen=True)
class Operation:
    method: Literal["GET", "PUT", "POST", "DELETE"]
    path: str
    operation_id: str
    summary: str
    handler: Handler
    success: Mapping[int, tuple[str, Body]]
    request: type[BaseModel] | None = None
    errors: tuple[int, ...] = ()
    open: bool = False
    tag: str = "services"
    description: str = ""
    path_params: Mapping[str, str] = field(default_factory=dict)
    query_flags: Mapping[str, str] = field(default_factory=dict)  # boolean query parameters
    query_params: Mapping[str, tuple[str, Mapping[str, Any]]] = field(default_factory=dict)  # name -> (description, schema)

    @property
    def is_write(self) -> bool:
        return self.method not in ("GET", "HEAD", "OPTIONS")

    def error_statuses(self) -> list[int]:
        statuses = set(self.errors) | {421, 500}
        if not self.open:
            statuses.add(401)
        if self.is_write:
            statuses |= {403} if not self.open else set()
        if self.request is not None:
            statuses |= {400, 413, 422}
        return sorted(statuses)


def _json_content(schema: Mapping[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": dict(schema)}}


_Refs = Mapping[tuple[Any, JsonSchemaMode], Any]


def _wanted_models(operations: Sequence[Operation]) -> list[tuple[type[BaseModel], JsonSchemaMode]]:
    wanted: list[tuple[type[BaseModel], JsonSchemaMode]] = [(ErrorBody, "serialization")]
    for op in operations:
        if op.request is not None:
            wanted.append((op.request, "validation"))
        for _, body in op.success.values():
            model = body.model if isinstance(body, ListOf) else body
            if isinstance(model, type) and issubclass(model, BaseModel):
                wanted.append((model, "serialization"))
    return list(dict.fromkeys(wanted))


def _schema_of(refs: _Refs, body: Body, mode: JsonSchemaMode) -> dict[str, Any]:
    if isinstance(body, ListOf):
        return {"type": "array", "items": dict(refs[(body.model, mode)])}
    if isinstance(body, AnyObject):
        return {"type": "object"}
    if isinstance(body, Text):
        return {"type": "string"}
    return dict(refs[(body, mode)])


def _responses(op: Operation, refs: _Refs) -> dict[str, Any]:
    error_ref = dict(refs[(ErrorBody, "serialization")])
    responses: dict[str, Any] = {}
    for status, (description, body) in sorted(op.success.items()):
        if isinstance(body, Text):
            content: dict[str, Any] = {body.media_type: {"schema": {"type": "string"}}}
        else:
            content = _json_content(_schema_of(refs, body, "serialization"))
        responses[str(status)] = {"description": description, "content": content}
    for status in op.error_statuses():
        if str(status) in responses:
            continue
        response: dict[str, Any] = {
            "description": ERROR_DESCRIPTIONS.get(status, "error"),
            "content": _json_content(error_ref),
        }
        if status == 401:
            response["headers"] = {
                "WWW-Authenticate": {"description": "Bearer challenge", "schema": {"type": "string"}}
            }
        responses[str(status)] = response
    return responses


def _parameters(op: Operation) -> list[dict[str, Any]]:
    params = [
        {
            "name": name,
            "in": "path",
            "required": True,
            "description": description,
            "schema": {"type": "string", "pattern": NAME_PATTERN},
            "example": "orders",
        }
        for name, description in op.path_params.items()
    ]
    params += [
        {
            "name": name,
            "in": "query",
            "required": False,
            "description": description,
            "schema": {"type": "boolean", "default": False},
        }
        for name, description in op.query_flags.items()
    ]
    params += [
        {"name": name, "in": "query", "required": False, "description": description, "schema": dict(schema)}
        for name, (description, schema) in op.query_params.items()
    ]
    return params


def _operation_item(op: Operation, refs: _Refs) -> dict[str, Any]:
    item: dict[str, Any] = {
        "operationId": op.operation_id,
        "summary": op.summary,
        "tags": [op.tag],
        "responses": _responses(op, refs),
    }
    if op.description:
        item["description"] = op.description
    if op.open:
        item["security"] = []
    params = _parameters(op)
    if params:
        item["parameters"] = params
    if op.request is not None:
        item["requestBody"] = {
            "required": True,
            "content": _json_content(_schema_of(refs, op.request, "validation")),
        }
    return item


def build_openapi(operations: Sequence[Operation], *, title: str, version: str) -> dict[str, Any]:
    """The OpenAPI 3.1 document for `operations`."""
    refs, defs = models_json_schema(_wanted_models(operations), ref_template=REF_TEMPLATE)
    paths: dict[str, dict[str, Any]] = {}
    for op in operations:
        paths.setdefault(op.path, {})[op.method.lower()] = _operation_item(op, refs)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": title,
            "version": version,
            "description": (
                "REST API of a RepStage Mesh control-plane node. Every error answers "
                '`{"error": {"code", "message", "field", "details"}}`. Reads carry '
                "`applied_index`, the Raft index this node has applied."
            ),
        },
        "paths": paths,
        "components": {
            "schemas": defs.get("$defs", {}),
            "securitySchemes": {
                SECURITY_SCHEME: {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "a token from api.tokens (role read_write for writes; read_only or read_write for reads)",
                }
            },
        },
        "security": [{SECURITY_SCHEME: []}],
    }
