#!/usr/bin/env bash
# Snapshot benchmark (presets and backups), beside its anchors, on one private Postgres with durable default
# settings, all on 127.0.0.1:
#   - a pgbench database of SCALE (default 70: about 1 GB);
#   - the compressor on the same dump file: berth's zstd (+ sealing) against `xz -6 -T0` (db-p's compressor);
#   - the whole snapshot: berth's pipeline (pg_dump → zstd → seal → file store) against
#     `pg_dump -Fc -Z0 | xz -6 -T0 > file`;
#   - restore: berth's (store → check → open → zstd → pg_restore) against plain `pg_restore` of the dump file;
#   - a preset: the first instance on a server (template built) and the next one (clone of the template).
# Uses the dev build with the compression and crypto crates optimized (Cargo.toml) unless PROFILE=release.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/lib/pg.sh
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/berth-target}
export SQLX_OFFLINE=true
SCALE=${SCALE:-70}
LEVEL=${LEVEL:-6}
SKIP_XZ=${SKIP_XZ:-0}   # 1: leave out the xz anchors (they take minutes), for quick reruns of berth's side
PROFILE=${PROFILE:-dev}

work=$(mktemp -d /var/tmp/berth-snapbench.XXXXXX)
chmod 755 "$work"
cleanup() { pg_stop "$work/pg"; rm -rf "$work"; }
trap cleanup EXIT
log() { echo "[snapbench $(date +%H:%M:%S)] $*" >&2; }
ms() { python3 -c 'import time; print(int(time.time()*1000))'; }

pg_ensure_installed
command -v xz >/dev/null || { apt-get update -qq && apt-get install -y -qq xz-utils >/dev/null; }
cargo build --locked -q --profile "$PROFILE" -p berth-bench
bench=$CARGO_TARGET_DIR/$([ "$PROFILE" = dev ] && echo debug || echo "$PROFILE")/berth-bench
bin=$(pg_bin_dir)

pg_start "$work/pg"
export PGPASSWORD=${PG_URL#postgres://postgres:}; PGPASSWORD=${PGPASSWORD%%@*}
export PGHOST=127.0.0.1 PGPORT=$PG_PORT PGUSER=postgres
log "pgbench -i -s $SCALE"
"$bin/createdb" source
"$bin/pgbench" -i -q -s "$SCALE" source >/dev/null 2>&1
size=$("$bin/psql" -Atc "SELECT pg_database_size('source')" source)
log "database: $((size / 1024 / 1024)) MB"
"$bin/psql" -qc CHECKPOINT source

results=$work/results.jsonl
: >"$results"
log "dump file (pg_dump -Fc -Z0)"
t0=$(ms); "$bin/pg_dump" -Fc -Z0 -f "$work/dump" source; t1=$(ms)
echo "{\"figure\": \"pg_dump -Fc -Z0 to a file\", \"ms\": $((t1 - t0)), \"bytes\": $(stat -c %s "$work/dump")}" >>"$results"

log "compressors on the dump file"
"$bench" snapshot-seal --file "$work/dump" --level "$LEVEL" >>"$results"
if [ "$SKIP_XZ" != 1 ]; then
  t0=$(ms); xz -6 -T0 -c "$work/dump" >"$work/dump.xz"; t1=$(ms)
  echo "{\"figure\": \"xz -6 -T0 of the dump file\", \"ms\": $((t1 - t0)), \"bytes\": $(stat -c %s "$work/dump.xz")}" >>"$results"
  log "whole snapshots"
  t0=$(ms); "$bin/pg_dump" -Fc -Z0 source | xz -6 -T0 >"$work/whole.xz"; t1=$(ms)
  echo "{\"figure\": \"pg_dump -Fc -Z0 | xz -6 -T0 > file\", \"ms\": $((t1 - t0)), \"bytes\": $(stat -c %s "$work/whole.xz")}" >>"$results"
  rm -f "$work/whole.xz" "$work/dump.xz"
fi
"$bench" snapshot-cycle --pg-url "$PG_URL" --database source --store-dir "$work/store" --level "$LEVEL" >>"$results"

log "bare clone of the preset's template (the floor of a preset instance)"
tpl=$("$bin/psql" -Atc "SELECT datname FROM pg_database WHERE datname LIKE 'bench_tpl_%'" postgres)
t0=$(ms); "$bin/psql" -qc "CREATE DATABASE bare_clone TEMPLATE $tpl STRATEGY FILE_COPY" postgres; t1=$(ms)
echo "{\"figure\": \"bare CREATE DATABASE ... TEMPLATE (FILE_COPY)\", \"ms\": $((t1 - t0)), \"bytes\": null}" >>"$results"

log "plain pg_restore of the dump file"
"$bin/createdb" plain_restore
t0=$(ms); "$bin/pg_restore" --no-owner --no-privileges -d plain_restore "$work/dump"; t1=$(ms)
echo "{\"figure\": \"plain pg_restore of the dump file\", \"ms\": $((t1 - t0)), \"bytes\": null}" >>"$results"

# Every copy holds what the source holds.
want=$("$bin/psql" -Atc "SELECT count(*), sum(abalance) FROM pgbench_accounts" source)
for db in plain_restore bench_restored bench_app_a bench_app_b; do
  got=$("$bin/psql" -Atc "SELECT count(*), sum(abalance) FROM pgbench_accounts" "$db")
  [ "$got" = "$want" ] || { echo "database $db holds $got, source holds $want" >&2; exit 1; }
done

python3 - "$results" "$size" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print(json.dumps({"database_bytes": int(sys.argv[2]), "figures": rows}))
by = {r["figure"]: r for r in rows}
print(f"\n{'figure':<58} {'seconds':>9} {'MB':>9}")
for r in rows:
    mb = "" if r["bytes"] is None else f"{r['bytes'] / 1e6:9.1f}"
    print(f"{r['figure']:<58} {r['ms'] / 1000:9.2f} {mb:>9}")
zs = next(r for r in rows if r["figure"].startswith("zstd-"))
whole = by["berth snapshot: pg_dump → zstd → seal → store"]
if "xz -6 -T0 of the dump file" in by:
    xz = by["xz -6 -T0 of the dump file"]
    print(f"\ncompressor: zstd {xz['ms'] / zs['ms']:.1f}x faster than xz -6 -T0, size {zs['bytes'] / xz['bytes']:.3f}x of xz's")
    anchor = by["pg_dump -Fc -Z0 | xz -6 -T0 > file"]
    print(f"whole snapshot: {anchor['ms'] / whole['ms']:.1f}x faster, size {whole['bytes'] / anchor['bytes']:.3f}x")
rest = by["berth restore: store → open → zstd → pg_restore"]
plain = by["plain pg_restore of the dump file"]
print(f"restore: {rest['ms'] / plain['ms']:.2f}x the time of plain pg_restore")
clone = by["preset, next instance (template clone + swap)"]
bare = by["bare CREATE DATABASE ... TEMPLATE (FILE_COPY)"]
print(f"preset instance: {clone['ms'] / 1000:.2f} s, {clone['ms'] / bare['ms']:.2f}x a bare clone of the template")
PY
