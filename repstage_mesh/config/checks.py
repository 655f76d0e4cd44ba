"""The one semantic pass: every problem of a deployment's services and listeners, at once, each
with the path of its field.

    problems = service_problems(SpecParts.of(spec), deployment, taken, prefix="services[0].")

Who runs it: `Settings` on the config file (so `validate` and `serve`), with the parts that
failed pydantic left out, so that type errors and these problems come in one report; and
`PUT /v1/services/{name}` on the body against the replicated services (`api/app.py`; a port
collision there is a 409 `conflict`, anything else a 422). Pure: no I/O.

What it finds:

- port collisions on the proxies: a service's `listen_port`/`read_port` against every other
  service, the fence listeners (`envoy.fence_port`, `+ 1`), Envoy's admin port
  (`envoy.admin_port`) and, when the Envoys share this node's host, the control plane's own
  sockets (`xds.listen`, `api.listen`, `raft.bind`);
- a service that can never be promoted in orchestrate mode (no built-in promotion for its
  protocol and no `promote_hook`, or a single member);
- a Consul-sourced service without `consul.address`; hooks and secrets that are not defined, or
  a secret whose `hosts` do not list a member's address.

"Shares this host" is decided from the config alone: an xDS server on (or advertised at) a
loopback address can only be reached by Envoys on the same host; a control-plane socket on the very address the
Envoys' listeners bind is on the same host too. Elsewhere (a wildcard xDS address, Envoys on
other machines) the control plane's ports are not the proxies' business.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import TypeAdapter, ValidationError

from repstage_mesh.core.addresses import is_loopback
from repstage_mesh.core.models import (
    LeadershipMode,
    LeadershipSource,
    LeadershipSpec,
    Member,
    ProbeKind,
    ServiceProtocol,
    ServiceSpec,
)

__all__ = [
    "Deployment",
    "Problem",
    "SpecParts",
    "listener_problems",
    "replicated_problems",
    "reserved_ports",
    "service_problems",
    "sockets_overlap",
]

WILDCARDS = frozenset({"0.0.0.0", "::", ""})
_PROMOTABLE = {ServiceProtocol.REDIS, ServiceProtocol.POSTGRES}
_PROMOTABLE_PROBES = {ProbeKind.REDIS, ProbeKind.POSTGRES}


@dataclass(frozen=True)
class Problem:
    """One problem: the field (dotted path), what is wrong and what to do; `conflict` for a port
    another part of the deployment already uses (the API answers 409, not 422)."""

    field: str
    message: str
    conflict: bool = False

    def pair(self) -> tuple[str, str]:
        return self.field, self.message


@dataclass(frozen=True)
class Deployment:
    """What a service is checked against besides the other services. None: not known (that
    part failed to validate), so the checks that need it are skipped."""

    reserved_ports: Mapping[int, str] = field(default_factory=dict)
    hooks: frozenset[str] | None = frozenset()
    secret_hosts: Mapping[str, frozenset[str] | None] | None = field(default_factory=dict)
    consul: bool | None = False


@dataclass(frozen=True)
class SpecParts:
    """The fields of a ServiceSpec that are valid on their own (None: missing or invalid)."""

    name: str | None = None
    protocol: ServiceProtocol | None = None
    listen_port: int | None = None
    read_port: int | None = None
    members: tuple[Member, ...] | None = None
    leadership: LeadershipSpec | None = None

    @classmethod
    def of(cls, spec: ServiceSpec) -> SpecParts:
        return cls(spec.name, spec.protocol, spec.listen_port, spec.read_port, spec.members,
                   spec.leadership)

    @classmethod
    def salvage(cls, data: Any) -> SpecParts:
        """From raw input that failed validation: each field validated alone, so that the
        problems of the valid ones are reported with pydantic's errors about the others."""
        if not isinstance(data, Mapping):
            return cls()
        values: dict[str, Any] = {}
        for name in ("name", "protocol", "listen_port", "read_port", "members", "leadership"):
            info = ServiceSpec.model_fields[name]
            if name not in data:
                values[name] = None if info.is_required() else info.get_default(call_default_factory=True)
                continue
            try:
                values[name] = _adapter(name).validate_python(data[name])
            except (ValidationError, ValueError, TypeError):
                values[name] = None
        return cls(**values)


_ADAPTERS: dict[str, TypeAdapter[Any]] = {}


def _adapter(name: str) -> TypeAdapter[Any]:
    if name not in _ADAPTERS:
        info = ServiceSpec.model_fields[name]
        annotation: Any = info.rebuild_annotation()
        _ADAPTERS[name] = TypeAdapter(annotation)
    return _ADAPTERS[name]


def sockets_overlap(a: str, b: str) -> bool:
    """Two hosts whose listeners on one port of one machine would collide."""
    def norm(host: str) -> str:
        return "127.0.0.1" if is_loopback(host) else host

    ha, hb = norm(a), norm(b)
    return ha == hb or ha in WILDCARDS or hb in WILDCARDS


def reserved_ports(
    fence_port: int | None, admin_port: int | None, envoy_address: str | None,
    sockets: Mapping[str, tuple[str, int]], xds_advertise: str | None = None,
) -> dict[int, str]:
    """Port -> what already uses it on every proxy: the fence listeners (fence_port None: not
    health_fence), the admin port, and this node's sockets when the Envoys share its host."""
    used: dict[int, str] = {}
    if fence_port is not None:
        used[fence_port] = "envoy.fence_port (the fence listener on every Envoy)"
        used[fence_port + 1] = "envoy.fence_port + 1 (the second fence listener on every Envoy)"
    if admin_port is not None:
        used.setdefault(admin_port, "envoy.admin_port (every Envoy's admin interface)")
    if envoy_address is not None and _shares_host(envoy_address, sockets, xds_advertise):
        for name, (host, port) in sockets.items():
            if port and sockets_overlap(host, envoy_address):
                used.setdefault(port, f"{name} (this control-plane node, on the Envoys' host)")
    return used


def _shares_host(envoy_address: str, sockets: Mapping[str, tuple[str, int]], xds_advertise: str | None) -> bool:
    """The Envoys run on this host: they reach xDS on a loopback address (bound or advertised),
    or this node listens on the very address their listeners bind."""
    xds = sockets.get("xds.listen")
    if (xds is not None and is_loopback(xds[0])) or (xds_advertise is not None and is_loopback(xds_advertise)):
        return True
    return envoy_address not in WILDCARDS and any(h == envoy_address for h, _ in sockets.values())


def listener_problems(
    sockets: Mapping[str, tuple[str, int]], fence_port: int | None, admin_port: int | None,
    envoy_address: str | None, xds_advertise: str | None = None,
) -> list[Problem]:
    """The control plane's own sockets against each other, and the proxies' fixed ports
    (fence, admin) against each other and against this node's sockets on a shared host."""
    problems: list[Problem] = []
    names = list(sockets)
    for j, later in enumerate(names):
        for earlier in names[:j]:
            (h1, p1), (h2, p2) = sockets[earlier], sockets[later]
            if p1 and p1 == p2 and sockets_overlap(h1, h2):
                problems.append(Problem(later, f"port {p2} is also {earlier}; each needs its own port", True))
                break
    fixed = reserved_ports(fence_port, None, None, {})
    if admin_port is not None and admin_port in fixed:
        problems.append(Problem("envoy.admin_port", f"port {admin_port} is also {fixed[admin_port]}; "
                                "choose another admin port (bootstrap --admin-port) or fence_port", True))
    if admin_port is not None:
        fixed.setdefault(admin_port, "envoy.admin_port (every Envoy's admin interface)")
    if envoy_address is not None and _shares_host(envoy_address, sockets, xds_advertise):
        for name, (host, port) in sockets.items():
            if port in fixed and sockets_overlap(host, envoy_address):
                problems.append(Problem(name, f"port {port} is also {fixed[port]}, and the Envoys run on "
                                        "this host; choose another port", True))
    return problems


def service_problems(
    parts: SpecParts, deployment: Deployment, taken: Mapping[int, str], prefix: str = ""
) -> list[Problem]:
    """Every problem of one service; `taken` maps the other services' ports to who uses them."""
    return [
        *_port_problems(parts, deployment, taken, prefix),
        *_promotion_problems(parts, prefix),
        *_reference_problems(parts, deployment, prefix),
    ]


def _port_problems(
    parts: SpecParts, deployment: Deployment, taken: Mapping[int, str], prefix: str
) -> list[Problem]:
    problems: list[Problem] = []
    for name, port in (("listen_port", parts.listen_port), ("read_port", parts.read_port)):
        if port is None:
            continue
        owner = taken.get(port) or deployment.reserved_ports.get(port)
        if owner is None and name == "read_port" and port == parts.listen_port:
            owner = "this service's listen_port"
        if owner is not None:
            problems.append(Problem(f"{prefix}{name}", f"port {port} is also {owner}; every Envoy "
                                    "would refuse the listener: choose a free port", True))
    return problems


def _promotion_problems(parts: SpecParts, prefix: str) -> list[Problem]:
    lead = parts.leadership
    if lead is None or lead.mode is not LeadershipMode.ORCHESTRATE:
        return []
    problems: list[Problem] = []
    builtin = parts.protocol in _PROMOTABLE or lead.probe.kind in _PROMOTABLE_PROBES
    if lead.promote_hook is None and not builtin and parts.protocol is not None:
        problems.append(Problem(f"{prefix}leadership.mode", (
            f"orchestrate: protocol {parts.protocol.value!r} has no built-in promotion, so a "
            "failover could only fail closed; name a hook (leadership.promote_hook, defined under "
            "hooks:) or use mode follow")))
    if parts.members is not None and len(parts.members) < 2:
        problems.append(Problem(f"{prefix}leadership.mode", (
            "orchestrate: a single member leaves no replica to promote; add members or use mode follow")))
    return problems


def _reference_problems(parts: SpecParts, deployment: Deployment, prefix: str) -> list[Problem]:
    lead = parts.leadership
    if lead is None:
        return []
    problems: list[Problem] = []
    if lead.source is LeadershipSource.CONSUL and deployment.consul is False:
        problems.append(Problem(f"{prefix}leadership.source", (
            "consul: this config has no consul.address, so nothing would ever report a primary; "
            "set consul.address or use source probe or announce")))
    hooks = deployment.hooks
    if lead.promote_hook is not None and hooks is not None and lead.promote_hook not in hooks:
        problems.append(Problem(f"{prefix}leadership.promote_hook", (
            f"no hook named {lead.promote_hook!r} in the config file's hooks: section (known: "
            f"{sorted(hooks)}); only the operator defines them")))
    secret, known = lead.probe.password_secret, deployment.secret_hosts
    field_name = f"{prefix}leadership.probe.password_secret"
    if secret is None or known is None:
        return problems
    if secret not in known:
        problems.append(Problem(field_name, (
            f"no secret named {secret!r} in the config file's secrets: section (known: "
            f"{sorted(known)}); only the operator defines them")))
        return problems
    hosts = known[secret]
    refused = [m.address for m in parts.members or () if hosts is not None and m.address not in hosts]
    if refused:
        problems.append(Problem(field_name, (
            f"secret {secret!r} may not be sent to {refused} (its hosts: {sorted(hosts or ())}, "
            f"secrets.{secret}.hosts)")))
    return problems



def replicated_problems(specs: Iterable[ServiceSpec], deployment: Deployment) -> list[Problem]:
    """The replicated services against this node's config: a service created through the API
    before the config moved a fence or admin port onto its port. Neither `validate` (it does
    not know the replicated state) nor `PUT` (the service is already there) can see it; `serve`
    logs each at start, since every Envoy NACKs the listeners until one of them moves."""
    problems: list[Problem] = []
    for spec in specs:
        for name, port in (("listen_port", spec.listen_port), ("read_port", spec.read_port)):
            owner = deployment.reserved_ports.get(port) if port is not None else None
            if owner is not None:
                field_name = owner.split(" ")[0]
                problems.append(Problem(field_name, (
                    f"port {port} is also the {name} of the replicated service {spec.name!r}: every "
                    f"Envoy refuses one of the two listeners; change {field_name} or give the service "
                    "another port (PUT /v1/services/...)"), True))
    return problems
