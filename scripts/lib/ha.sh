# Shell helpers for the ha plan's local engine (tests and benchmarks). Source this file.
# ha_ensure_installed: installs Debian's etcd and Patroni when `etcd` or `patroni` is missing.

ha_ensure_installed() {
  if command -v etcd >/dev/null && command -v patroni >/dev/null; then return; fi
  echo "installing etcd and Patroni (apt-get)..." >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq etcd-server patroni >/dev/null
  command -v etcd >/dev/null && command -v patroni >/dev/null \
    || { echo "etcd or patroni still not found after apt-get install etcd-server patroni" >&2; exit 1; }
}
