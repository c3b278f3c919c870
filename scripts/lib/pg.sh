# Shell helpers for a throwaway Postgres server (tests and benchmarks). Source this file.
# pg_ensure_installed: installs Debian's PostgreSQL when no server binaries are found.
# pg_start DIR: initdb + start on a free 127.0.0.1 port; sets PG_URL (superuser with a password) and PG_PORT.
# pg_stop DIR: fast shutdown.

pg_bin_dir() {
  if [ -n "${PG_BIN_DIR:-}" ]; then echo "$PG_BIN_DIR"; return; fi
  local d
  d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  if [ -n "$d" ] && [ -x "$d/initdb" ]; then echo "$d"; return; fi
  if command -v pg_config >/dev/null && [ -x "$(pg_config --bindir)/initdb" ]; then pg_config --bindir; return; fi
  return 1
}

pg_ensure_installed() {
  if pg_bin_dir >/dev/null; then return; fi
  echo "installing PostgreSQL (apt-get)..." >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq postgresql postgresql-contrib >/dev/null
  pg_bin_dir >/dev/null || { echo "PostgreSQL server binaries still not found" >&2; exit 1; }
}

# Postgres refuses to run as root: run its commands as the postgres OS user then.
_pg_run() {
  if [ "$(id -u)" = 0 ]; then runuser -u "${BERTH_PG_OS_USER:-postgres}" -- "$@"; else "$@"; fi
}

_free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

pg_start() {
  local dir=$1 bin password
  bin=$(pg_bin_dir)
  mkdir -p "$dir"
  password=$(head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9')
  printf '%s' "$password" > "$dir/pwfile"
  if [ "$(id -u)" = 0 ]; then chown -R "${BERTH_PG_OS_USER:-postgres}" "$dir"; fi
  _pg_run "$bin/initdb" -D "$dir/data" -U postgres --pwfile="$dir/pwfile" --auth-host=scram-sha-256 \
    --auth-local=trust --encoding=UTF8 --locale=C >"$dir/initdb.log" 2>&1 \
    || { cat "$dir/initdb.log" >&2; return 1; }
  PG_PORT=$(_free_port)
  # Tests and benchmarks want speed over durability except where a benchmark says otherwise.
  _pg_run "$bin/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -w -t 60 start \
    -o "-p $PG_PORT -c listen_addresses=127.0.0.1 -c unix_socket_directories=$dir/data -c max_connections=400 ${PG_EXTRA_OPTS:-}" \
    >/dev/null || { tail -n 30 "$dir/postgres.log" >&2; return 1; }
  PG_URL="postgres://postgres:$password@127.0.0.1:$PG_PORT/postgres"
  export PG_URL PG_PORT
}

pg_stop() {
  local dir=$1
  [ -d "$dir/data" ] || return 0
  _pg_run "$(pg_bin_dir)/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null 2>&1 || true
}
