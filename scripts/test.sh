#!/usr/bin/env bash
# Runs every test on a fresh machine: installs what is missing, starts a private Postgres on a free port
# (unless BERTH_TEST_DATABASE_URL names a superuser URL to use instead) and the S3 peers (moto with IAM
# enforced, SeaweedFS) and the VM emulator (moto's instances boot as containers: docs/vm-emulator.md), installs etcd
# and Patroni (the ha plan's local engine), checks formatting
# (cargo fmt) and lints (clippy, warnings are errors), builds, checks the systemd units, runs the whole suite
# with cargo-nextest, builds and smoke-tests the container image (scripts/image-test.sh),
# and stops what it started.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
source scripts/lib/pg.sh
source scripts/lib/s3peers.sh
source scripts/lib/ha.sh
source scripts/lib/units.sh
source scripts/lib/docker.sh
source scripts/lib/vmemu.sh

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/berth-target}
export SQLX_OFFLINE=true
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}

command -v cargo >/dev/null || { echo "cargo is required (https://rustup.rs)" >&2; exit 1; }
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "installing cargo-nextest..." >&2
  cargo install --locked cargo-nextest
fi

workdir=$(mktemp -d /tmp/berth-test.XXXXXX)
chmod 755 "$workdir"
cleanup() {
  vmemu_stop "$workdir"
  s3peers_stop "$workdir/s3"
  pg_stop "$workdir/pg"
  rm -rf "$workdir"
}
trap cleanup EXIT

if [ -n "${BERTH_TEST_DATABASE_URL:-}" ]; then
  export DATABASE_URL=$BERTH_TEST_DATABASE_URL
else
  pg_ensure_installed
  PG_EXTRA_OPTS="-c fsync=off -c synchronous_commit=off -c full_page_writes=off" pg_start "$workdir/pg"
  export DATABASE_URL=$PG_URL
fi
echo "test Postgres: 127.0.0.1:${PG_PORT:-external}" >&2

# etcd and Patroni for the ha plan's local engine (its tests start clusters of their own).
ha_ensure_installed

# S3 peers for the s3 engine's tests: moto (AWS S3 + IAM) and SeaweedFS (S3-compatible, with IAM).
s3peers_ensure_installed
moto_start "$workdir/s3"
weed_start "$workdir/s3"
echo "test moto: $BERTH_TEST_MOTO_URL, SeaweedFS: $BERTH_TEST_S3_COMPAT_URL" >&2

# The VM emulator beside moto: instances in VPCs tagged berth:vm-emulator boot as systemd containers on a private
# Docker engine (docs/vm-emulator.md); the image is baked once and cached.
vmemu_start "$workdir"
echo "test VM emulator: $BERTH_TEST_VM_IMAGE on $BERTH_TEST_VM_DOCKER_HOST (log: $BERTH_TEST_VM_STATE_DIR/emulator.log)" >&2

# One style and no lint warnings, checked before anything is built for the tests.
cargo fmt --all --check
cargo clippy --locked --workspace --all-targets -- -D warnings

# The end-to-end suite starts the real binaries, so build them first.
cargo build --locked --workspace --bins

# The systemd units (deploy/systemd), checked against the binaries just built.
units_verify "$CARGO_TARGET_DIR/debug"

cargo nextest run --locked --workspace --no-fail-fast "$@"

# The container image, built from the Dockerfile with these binaries and smoke-tested against the test Postgres.
# Skipped when its inputs match a passing run (BERTH_IMAGE_TEST=always|never|auto, docs/deploy.md), and on a
# filtered run (arguments given) unless BERTH_IMAGE_TEST=always.
if [ $# -gt 0 ] && [ "${BERTH_IMAGE_TEST:-auto}" != always ]; then
  echo "image test: SKIPPED (a filtered run; BERTH_IMAGE_TEST=always runs it too)"
else
  BERTH_TEST_DATABASE_URL=$DATABASE_URL ./scripts/image-test.sh
fi
