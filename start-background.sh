#!/usr/bin/env bash
# Runs one worker (start as many as you like, on any machines that reach DATABASE_URL).
set -euo pipefail
cd "$(dirname "$0")"
: "${DATABASE_URL:?set DATABASE_URL to the database of the broker (the same one the API uses)}"
target=${CARGO_TARGET_DIR:-target}
if [ -z "${BERTH_SKIP_BUILD:-}" ]; then
  if [ ! -x "$target/release/berth-worker" ]; then
    echo "start-background.sh: building berth-worker (release) for the first time: about 15 minutes on 2 cores." >&2
    cargo build --release --locked -p berth-worker
  else
    cargo build --release --locked -q -p berth-worker
  fi
fi
exec "$target/release/berth-worker" "$@"
