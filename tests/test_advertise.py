"""Advertised addresses (api/xds/raft `advertise`): defaults, the environment, and the
refusals that name the field (a wildcard, or loopback while a peer is not); `validate`
catches them too. Also the failover-id check of GET /v1/failovers/{id}."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from fakes import FakePlane, LiveApi

from repstage_mesh.api.failovers import failover_operations
from repstage_mesh.cli import main as cli
from repstage_mesh.config import ConfigError, load_config
from repstage_mesh.raft.conf import RaftTimings, build_conf

PEERS = ["10.0.0.2:7001", "10.0.0.3:7001"]


def cluster(**sections: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "api": {"listen": "0.0.0.0:8080", "tokens": {"read_write": ["t"]}},
        "xds": {"listen": "0.0.0.0:18000"},
        "raft": {"bind": "0.0.0.0:7001", "peers": PEERS, "password": "p-0123456789abcdef"},
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return base


def load(tmp_path: Path, data: dict[str, Any], env: dict[str, str] | None = None) -> Any:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config(str(path), env=env or {})


def problems(
    tmp_path: Path, data: dict[str, Any], env: dict[str, str] | None = None
) -> dict[str, str]:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, data, env)
    return dict(caught.value.errors)


def test_single_node_defaults_announce_the_listen_address_or_loopback(tmp_path: Path) -> None:
    settings = load(tmp_path, {"api": {"listen": "0.0.0.0:8080", "tokens": {"read_write": ["t"]}}})
    assert settings.api.advertised() == "127.0.0.1:8080"
    assert settings.xds.advertised() == "127.0.0.1:18000"
    assert settings.raft.identity == "127.0.0.1:7001"
    settings = load(
        tmp_path, {"api": {"listen": "192.0.2.1:8080", "tokens": {"read_write": ["t"]}}}
    )
    assert settings.api.advertised(9999) == "192.0.2.1:9999"  # the bound port


def test_multi_node_wildcard_binds_need_advertise_and_each_problem_names_its_field(
    tmp_path: Path,
) -> None:
    found = problems(tmp_path, cluster())
    assert set(found) == {"api.advertise", "xds.advertise", "raft.advertise"}
    assert "REPSTAGE_API__ADVERTISE" in found["api.advertise"]


def test_advertise_from_the_environment_like_the_manifests(tmp_path: Path) -> None:
    env = {
        "REPSTAGE_API__ADVERTISE": "10.0.0.1:8080",
        "REPSTAGE_XDS__ADVERTISE": "10.0.0.1:18000",
        "REPSTAGE_RAFT__ADVERTISE": "10.0.0.1:7001",
    }
    settings = load(tmp_path, cluster(), env)
    assert settings.api.advertised() == "10.0.0.1:8080"
    assert settings.xds.advertised() == "10.0.0.1:18000"
    assert settings.raft.identity == "10.0.0.1:7001" and settings.raft.bind == "0.0.0.0:7001"


def test_wildcard_or_loopback_advertised_addresses_are_refused(tmp_path: Path) -> None:
    found = problems(tmp_path, cluster(api={"advertise": "0.0.0.0:8080"},
                                       xds={"advertise": "127.0.0.1:18000"},
                                       raft={"advertise": "10.0.0.1:7001"}))  # fmt: skip
    assert set(found) == {"api.advertise", "xds.advertise"}
    assert "wildcard" in found["api.advertise"]
    assert "loopback" in found["xds.advertise"] and "10.0.0.2:7001" in found["xds.advertise"]
    # a loopback bind without advertise is named by its bind field
    found = problems(tmp_path, cluster(raft={"bind": "127.0.0.1:7001"},
                                       api={"advertise": "10.0.0.1:8080"},
                                       xds={"advertise": "10.0.0.1:18000"}))  # fmt: skip
    assert set(found) == {"raft.bind"}


def test_own_advertised_raft_address_among_the_peers_is_refused(tmp_path: Path) -> None:
    found = problems(tmp_path, cluster(raft={"advertise": PEERS[0]},
                                       api={"advertise": "10.0.0.1:8080"},
                                       xds={"advertise": "10.0.0.1:18000"}))  # fmt: skip
    assert found == {
        "raft.peers[0]": "'10.0.0.2:7001' is this node's own raft.advertise; list only the others"
    }


def test_loopback_cluster_on_one_host_is_fine(tmp_path: Path) -> None:
    settings = load(
        tmp_path, {"raft": {"bind": "127.0.0.1:7001", "peers": ["127.0.0.1:7002"], "password": "p-0123456789abcdef"}}
    )
    assert settings.raft.identity == "127.0.0.1:7001"


def test_validate_names_the_advertise_field(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    for name in ("REPSTAGE_API__ADVERTISE", "REPSTAGE_XDS__ADVERTISE", "REPSTAGE_RAFT__ADVERTISE"):
        monkeypatch.delenv(name, raising=False)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cluster()))
    assert cli.main(["validate", str(path)]) == 1
    err = capsys.readouterr().err
    assert "(field: api.advertise)" in err and "(field: raft.advertise)" in err


def test_raft_binds_its_bind_address_and_is_known_by_its_advertised_one(tmp_path: Path) -> None:
    conf = build_conf(tmp_path, "p", RaftTimings(), bind_address="0.0.0.0:7001")
    assert conf.bindAddress == "0.0.0.0:7001"
    conf = build_conf(tmp_path, "p", RaftTimings(), bind_address="[::]:7001")
    assert conf.bindAddress == ":::7001"  # what pysyncobj's rsplit(":", 1) reads as ("::", 7001)


@pytest.mark.parametrize("record_id", ["..%2Fv1%2Fservices", "a b", "-x", "x" * 200])
def test_a_failover_id_that_is_not_one_is_refused_before_any_lookup(
    record_id: str, capsys: pytest.CaptureFixture[str]
) -> None:
    import urllib.error
    import urllib.request

    with LiveApi(FakePlane(), extra_operations=failover_operations()) as server:
        url = f"{server.url}/v1/failovers/{record_id.replace(' ', '%20')}"
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(url, timeout=5)
    assert caught.value.code == 404
    assert b"not a valid failover id" in caught.value.read()


def test_serve_refuses_to_start_naming_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("REPSTAGE_API__ADVERTISE", "REPSTAGE_XDS__ADVERTISE", "REPSTAGE_RAFT__ADVERTISE"):
        monkeypatch.delenv(name, raising=False)
    path = tmp_path / "c.yaml"
    data = cluster()
    data["node"] = {"data_dir": str(tmp_path / "data")}
    path.write_text(yaml.safe_dump(data))
    assert cli.main(["serve", "--config", str(path)]) == 1
    out = capsys.readouterr().out
    assert "api.advertise: required in a multi-node cluster" in out
    assert not (tmp_path / "data").exists()  # refused before anything started
