#!/usr/bin/env bash
# The container image test: builds the image from the repo's Dockerfile, fed with the host's binaries from
# $CARGO_TARGET_DIR/debug (BIN_DIR), and smoke-tests it: berth-api and berth-worker from the image, as its non-root
# user, against a Postgres on the host; `shared` and `dedicated` (local engine) lifecycles through the API; then
# both are stopped with SIGTERM and must exit 0 in time.
#
# Runs a private Docker engine (Debian's docker.io, no iptables, no bridge; scripts/lib/docker.sh) with its data under
# $BERTH_DOCKER_DIR (default /var/tmp/berth-docker, so the base image and the layer cache survive between runs) and
# stops it at exit. The base image is made once with debootstrap (no registry needed).
#
# Then the systemd units from deploy/systemd run under systemd (a container whose PID 1 is systemd) the same way.
#
# Cached: skipped when its inputs (the Dockerfile, .dockerignore, this script, deploy/, Cargo.lock, the crates, plans/,
# migrations/) match a previous passing run recorded in $BERTH_IMAGE_CACHE_DIR (default /var/tmp/berth-image-cache).
# BERTH_IMAGE_TEST=always forces it, never skips it, auto (default) decides by the inputs.
# Postgres: BERTH_TEST_DATABASE_URL (a superuser URL, as scripts/test.sh passes), else a private one started here.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/pg.sh
source scripts/lib/docker.sh

mode=${BERTH_IMAGE_TEST:-auto}
case $mode in
  always | never | auto) ;;
  *) echo "BERTH_IMAGE_TEST must be always, never or auto (got '$mode')" >&2; exit 2 ;;
esac
if [ "$mode" = never ]; then
  echo "image test: SKIPPED (BERTH_IMAGE_TEST=never)"
  exit 0
fi

cache_dir=${BERTH_IMAGE_CACHE_DIR:-/var/tmp/berth-image-cache}
docker_dir=${BERTH_DOCKER_DIR:-/var/tmp/berth-docker}
target_dir=${CARGO_TARGET_DIR:-/var/tmp/berth-target}
bin_dir=$target_dir/debug
image=berth:image-test
uid=10001 # the image's user (Dockerfile: BERTH_UID)

# What the image and the test are made of. Working-tree contents (not only the index), so an uncommitted edit
# counts; untracked files that git would add count too.
inputs_hash() {
  git ls-files -z -co --exclude-standard -- Dockerfile .dockerignore scripts/image-test.sh scripts/lib/pg.sh scripts/lib/docker.sh deploy \
    Cargo.toml Cargo.lock .cargo .sqlx api broker worker cli plans migrations \
    | sort -z | xargs -0 sha256sum | sha256sum | cut -c1-32
}
inputs=$(inputs_hash)
stamp=$cache_dir/passed-$inputs
if [ "$mode" = auto ] && [ -f "$stamp" ]; then
  echo "image test: SKIPPED: its inputs (Dockerfile, .dockerignore, scripts/image-test.sh, deploy/, sources, plans/,"
  echo "  migrations/; hash $inputs) are those of a run that passed on $(cat "$stamp")."
  echo "  BERTH_IMAGE_TEST=always runs it anyway."
  exit 0
fi
echo "image test: running (BERTH_IMAGE_TEST=$mode, inputs $inputs)"

for bin in berth-api berth-worker berth; do
  [ -x "$bin_dir/$bin" ] || {
    echo "image test: $bin_dir/$bin is missing: run cargo build --workspace --bins first" >&2
    exit 1
  }
done

docker_ensure_installed

work=$(mktemp -d /tmp/berth-image-test.XXXXXX)
chmod 755 "$work"
containers=()
db_to_drop=
cleanup() {
  local rc=$?
  for c in "${containers[@]}"; do docker rm -f "$c" >/dev/null 2>&1 || true; done
  if [ -n "$db_to_drop" ]; then
    psql_host "$admin_url" -c "DROP DATABASE IF EXISTS \"$db_to_drop\" WITH (FORCE)" >/dev/null 2>&1 || true
  fi
  docker_stop
  pg_stop "$work/pg"
  rm -rf "$work"
  exit "$rc"
}
trap cleanup EXIT

elapsed() { echo $(( $(date +%s%N) / 1000000 - $1 )); }
now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
fail() { echo "image test: FAILED: $*" >&2; exit 1; }

# --- the engine --------------------------------------------------------------------------------------------------
mkdir -p "$cache_dir"
docker_start "$docker_dir" || fail "no Docker engine"

# --- the base image: Debian bookworm minbase, made once ---------------------------------------------------------
base=$(docker_base_image "$work") || fail "making the base image"

# --- the image -------------------------------------------------------------------------------------------------
# The context is a tar: the Dockerfile, .dockerignore, plans/ and the host's binaries as host-bin/ (no copy in
# the clone). Same Dockerfile and final stage as `docker build .`: BIN_DIR makes its `binaries` stage take these
# instead of compiling, so that stage runs on the base image and needs no Rust image.
ctx=$work/context.tar
tar -cf "$ctx" Dockerfile .dockerignore plans
tar -rf "$ctx" --transform 's,^,host-bin/,' -C "$bin_dir" berth-api berth-worker berth
echo "image test: building $image (debug binaries from $bin_dir)..."
t0=$(now_ms)
docker build --network host --build-arg BASE_IMAGE="$base" --build-arg BUILD_IMAGE="$base" --build-arg BIN_DIR=host-bin \
  -t "$image" - <"$ctx" >"$work/build.log" 2>&1 || { tail -n 40 "$work/build.log" >&2; fail "docker build"; }
build_ms=$(elapsed "$t0")
size=$(docker image inspect -f '{{.Size}}' "$image")
docker image prune -f >/dev/null 2>&1 || true

# --- smoke test ------------------------------------------------------------------------------------------------
t_smoke=$(now_ms)
[ "$(docker image inspect -f '{{.Config.User}}' "$image")" = "$uid:$uid" ] || fail "the image's USER is not $uid"

psql_host() { "$(pg_bin_dir)/psql" -X -v ON_ERROR_STOP=1 -q -t -A "$@"; }
if [ -n "${BERTH_TEST_DATABASE_URL:-}" ]; then
  admin_url=$BERTH_TEST_DATABASE_URL
else
  pg_ensure_installed
  pg_start "$work/pg"
  admin_url=$PG_URL
fi
# The broker's own database: a fresh one on that server, dropped at exit.
db_to_drop=berth_image_test_$(head -c 6 /dev/urandom | od -An -tx1 | tr -d ' \n')
psql_host "$admin_url" -c "CREATE DATABASE \"$db_to_drop\""
broker_url=$(python3 -c 'import sys, urllib.parse as u; p = u.urlsplit(sys.argv[1]); print(u.urlunsplit(p._replace(path="/" + sys.argv[2])))' "$admin_url" "$db_to_drop")
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
user="image-test"
password=$(head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9')

# Keys and settings as an operator would hand them over: a key file in a volume, secrets in an env file.
mkdir -p "$work/keys" "$work/api-data" "$work/worker-data"
head -c 32 /dev/urandom | base64 >"$work/keys/master.key"
chmod 600 "$work/keys/master.key"
chown -R "$uid:$uid" "$work/keys" "$work/api-data" "$work/worker-data"
umask 077
cat >"$work/berth.env" <<EOF
DATABASE_URL=$broker_url
SHARED_POSTGRES_URL=$admin_url
BROKER_USERNAME=$user
BROKER_PASSWORD=$password
BERTH_KEY_FILE=/etc/berth/keys/master.key
BIND_ADDRESS=127.0.0.1
PORT=$port
NAME_PREFIX=berthimg_
LOCAL_ENGINE=on
LOCAL_ENGINE_HOST=127.0.0.1
EOF
umask 022

run_container() { # NAME ARGS...: detached, host network, the key and a data folder as volumes
  local name=$1
  shift
  containers+=("$name")
  docker rm -f "$name" >/dev/null 2>&1 || true
  docker run -d --name "$name" --network host --env-file "$work/berth.env" \
    --read-only --tmpfs /tmp -v "$work/keys:/etc/berth/keys:ro" "$@" >/dev/null
}
api=berth-image-test-api-$$
worker=berth-image-test-worker-$$
run_container "$api" -v "$work/api-data:/var/lib/berth" "$image"
run_container "$worker" -v "$work/worker-data:/var/lib/berth" -e WORKER_ID=image-test-1 "$image" berth-worker

base_url=http://127.0.0.1:$port
# The broker's credentials go to curl in a file, not on its command line (where ps shows them).
printf 'user = "%s:%s"\n' "$user" "$password" >"$work/curl.conf"
chmod 600 "$work/curl.conf"
osb() { # METHOD PATH [BODY]: prints the body, then the status on the last line
  curl -sS -K "$work/curl.conf" -H 'X-Broker-API-Version: 2.17' -H 'Content-Type: application/json' \
    -X "$1" -w '\n%{http_code}' "$base_url$2" ${3:+--data "$3"}
}
status_of() { tail -n 1 <<<"$1"; }
body_of() { sed '$d' <<<"$1"; }
json() { python3 -c 'import json, sys; v = json.load(sys.stdin)
for k in sys.argv[1:]: v = v[int(k)] if isinstance(v, list) else v[k]
print(v)' "$@"; }
show_logs() {
  echo "--- api logs" >&2; docker logs --tail 40 "$api" >&2 2>&1 || true
  echo "--- worker logs" >&2; docker logs --tail 40 "$worker" >&2 2>&1 || true
}
logs_and_fail() {
  show_logs
  fail "$*"
}

wait_for_api() { # sets catalog
  local r
  for _ in $(seq 1 300); do
    if r=$(osb GET /v2/catalog 2>/dev/null) && [ "$(status_of "$r")" = 200 ]; then
      catalog=$(body_of "$r")
      return 0
    fi
    sleep 0.2
  done
  logs_and_fail "the API did not answer /v2/catalog within 60 s"
}
wait_for_api
for c in "$api" "$worker"; do
  uids=$(docker top "$c" -eo pid,uid,comm | awk 'NR > 1 && $3 ~ /^berth/ {print $2}' | sort -u)
  [ "$uids" = "$uid" ] || logs_and_fail "$c runs berth as uid '${uids:-none}', not $uid"
done

wait_succeeded() { # PATH: polls a last_operation until it succeeded (60 s)
  local r state
  for _ in $(seq 1 300); do
    r=$(osb GET "$1")
    state=$(body_of "$r" | json state 2>/dev/null || true)
    case $state in
      succeeded) return 0 ;;
      failed) logs_and_fail "$1: $(body_of "$r")" ;;
    esac
    sleep 0.2
  done
  logs_and_fail "$1 did not succeed within 60 s (last: $(body_of "$r"))"
}

wait_gone() { # PATH: polls the last_operation of a deletion until it succeeded or the resource is gone (410)
  local r
  for _ in $(seq 1 300); do
    r=$(osb GET "$1")
    [ "$(status_of "$r")" = 410 ] && return 0
    case $(body_of "$r" | json state 2>/dev/null || true) in
      succeeded) return 0 ;;
      failed) logs_and_fail "$1: $(body_of "$r")" ;;
    esac
    sleep 0.2
  done
  logs_and_fail "$1 did not finish within 60 s (last: $(status_of "$r") $(body_of "$r"))"
}

# lifecycle PLAN: provision, bind, use the binding's DATABASE_URL from the host, unbind, deprovision.
lifecycle() {
  local plan=$1 service_id plan_id instance binding r app_url answer t0
  t0=$(now_ms)
  read -r service_id plan_id < <(python3 -c 'import json, sys
for s in json.load(sys.stdin)["services"]:
    for p in s["plans"]:
        if s["name"] == "postgres" and p["name"] == sys.argv[1]: print(s["id"], p["id"])' "$plan" <<<"$catalog")
  [ -n "${plan_id:-}" ] || logs_and_fail "the catalog has no postgres/$plan plan"
  instance=$(python3 -c 'import uuid; print(uuid.uuid4())')
  binding=$(python3 -c 'import uuid; print(uuid.uuid4())')
  r=$(osb PUT "/v2/service_instances/$instance?accepts_incomplete=true" \
    "{\"service_id\":\"$service_id\",\"plan_id\":\"$plan_id\",\"organization_guid\":\"org\",\"space_guid\":\"space\"}")
  case $(status_of "$r") in
    202) wait_succeeded "/v2/service_instances/$instance/last_operation" ;;
    201 | 200) ;;
    *) logs_and_fail "$plan: provision answered $(status_of "$r"): $(body_of "$r")" ;;
  esac
  r=$(osb PUT "/v2/service_instances/$instance/service_bindings/$binding?accepts_incomplete=true" \
    "{\"service_id\":\"$service_id\",\"plan_id\":\"$plan_id\"}")
  case $(status_of "$r") in
    202) wait_succeeded "/v2/service_instances/$instance/service_bindings/$binding/last_operation" ;;
    201 | 200) ;;
    *) logs_and_fail "$plan: bind answered $(status_of "$r"): $(body_of "$r")" ;;
  esac
  r=$(osb GET "/v2/service_instances/$instance/service_bindings/$binding")
  [ "$(status_of "$r")" = 200 ] || logs_and_fail "$plan: fetching the binding answered $(status_of "$r")"
  app_url=$(body_of "$r" | json credentials DATABASE_URL)
  answer=$(psql_host "$app_url" -c 'CREATE TABLE image_test (n int); INSERT INTO image_test VALUES (42); SELECT n FROM image_test')
  [ "$answer" = 42 ] || logs_and_fail "$plan: the binding's database answered '$answer', not 42"

  # Unbind and deprovision: nothing is left behind, and the credentials stop working.
  local ids="service_id=$service_id&plan_id=$plan_id"
  r=$(osb DELETE "/v2/service_instances/$instance/service_bindings/$binding?accepts_incomplete=true&$ids")
  case $(status_of "$r") in
    202) wait_gone "/v2/service_instances/$instance/service_bindings/$binding/last_operation?$ids" ;;
    200) ;;
    *) logs_and_fail "$plan: unbind answered $(status_of "$r"): $(body_of "$r")" ;;
  esac
  r=$(osb DELETE "/v2/service_instances/$instance?accepts_incomplete=true&$ids")
  case $(status_of "$r") in
    202) wait_gone "/v2/service_instances/$instance/last_operation?$ids" ;;
    200) ;;
    *) logs_and_fail "$plan: deprovision answered $(status_of "$r"): $(body_of "$r")" ;;
  esac
  if psql_host "$app_url" -c 'SELECT 1' >/dev/null 2>&1; then
    logs_and_fail "$plan: the binding still connects after deprovision"
  fi
  echo "image test: $plan: provision, bind, connect, unbind, deprovision in $(elapsed "$t0") ms"
}
# shared: a database on the host's server; dedicated (the local engine): initdb, pg_ctl and postgres in the
# worker's container, as its user, on its read-only root.
lifecycle shared
lifecycle dedicated


# SIGTERM: both stop by themselves (exit 0) well before docker would SIGKILL them.
stop_timeout=40
for c in "$api" "$worker"; do
  t0=$(now_ms)
  docker stop -t "$stop_timeout" "$c" >/dev/null
  stop_ms=$(elapsed "$t0")
  code=$(docker inspect -f '{{.State.ExitCode}}' "$c")
  [ "$code" = 0 ] || logs_and_fail "$c exited $code on SIGTERM (137 means docker had to kill it)"
  [ "$stop_ms" -lt $((stop_timeout * 1000)) ] || logs_and_fail "$c took $stop_ms ms to stop"
  echo "image test: $c stopped on SIGTERM in $stop_ms ms, exit 0"
done
smoke_ms=$(elapsed "$t_smoke")

# --- the systemd units, run by systemd ------------------------------------------------------------------------
# Installed as docs/deploy.md says (binaries in /usr/local/bin, plans in /usr/local/share/berth, the user from
# berth.sysusers.conf, /etc/berth/berth.env) in a container whose PID 1 is systemd: berth-api and two workers start
# with all their hardening, serve the same lifecycles, and `systemctl stop` ends each with status 0.
t_units=$(now_ms)
units_ctx=$work/units
mkdir -p "$units_ctx/bin"
cp deploy/systemd/* "$units_ctx/"
cp -r plans "$units_ctx/"
cp "$bin_dir/berth-api" "$bin_dir/berth-worker" "$bin_dir/berth" "$units_ctx/bin/"
cat >"$units_ctx/Dockerfile" <<EOF
FROM $base
RUN mkdir -p /etc/postgresql-common/createcluster.d \\
 && echo 'create_main_cluster = false' > /etc/postgresql-common/createcluster.d/berth.conf \\
 && apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends systemd systemd-sysv \\
      ca-certificates postgresql-15 && rm -rf /var/lib/apt/lists/* \\
 && systemctl mask systemd-logind.service getty@tty1.service console-getty.service postgresql.service
COPY bin/ /usr/local/bin/
COPY plans/ /usr/local/share/berth/plans/
COPY berth-api.service berth-worker@.service /etc/systemd/system/
COPY berth.sysusers.conf /etc/sysusers.d/berth.conf
ENTRYPOINT ["/lib/systemd/systemd"]
EOF
docker build --network host -t berth:units-test "$units_ctx" >"$work/units-build.log" 2>&1 \
  || { tail -n 30 "$work/units-build.log" >&2; fail "building the systemd test image"; }
units=berth-image-test-units-$$
containers+=("$units")
docker run -d --name "$units" --network host --cap-add SYS_ADMIN --tmpfs /run --tmpfs /run/lock --tmpfs /tmp \
  -v /sys/fs/cgroup:/sys/fs/cgroup:ro berth:units-test >/dev/null
booted=
for _ in $(seq 1 150); do
  case $(docker exec "$units" systemctl is-system-running 2>/dev/null || true) in
    running | degraded) booted=1; break ;;
  esac
  sleep 0.2
done
[ -n "$booted" ] || { docker logs --tail 30 "$units" >&2; fail "systemd did not boot in the test container"; }
show_logs() { docker exec "$units" journalctl --no-pager -n 60 -u berth-api -u 'berth-worker@*' >&2 2>&1 || true; }
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
base_url=http://127.0.0.1:$port
sed -e "s/^PORT=.*/PORT=$port/" -e 's#^BERTH_KEY_FILE=.*#BERTH_KEY_FILE=/etc/berth/master.key#' "$work/berth.env" \
  | docker exec -i "$units" sh -c 'umask 027 && mkdir -p /etc/berth && cat > /etc/berth/berth.env'
docker exec -i "$units" sh -c 'umask 077 && cat > /etc/berth/master.key' <"$work/keys/master.key"
docker exec "$units" sh -c 'chgrp berth /etc/berth /etc/berth/berth.env && chown berth: /etc/berth/master.key'
docker exec "$units" systemctl enable --now berth-api.service berth-worker@1.service berth-worker@2.service 2>/dev/null \
  || logs_and_fail "systemctl enable --now failed"
wait_for_api
lifecycle shared
lifecycle dedicated
for unit in berth-api berth-worker@1 berth-worker@2; do
  [ "$(docker exec "$units" systemctl show -p User --value "$unit")" = berth ] || logs_and_fail "$unit: not User=berth"
done
docker exec "$units" systemctl stop berth-api.service berth-worker@1.service berth-worker@2.service
for unit in berth-api berth-worker@1 berth-worker@2; do
  outcome=$(docker exec "$units" systemctl show -p Result -p ExecMainCode -p ExecMainStatus --value "$unit" | tr '\n' ' ')
  # Result success, code 1 (CLD_EXITED: it exited by itself, not killed), status 0.
  [ "$outcome" = "success 1 0 " ] || logs_and_fail "$unit stopped with '$outcome', not 'success 1 0'"
done
echo "image test: systemd units: berth-api, berth-worker@1, @2 ran hardened, served shared and dedicated, stopped with status 0 ($(elapsed "$t_units") ms)"


date -u '+%Y-%m-%dT%H:%M:%SZ' >"$stamp"
echo "image test: PASSED"
echo "image test: image $image $((size / 1000000)) MB ($size bytes, debug binaries); build ${build_ms} ms; smoke test ${smoke_ms} ms; systemd units $(elapsed "$t_units") ms"
