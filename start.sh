#!/usr/bin/env bash
# Runs the broker's API.
#   No DATABASE_URL: the embedded default. A private Postgres under .berth/, migrations, the API on
#   127.0.0.1:$PORT and one worker; prints the URL and credentials; Ctrl-C stops all of it.
#   DATABASE_URL set: the API only (run workers with ./start-background.sh).
# BERTH_SKIP_BUILD=1 runs the binaries already in $CARGO_TARGET_DIR (or target/) without building.
set -euo pipefail
cd "$(dirname "$0")"
target=${CARGO_TARGET_DIR:-target}
if [ -z "${BERTH_SKIP_BUILD:-}" ]; then
  cargo build --release --locked -q -p berth-api -p berth-worker
fi
exec "$target/release/berth-api" "$@"
