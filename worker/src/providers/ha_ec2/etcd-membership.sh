#!/bin/bash
# berth's etcd membership for one member of an ha cluster (installed as /usr/local/sbin/berth-etcd-membership).
#
#   join   Before a member that joins a running cluster (a replacement, or one added by a scale-up) starts etcd:
#          through the surviving peers, remove any member registered under its name or peer address (the dead
#          member it replaces, or its own add whose start never came), add itself, and write the member list etcd
#          hands back into its environment file with ETCD_INITIAL_CLUSTER_STATE=existing. Retries until a quorum
#          of peers answers.
#   prune  Remove members the broker retired: not in the cluster's wanted list (the VM's `berth:members` tag,
#          read from the instance metadata) and not answering. A member that merely reboots stays in the list,
#          so it is never removed; a member being added (not started yet) is left alone.
#
# Settings come from /etc/berth/membership.env (or the file BERTH_MEMBERSHIP_CONF names): ETCD_NAME, PEER_URL,
# PEER_ENDPOINTS (the other members' client URLs, comma separated), ETCD_ENV (etcd's environment file),
# ETCD_DATA_DIR; WANTED (comma separated names) replaces the metadata lookup; ETCDCTL names the client.
set -euo pipefail
conf=${BERTH_MEMBERSHIP_CONF:-/etc/berth/membership.env}
# shellcheck disable=SC1090
[ -f "$conf" ] && . "$conf"
: "${ETCD_NAME:?}" "${PEER_URL:?}"
ETCDCTL=${ETCDCTL:-etcdctl}
export ETCDCTL_API=3

ctl() { "$ETCDCTL" --command-timeout=5s "$@"; }

# `id name peer_url client_url` per member (an unstarted member has no name nor client URL: "-").
members() {
  ctl --endpoints="$1" member list -w simple |
    awk -F', ' '{ n = ($3 == "" ? "-" : $3); c = ($5 == "" ? "-" : $5); print $1, n, $4, c }'
}

join() {
  : "${PEER_ENDPOINTS:?}" "${ETCD_ENV:?}"
  local list="" added="" i
  for i in $(seq 1 120); do
    if list=$(members "$PEER_ENDPOINTS" 2>/dev/null); then
      while read -r id name peer _; do
        if [ "$name" = "$ETCD_NAME" ] || [ "$peer" = "$PEER_URL" ]; then
          echo "removing member $id ($name, $peer)"
          ctl --endpoints="$PEER_ENDPOINTS" member remove "$id" || true
        fi
      done <<<"$list"
      if added=$(ctl --endpoints="$PEER_ENDPOINTS" member add "$ETCD_NAME" --peer-urls="$PEER_URL"); then
        break
      fi
    fi
    echo "no quorum of peers answered yet (try $i); waiting"
    sleep 5
  done
  [ -n "$added" ] || { echo "could not join the etcd cluster through $PEER_ENDPOINTS"; exit 1; }
  local cluster
  cluster=$(sed -n 's/^ETCD_INITIAL_CLUSTER="\(.*\)"$/\1/p' <<<"$added")
  [ -n "$cluster" ] || { echo "etcdctl member add printed no member list"; exit 1; }
  # A fresh data folder: what was there belonged to a member that is gone.
  [ -n "${ETCD_DATA_DIR:-}" ] && rm -rf "${ETCD_DATA_DIR:?}"/member
  sed -i -e '/^ETCD_INITIAL_CLUSTER=/d' -e '/^ETCD_INITIAL_CLUSTER_STATE=/d' "$ETCD_ENV"
  printf 'ETCD_INITIAL_CLUSTER=%s\nETCD_INITIAL_CLUSTER_STATE=existing\n' "$cluster" >>"$ETCD_ENV"
  echo "joined as $ETCD_NAME ($PEER_URL): $cluster"
}

wanted_from_metadata() {
  local token
  token=$(curl -sf -m 2 -X PUT http://169.254.169.254/latest/api/token \
    -H 'X-aws-ec2-metadata-token-ttl-seconds: 60') || return 0
  curl -sf -m 2 -H "X-aws-ec2-metadata-token: $token" \
    http://169.254.169.254/latest/meta-data/tags/instance/berth:members || true
}

prune() {
  local wanted=${WANTED:-$(wanted_from_metadata)}
  [ -n "$wanted" ] || { echo "no wanted member list; nothing to prune"; return 0; }
  local local_endpoint=${LOCAL_ENDPOINT:-http://127.0.0.1:2379}
  members "$local_endpoint" | while read -r id name peer client; do
    [ "$name" = "-" ] && continue
    case ",$wanted," in *",$name,"*) continue ;; esac
    if ctl --endpoints="$client" endpoint health >/dev/null 2>&1; then
      echo "member $name is not wanted but still answers; leaving it until it is gone"
      continue
    fi
    echo "removing retired member $name ($id, $peer)"
    ctl --endpoints="$local_endpoint" member remove "$id" || true
  done
}

case "${1:-}" in
  join) join ;;
  prune) prune ;;
  *) echo "usage: $0 join|prune" >&2; exit 2 ;;
esac
