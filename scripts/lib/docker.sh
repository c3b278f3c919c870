# Shell helpers for a private Docker engine (the image test and the VM emulator). Source this file.
# docker_ensure_installed: installs Debian's docker.io and debootstrap when dockerd or debootstrap is missing.
# docker_start DIR: a dockerd of its own (no iptables, no default bridge) with its data, state, pid file and socket
#   under DIR; exports DOCKER_HOST. Takes DIR's lock first (one user of DIR at a time; waits up to 10 min). Sets
#   DOCKER_STARTED_PID when it started one (an engine already answering on DIR's socket is used as it is).
# docker_stop: stops the dockerd docker_start started (nothing when it found one running).
# docker_base_image WORKDIR: the Debian bookworm minbase image (debootstrap + docker import), made once per engine
#   and recipe; prints its name (berth-base:bookworm-<recipe hash>).

docker_ensure_installed() {
  if command -v dockerd >/dev/null && command -v debootstrap >/dev/null; then return; fi
  echo "installing docker.io and debootstrap (apt-get)..." >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=600 update -qq \
    && apt-get -o DPkg::Lock::Timeout=600 install -y -qq docker.io debootstrap >/dev/null
  command -v dockerd >/dev/null && command -v debootstrap >/dev/null \
    || { echo "dockerd or debootstrap still not found after apt-get install docker.io debootstrap" >&2; return 1; }
}

DOCKER_STARTED_PID=
docker_start() {
  local dir=$1
  mkdir -p "$dir"
  export DOCKER_HOST=unix://$dir/docker.sock
  export DOCKER_BUILDKIT=0
  # The lock lives as long as this shell (fd 9 stays open): a second user of DIR waits here.
  exec 9>"$dir/lock"
  flock -w 600 9 || { echo "another run holds $dir/lock" >&2; return 1; }
  if docker version >/dev/null 2>&1; then return 0; fi
  rm -f "$dir/docker.sock"
  setsid dockerd --iptables=false --bridge=none --data-root "$dir/data" --exec-root "$dir/exec" \
    --pidfile "$dir/dockerd.pid" -H "$DOCKER_HOST" >"$dir/dockerd.log" 2>&1 9>&- &
  DOCKER_STARTED_PID=$!
  local _
  for _ in $(seq 1 150); do docker version >/dev/null 2>&1 && return 0; sleep 0.2; done
  tail -n 20 "$dir/dockerd.log" >&2
  echo "dockerd did not start (DOCKER_HOST=$DOCKER_HOST)" >&2
  return 1
}

docker_stop() {
  [ -n "$DOCKER_STARTED_PID" ] || return 0
  local _
  kill -TERM "$DOCKER_STARTED_PID" 2>/dev/null || true
  for _ in $(seq 1 100); do kill -0 "$DOCKER_STARTED_PID" 2>/dev/null || break; sleep 0.2; done
  DOCKER_STARTED_PID=
}

_docker_mirror=http://deb.debian.org/debian
# _docker_make_base ROOTFS LOG: a Debian bookworm minbase tree, shaped like debian:bookworm-slim (updates and
# security sources, no docs, man pages or locales from later installs).
_docker_make_base() {
  local rootfs=$1 log=$2
  debootstrap --variant=minbase bookworm "$rootfs" "$_docker_mirror" >"$log" 2>&1 \
    || { tail -n 30 "$log" >&2; echo "debootstrap failed" >&2; return 1; }
  cat >"$rootfs/etc/apt/sources.list" <<EOF
deb $_docker_mirror bookworm main
deb $_docker_mirror bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
EOF
  cat >"$rootfs/etc/dpkg/dpkg.cfg.d/slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
EOF
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb
}

docker_base_image() {
  local work=$1 base t0
  # Named after its recipe (the function's text and the mirror): a changed recipe makes a new base.
  base=berth-base:bookworm-$({ declare -f _docker_make_base; echo "$_docker_mirror"; } | sha256sum | cut -c1-12)
  if docker image inspect "$base" >/dev/null 2>&1; then
    echo "base image $base cached" >&2
    echo "$base"
    return 0
  fi
  echo "making the base image $base (debootstrap)..." >&2
  t0=$(date +%s%N)
  local rootfs=$work/rootfs.partial
  rm -rf "$rootfs"
  _docker_make_base "$rootfs" "$work/debootstrap.log" || return 1
  tar -C "$rootfs" -c . | docker import - "$base" >/dev/null || return 1
  rm -rf "$rootfs"
  echo "base image made in $(( ($(date +%s%N) - t0) / 1000000 )) ms" >&2
  # Older bases are untagged (their layers go with the next prune, once no image uses them).
  docker images --format '{{.Repository}}:{{.Tag}}' berth-base | grep -vxF "$base" | xargs -r docker rmi >/dev/null 2>&1 || true
  echo "$base"
}
