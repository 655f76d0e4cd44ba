#!/bin/sh
# Gives this pod of the StatefulSet its Raft identity, then runs the command it is given
# (`repstage-mesh serve --config ...`). Every pod runs the same script and the same config file;
# what differs comes from the pod's name (downward API):
#   REPSTAGE_NODE__ID         this pod's name                      repstage-1
#   REPSTAGE_RAFT__ADVERTISE  this pod's stable Raft address        repstage-1.repstage-raft.<ns>.svc.<domain>:7001
#   REPSTAGE_RAFT__PEERS      the other pods' addresses (JSON list) ["repstage-0....:7001", "repstage-2....:7001"]
# The Raft port binds raft.bind (0.0.0.0:7001, in the config file); the advertised address is
# the fully qualified name the kubelet writes into the pod's /etc/hosts, so it resolves before
# the cluster DNS publishes the pod; pysyncobj knows nodes by these strings, so every pod must
# spell the others' addresses exactly as they spell their own. The API and xDS advertised
# addresses (REPSTAGE_API__ADVERTISE, REPSTAGE_XDS__ADVERTISE) are the pod IP, set in
# statefulset.yaml from the downward API.
set -eu
: "${POD_NAME:?}" "${POD_NAMESPACE:?}" "${RAFT_SERVICE:?}" "${RAFT_PORT:?}" "${RAFT_REPLICAS:?}"
domain="${CLUSTER_DOMAIN:-cluster.local}"
set_name="${POD_NAME%-*}"
self="${POD_NAME}.${RAFT_SERVICE}.${POD_NAMESPACE}.svc.${domain}:${RAFT_PORT}"
peers=""
found=no
i=0
while [ "$i" -lt "$RAFT_REPLICAS" ]; do
  peer="${set_name}-${i}.${RAFT_SERVICE}.${POD_NAMESPACE}.svc.${domain}:${RAFT_PORT}"
  if [ "$peer" = "$self" ]; then
    found=yes
  else
    peers="${peers:+$peers,}\"$peer\""
  fi
  i=$((i + 1))
done
if [ "$found" != yes ]; then
  echo "entrypoint: pod $POD_NAME is not one of the $RAFT_REPLICAS Raft members" \
    "(${set_name}-0 .. ${set_name}-$((RAFT_REPLICAS - 1))): set RAFT_REPLICAS to the StatefulSet's replicas" >&2
  exit 64
fi
export REPSTAGE_NODE__ID="$POD_NAME"
export REPSTAGE_RAFT__ADVERTISE="$self"
export REPSTAGE_RAFT__PEERS="[$peers]"
exec "$@"
