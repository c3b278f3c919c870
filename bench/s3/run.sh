#!/usr/bin/env bash
# S3 part of the benchmarks (the rest is bench/run.sh): provision→ready and deprovision of a bucket holding
# OBJECTS objects (default 10,000), through the real berth-api + berth-worker, against the same store's own
# bulk delete (boto3 list + delete_objects in batches of 1,000, what `aws s3 rm --recursive` does) as the limit.
# Runs on moto (the `aws` engine, IAM enforced) and SeaweedFS (the `s3-compatible` engine). Everything on
# 127.0.0.1; stops what it started. Prints one JSON line per store and a table.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/lib/pg.sh
source scripts/lib/s3peers.sh
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/berth-target}
OBJECTS=${OBJECTS:-10000}
PROFILE=${PROFILE:-release}

work=$(mktemp -d /tmp/berth-s3bench.XXXXXX)
chmod 755 "$work"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  s3peers_stop "$work/s3"
  pg_stop "$work/pg"
  rm -rf "$work"
}
trap cleanup EXIT

s3peers_ensure_installed
pg_ensure_installed
cargo build --locked -q --profile "$PROFILE" -p berth-api -p berth-worker
bin=$CARGO_TARGET_DIR/$([ "$PROFILE" = dev ] && echo debug || echo "$PROFILE")
pg_start "$work/pg"
moto_start "$work/s3"
weed_start "$work/s3"
"$bin/berth-api" gen-key "$work/master.key" >/dev/null
export BERTH_KEY_FILE=$work/master.key BROKER_USERNAME=bench RUST_LOG=warn NAME_PREFIX=bench_
BROKER_PASSWORD=$(head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9'); export BROKER_PASSWORD

# run_store NAME ENV...: a fresh database, berth-api + one berth-worker with the store's settings, then bench.py.
run_store() {
  local name=$1; shift
  local db="bench_$name" port
  psql_url=${PG_URL%/*}
  "$(pg_bin_dir)/psql" "$PG_URL" -qc "CREATE DATABASE $db"
  port=$(_s3peers_port)
  env "$@" DATABASE_URL="$psql_url/$db" PORT=$port BIND_ADDRESS=127.0.0.1 "$bin/berth-api" >"$work/$name-api.log" 2>&1 &
  pids+=($!)
  env "$@" DATABASE_URL="$psql_url/$db" "$bin/berth-worker" >"$work/$name-worker.log" 2>&1 &
  pids+=($!)
  python3 bench/s3/bench.py --store "$name" --url "http://127.0.0.1:$port" --objects "$OBJECTS" \
    --endpoint "$S3_URL" --key "$S3_KEY" --secret "$S3_SECRET" --prefix bench- | tee -a "$work/results.jsonl"
}

S3_URL=$BERTH_TEST_MOTO_URL S3_KEY=$BERTH_TEST_MOTO_ACCESS_KEY S3_SECRET=$BERTH_TEST_MOTO_SECRET_KEY \
  run_store moto AWS_REGION=us-east-1 AWS_ENDPOINT_URL="$BERTH_TEST_MOTO_URL" \
  AWS_ACCESS_KEY_ID="$BERTH_TEST_MOTO_ACCESS_KEY" AWS_SECRET_ACCESS_KEY="$BERTH_TEST_MOTO_SECRET_KEY"
S3_URL=$BERTH_TEST_S3_COMPAT_URL S3_KEY=$BERTH_TEST_S3_COMPAT_ACCESS_KEY S3_SECRET=$BERTH_TEST_S3_COMPAT_SECRET_KEY \
  run_store seaweedfs S3_COMPATIBLE_ENDPOINT="$BERTH_TEST_S3_COMPAT_URL" S3_COMPATIBLE_IAM_ENDPOINT="$BERTH_TEST_S3_COMPAT_URL" \
  S3_COMPATIBLE_ACCESS_KEY="$BERTH_TEST_S3_COMPAT_ACCESS_KEY" S3_COMPATIBLE_SECRET_KEY="$BERTH_TEST_S3_COMPAT_SECRET_KEY"

python3 - "$work/results.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print(f"\n| store | objects | provision→ready | berth deprovision | boto3 delete_objects | ratio (bar ≤ 1.5) |")
print("|---|---|---|---|---|---|")
for r in rows:
    print(f"| {r['store']} | {r['objects']} | {r['provision_s']:.2f} s | {r['deprovision_s']:.2f} s | "
          f"{r['anchor_delete_s']:.2f} s | {r['ratio']:.2f} |")
PY
