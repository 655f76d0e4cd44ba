#!/usr/bin/env bash
# Installs the Debian packages RepStage Mesh's demo and tests use, when missing:
# Redis 7 (redis-server) and PostgreSQL 15 server binaries (postgresql-15).
set -euo pipefail
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
# The packaged redis-server may have started a system instance; our tests and demo start their own.
if command -v systemctl >/dev/null 2>&1; then
  systemctl stop redis-server haproxy redis-sentinel >/dev/null 2>&1 || true
fi
