"""One exception tree: every exception class RepStage Mesh defines is a MeshError and is named
in the tree drawn in repstage_mesh/core/errors.py (the one place it is documented)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re

import repstage_mesh
from repstage_mesh.api.errors import STATUS_OF_CODE, ApiError
from repstage_mesh.core import errors
from repstage_mesh.core.errors import (
    ApiRequestError,
    DecisionRefused,
    MeshError,
    NoLeaderKnown,
    NoQuorumOutcomeUnknown,
    NotReady,
    SwitchoverFailed,
)

GENERIC = ("repstage_mesh.xds", "repstage_mesh.filters")  # may not import the domain


def _domain_exceptions() -> dict[str, type[BaseException]]:
    found: dict[str, type[BaseException]] = {}
    for info in pkgutil.walk_packages(repstage_mesh.__path__, "repstage_mesh."):
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if (
                inspect.isclass(obj)
                and issubclass(obj, BaseException)
                and obj.__module__ == info.name
                and not info.name.startswith(GENERIC)
            ):
                found[f"{info.name}.{name}"] = obj
    return found


def test_every_exception_is_a_mesh_error_and_is_in_the_documented_tree() -> None:
    found = _domain_exceptions()
    assert len(found) >= 15, sorted(found)
    doc = errors.__doc__ or ""
    for path, cls in found.items():
        assert issubclass(cls, MeshError), f"{path} is not under MeshError"
        named = re.search(rf"── {cls.__name__}\b", doc) or (cls is MeshError and "\nMeshError\n├──" in doc)
        assert named, f"{path} is missing from core/errors.py's tree"


def test_every_code_a_domain_error_carries_has_an_http_status() -> None:
    for cls in (NoLeaderKnown, NoQuorumOutcomeUnknown, NotReady):
        assert ApiError.from_domain(cls("x")).status == STATUS_OF_CODE[cls.code]
    assert ApiError.from_domain(NoLeaderKnown("x")).status == 503
    assert ApiError.from_domain(NoQuorumOutcomeUnknown("x")).status == 504
    refused = ApiError.from_domain(DecisionRefused("not_found", "no such member", "to"))
    assert (refused.status, refused.field) == (404, "to")
    failed = ApiError.from_domain(SwitchoverFailed("it failed", {"id": "r1", "status": "failed"}))
    assert failed.status == 409 and failed.details == [{"id": "r1", "status": "failed"}]


def test_an_answer_relayed_from_the_leader_keeps_its_status_and_body() -> None:
    relayed = ApiRequestError(422, "invalid", "to: bad", "to", [{"field": "to", "message": "bad"}])
    answer = ApiError.from_domain(relayed)
    assert (answer.status, answer.code, answer.field) == (422, "invalid", "to")
    assert answer.details == [{"field": "to", "message": "bad"}]


def test_an_unknown_code_is_a_500() -> None:
    class Odd(MeshError):
        code = "odd"

    assert ApiError.from_domain(Odd("x")).status == 500
