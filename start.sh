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
  if ! command -v cargo >/dev/null; then
    echo "start.sh: berth is built from source with Rust's cargo, which is not installed: see https://rustup.rs" >&2
    exit 1
  fi
  if [ ! -x "$target/release/berth-api" ] || [ ! -x "$target/release/berth-worker" ]; then
    # A newcomer's first run: say what the silence is before it starts.
    echo "start.sh: building berth (release) into $target/ for the first time."
    echo "  A cold build compiles every dependency: about 15 minutes on 2 cores, less on more."
    echo "  Later starts rebuild only what changed: seconds. Then, with no DATABASE_URL, berth starts a private"
    echo "  Postgres under .berth/, the API on 127.0.0.1 and one worker, and prints the URL and credentials."
    cargo build --release --locked -p berth-api -p berth-worker
  else
    echo "start.sh: building berth (release; seconds when little changed) ..."
    cargo build --release --locked -q -p berth-api -p berth-worker
  fi
fi
exec "$target/release/berth-api" "$@"
