#!/usr/bin/env bash
# Runs one worker (start as many as you like, on any machines that reach DATABASE_URL).
set -euo pipefail
cd "$(dirname "$0")"
: "${DATABASE_URL:?set DATABASE_URL to the broker's database (the same one the API uses)}"
target=${CARGO_TARGET_DIR:-target}
if [ -z "${BERTH_SKIP_BUILD:-}" ]; then
  cargo build --release --locked -q -p berth-worker
fi
exec "$target/release/berth-worker" "$@"
