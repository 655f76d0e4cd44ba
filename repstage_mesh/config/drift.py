"""Config drift: how the services of a config file differ from the replicated ones.

The file seeds the services on a cluster's first start; afterwards the replicated state (the
REST API) owns them, and a later edit of the file changes nothing by itself. `drift` names
what differs, field by field, so that `serve` can log it, `status` show it and
`repstage-mesh apply FILE` apply it (PUT of each changed or missing service). Pure: specs in,
differences out.

`primary` is not compared: in the file it is only the initial primary, and failovers change
the replicated one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from repstage_mesh.core.models import ServiceSpec

IGNORED = frozenset({"primary"})

DriftKind = Literal["changed", "missing", "unmanaged"]


@dataclass(frozen=True)
class ServiceDrift:
    """One service whose file spec and replicated spec differ.

    kind: "changed" (in both, `fields` differ), "missing" (in the file only: `apply` creates
    it), "unmanaged" (replicated only: `apply` leaves it; DELETE /v1/services/{name} removes
    it)."""

    service: str
    kind: DriftKind
    fields: tuple[str, ...] = ()
    file: dict[str, Any] | None = field(default=None, compare=False)
    replicated: dict[str, Any] | None = field(default=None, compare=False)

    def as_dict(self) -> dict[str, Any]:
        return {"service": self.service, "kind": self.kind, "fields": list(self.fields)}

    def describe(self) -> str:
        if self.kind == "missing":
            return f"{self.service}: in the config file only (not replicated)"
        if self.kind == "unmanaged":
            return f"{self.service}: replicated only (not in the config file)"
        return f"{self.service}: {', '.join(self.fields)} differ"


def _comparable(spec: ServiceSpec) -> dict[str, Any]:
    data = spec.model_dump(mode="json")
    return {k: v for k, v in data.items() if k not in IGNORED}


def drift(file_specs: Iterable[ServiceSpec], replicated: Mapping[str, ServiceSpec]) -> list[ServiceDrift]:
    """Differences between the file's services and the replicated ones (by name), in file
    order, then the replicated-only services by name."""
    out: list[ServiceDrift] = []
    named = {}
    for spec in file_specs:
        named[spec.name] = spec
        have = replicated.get(spec.name)
        want = _comparable(spec)
        if have is None:
            out.append(ServiceDrift(spec.name, "missing", (), want, None))
            continue
        got = _comparable(have)
        fields = tuple(k for k in want if want.get(k) != got.get(k))
        if fields:
            out.append(ServiceDrift(spec.name, "changed", fields, want, got))
    for name in sorted(set(replicated) - set(named)):
        out.append(ServiceDrift(name, "unmanaged", (), None, _comparable(replicated[name])))
    return out


def diff_lines(item: ServiceDrift) -> list[str]:
    """A readable diff of one service: `field: replicated -> file` per changed field."""
    if item.kind != "changed" or item.file is None or item.replicated is None:
        return [item.describe()]
    lines = [f"{item.service}:"]
    for name in item.fields:
        lines.append(f"  {name}: {item.replicated.get(name)!r} -> {item.file.get(name)!r}")
    return lines
