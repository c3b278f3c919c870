#!/usr/bin/env bash
# Refreshes .sqlx/ (the offline query data CI compiles against) from a live database with the migrations
# applied. Run after adding or changing a query.
#   DATABASE_URL=postgres://postgres@127.0.0.1/berth_dev scripts/sqlx-prepare.sh
set -euo pipefail
cd "$(dirname "$0")/.."
: "${DATABASE_URL:?set DATABASE_URL to a database for query checking}"
psql "$DATABASE_URL" -q -v ON_ERROR_STOP=1 -c 'DROP SCHEMA public CASCADE; CREATE SCHEMA public;'
for f in migrations/*.sql; do psql "$DATABASE_URL" -q -v ON_ERROR_STOP=1 -f "$f"; done
rm -rf .sqlx && mkdir .sqlx
# Touch the crates that hold queries so the macros run again and write every query they check.
touch broker/src/lib.rs api/src/lib.rs worker/src/lib.rs tests/src/lib.rs
SQLX_OFFLINE=false cargo check --workspace --all-targets
echo "$(ls .sqlx | wc -l) queries in .sqlx/"
