#!/usr/bin/env bash
# What TLS costs a request: GET /v2/catalog on a new connection (TCP connect and TLS handshake included), over
# HTTPS against plain HTTP, N requests each one after another, timed by curl (-w time_total, so curl's own start
# is not counted). The release berth-api, one process per mode, on a fresh database of the Postgres at
# DATABASE_URL (a superuser URL); certificate: EC P-256 from openssl. Prints median and 90th percentile.
#
#   DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres bench/tls.sh [N=200]
set -euo pipefail
n=${1:-200}
root=$(cd "$(dirname "$0")/.." && pwd)
admin_url=${DATABASE_URL:?DATABASE_URL: a superuser URL of a Postgres server}
bin=${CARGO_TARGET_DIR:-$root/target}/release/berth-api
if [ -z "${BENCH_NO_BUILD:-}" ]; then
  (cd "$root" && cargo build --release --locked -q -p berth-api)
fi
work=$(mktemp -d)
db=bench_tls_$(date +%s)_$$
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  psql -X -q "$admin_url" -c "DROP DATABASE IF EXISTS $db" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
psql -X -q -v ON_ERROR_STOP=1 "$admin_url" -c "CREATE DATABASE $db"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

"$bin" gen-key "$work/master.key" >/dev/null
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 -subj /CN=localhost \
  -addext subjectAltName=IP:127.0.0.1 -keyout "$work/tls.key" -out "$work/tls.crt" 2>/dev/null
export DATABASE_URL=${admin_url%/*}/$db BERTH_KEY_FILE=$work/master.key PLANS_DIR=$root/plans \
  SHARED_POSTGRES_URL=$admin_url BROKER_USERNAME=bench BIND_ADDRESS=127.0.0.1 RUST_LOG=warn
BROKER_PASSWORD=$(head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9')
export BROKER_PASSWORD

# start NAME [ENV=VALUE...]: a berth-api; sets URL.
start() {
  local name=$1 port i scheme=http
  shift
  port=$(free_port)
  case "$*" in *TLS_CERT_FILE*) scheme=https ;; esac
  env PORT="$port" "$@" "$bin" >"$work/$name.log" 2>&1 &
  pids+=("$!")
  URL=$scheme://127.0.0.1:$port
  for i in $(seq 1 300); do
    curl -fsS --cacert "$work/tls.crt" -o /dev/null "$URL/health" 2>/dev/null && return
    [ "$i" = 300 ] && { cat "$work/$name.log" >&2; echo "$name: berth-api not healthy" >&2; exit 1; }
    sleep 0.1
  done
}

# measure URL [COUNT=n]: "median p90" of time_total in ms over COUNT new connections.
measure() {
  local i
  for i in $(seq 1 "${2:-$n}"); do
    curl -fsS --cacert "$work/tls.crt" -u "bench:$BROKER_PASSWORD" -H 'X-Broker-API-Version: 2.17' \
      -o /dev/null -w '%{time_total}\n' "$1/v2/catalog"
  done | sort -n | awk '{ t[NR] = $1 * 1000 } END { printf "median %.2f ms, p90 %.2f ms", t[int(NR / 2) + 1], t[int(NR * 0.9)] }'
}

# handshake URL: "median" of curl's TLS handshake (time_appconnect - time_connect) in ms; this includes curl's own
# TLS set-up, paid once per curl process.
handshake() {
  local i
  for i in $(seq 1 "$n"); do
    curl -fsS --cacert "$work/tls.crt" -o /dev/null -w '%{time_connect} %{time_appconnect}\n' "$1/health"
  done | awk '{ print ($2 - $1) * 1000 }' | sort -n | awk '{ t[NR] = $1 } END { printf "median %.2f ms", t[int(NR / 2) + 1] }'
}

# s_time URL: new TLS connections one after another, each with GET /health, for 5 s, by one openssl process
# (no per-process set-up): the time per connection.
s_time() {
  local start end count
  start=$(date +%s%N)
  count=$(openssl s_time -connect "${1#https://}" -new -time 5 -CAfile "$work/tls.crt" -www /health 2>/dev/null |
    awk '/connections in .* real seconds/ { print $1 }')
  end=$(date +%s%N)
  awk -v c="$count" -v ns=$((end - start)) 'BEGIN { printf "%.2f ms per connection (%d in %.1f s)", ns / 1e6 / c, c, ns / 1e9 }'
}

start plain
plain=$URL
start tls TLS_CERT_FILE="$work/tls.crt" TLS_KEY_FILE="$work/tls.key"
https=$URL
measure "$plain" 20 >/dev/null # warm both up
measure "$https" 20 >/dev/null
echo "GET /v2/catalog on a new connection, $n each, $(nproc) cores, release build:"
echo "  http:  $(measure "$plain")"
echo "  https: $(measure "$https")  (TLS 1.3, EC P-256, curl $(curl --version | head -1 | cut -d' ' -f2))"
echo "  https handshake alone (curl): $(handshake "$https")"
echo "  https, openssl s_time (handshake + GET /health, one client process): $(s_time "$https")"
