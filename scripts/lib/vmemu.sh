# Shell helpers for the VM emulator (scripts/vm-emulator, docs/vm-emulator.md). Source this file after docker.sh.
# vmemu_start DIR: a private dockerd (BERTH_VM_DOCKER_DIR, default /var/tmp/berth-vm-docker), the VM image (baked
#   once, cached in BERTH_VM_CACHE_DIR, default /var/tmp/berth-vm-cache), and the emulator following moto
#   (BERTH_TEST_MOTO_URL and its keys, from moto_start); its state, logs and volume files under DIR/vm. Exports
#   BERTH_TEST_VM_EMULATOR=1, BERTH_TEST_VM_DOCKER_HOST, BERTH_TEST_VM_STATE_DIR, BERTH_TEST_VM_LOOP_DIR,
#   BERTH_TEST_VM_NAME and BERTH_TEST_VM_IMAGE for the tests.
# vmemu_stop DIR: stops the emulator (which removes its containers, networks and loop devices), then the dockerd
#   vmemu_start started.
# Two emulators at once (parallel runs) need different BERTH_VM_DOCKER_DIRs; BERTH_VM_NAME (default berthvm) names
# their containers and networks, BERTH_VM_LOOP_DIR holds the volume files (default DIR/vm/volumes).

_vmemu_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

# vmemu_image WORKDIR: prints the VM image's name, berth-vm:<hash of its inputs>; loads it from the cache or bakes
# it (and caches it) when the engine lacks it.
vmemu_image() {
  local work=$1 base hash image cache t0
  base=$(docker_base_image "$work") || return 1
  hash=$({ echo "$base"; cd "$_vmemu_root" && find scripts/vm-emulator -type f ! -name '*.py' | sort | xargs sha256sum; } \
    | sha256sum | cut -c1-16)
  image=berth-vm:$hash
  cache=${BERTH_VM_CACHE_DIR:-/var/tmp/berth-vm-cache}
  if docker image inspect "$image" >/dev/null 2>&1; then
    echo "VM image $image cached in the engine" >&2
  elif [ -f "$cache/$hash.tar" ]; then
    t0=$(date +%s%N)
    docker load -i "$cache/$hash.tar" >/dev/null || return 1
    echo "VM image $image loaded from $cache in $(( ($(date +%s%N) - t0) / 1000000 )) ms" >&2
  else
    echo "baking the VM image $image (PostgreSQL 15, etcd, Patroni, cloud-init, systemd)..." >&2
    t0=$(date +%s%N)
    # The build context: the emulator's folder and the Patroni wheel the Dockerfile names, fetched here (the
    # image's own pip would not trust this machine's certificate authorities).
    local context=$work/vm-image-context patroni
    rm -rf "$context" && cp -r "$_vmemu_root/scripts/vm-emulator" "$context" || return 1
    patroni=$(sed -n 's/^ARG PATRONI_VERSION=//p' "$context/Dockerfile")
    python3 -m pip download --quiet --no-deps --only-binary :all: -d "$context" "patroni==$patroni" >&2 || return 1
    docker build --network host --build-arg BASE_IMAGE="$base" -t "$image" "$context" \
      >"$work/vm-image-build.log" 2>&1 || { tail -n 30 "$work/vm-image-build.log" >&2; return 1; }
    rm -rf "$context"
    echo "VM image $image baked in $(( ($(date +%s%N) - t0) / 1000000 )) ms" >&2
    mkdir -p "$cache"
    docker save -o "$cache/$hash.tar.partial" "$image" && mv "$cache/$hash.tar.partial" "$cache/$hash.tar"
    # Older images go: one VM image per engine and cache.
    find "$cache" -name '*.tar' ! -name "$hash.tar" -delete
    docker images --format '{{.Repository}}:{{.Tag}}' berth-vm | grep -vxF "$image" | xargs -r docker rmi >/dev/null 2>&1 || true
  fi
  echo "$image"
}

vmemu_start() {
  local dir=$1/vm image _
  : "${BERTH_TEST_MOTO_URL:?vmemu_start needs moto (moto_start)}"
  mkdir -p "$dir"
  docker_ensure_installed || return 1
  docker_start "${BERTH_VM_DOCKER_DIR:-/var/tmp/berth-vm-docker}" || return 1
  echo "$DOCKER_STARTED_PID" >"$dir/dockerd.pid"
  image=$(vmemu_image "$dir") || return 1
  export BERTH_TEST_VM_NAME=${BERTH_VM_NAME:-berthvm}
  export BERTH_TEST_VM_STATE_DIR=$dir
  export BERTH_TEST_VM_LOOP_DIR=${BERTH_VM_LOOP_DIR:-$dir/volumes}
  export BERTH_TEST_VM_DOCKER_HOST=$DOCKER_HOST
  export BERTH_TEST_VM_IMAGE=$image
  rm -f "$dir/ready"
  BERTH_VM_MOTO_URL=$BERTH_TEST_MOTO_URL BERTH_VM_AWS_ACCESS_KEY_ID=$BERTH_TEST_MOTO_ACCESS_KEY \
    BERTH_VM_AWS_SECRET_ACCESS_KEY=$BERTH_TEST_MOTO_SECRET_KEY BERTH_VM_IMAGE=$image \
    BERTH_VM_NAME=$BERTH_TEST_VM_NAME BERTH_VM_STATE_DIR=$dir BERTH_VM_LOOP_DIR=$BERTH_TEST_VM_LOOP_DIR \
    setsid python3 "$_vmemu_root/scripts/vm-emulator/emulator.py" >"$dir/emulator.log" 2>&1 9>&- &
  echo $! >"$dir/emulator.pid"
  for _ in $(seq 1 300); do [ -f "$dir/ready" ] && break; sleep 0.1; done
  [ -f "$dir/ready" ] || { tail -n 20 "$dir/emulator.log" >&2; echo "the VM emulator did not start" >&2; return 1; }
  export BERTH_TEST_VM_EMULATOR=1
}

vmemu_stop() {
  local dir=$1/vm pid _
  if [ -f "$dir/emulator.pid" ]; then
    pid=$(cat "$dir/emulator.pid")
    # It removes its containers, networks and loop devices on SIGTERM; a stuck one is killed after 60 s.
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 600); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    rm -f "$dir/emulator.pid"
  fi
  # Loop devices over its volume files, should it have been killed before removing them.
  if [ -n "${BERTH_TEST_VM_LOOP_DIR:-}" ]; then
    losetup --list --noheadings --output NAME,BACK-FILE 2>/dev/null \
      | awk -v d="$BERTH_TEST_VM_LOOP_DIR/" 'index($2, d) == 1 { print $1 }' | xargs -r -n1 losetup -d 2>/dev/null || true
  fi
  docker_stop
}
