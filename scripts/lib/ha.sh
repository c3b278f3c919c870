# Shell helpers for the ha plan's local engine (tests and benchmarks). Source this file.
# ha_ensure_installed: installs Debian's etcd, etcdctl and Patroni when `etcd`, `etcdctl` or `patroni` is
# missing (etcdctl: the ha_ec2 engine's membership script is tested against local etcd processes).

ha_ensure_installed() {
  if command -v etcd >/dev/null && command -v etcdctl >/dev/null && command -v patroni >/dev/null; then return; fi
  echo "installing etcd, etcdctl and Patroni (apt-get)..." >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq etcd-server etcd-client patroni >/dev/null
  command -v etcd >/dev/null && command -v etcdctl >/dev/null && command -v patroni >/dev/null \
    || { echo "etcd, etcdctl or patroni still not found after apt-get install etcd-server etcd-client patroni" >&2; exit 1; }
}
