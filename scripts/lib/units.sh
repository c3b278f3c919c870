# Checks the systemd units in deploy/systemd with `systemd-analyze verify`. Source this file.
# units_verify BIN_DIR: verifies copies of the units whose ExecStart points at BIN_DIR (verify wants the programs
#   to exist), treating every warning as a failure (verify exits 0 on an unknown key: a misspelt hardening
#   directive would pass). First proves that a deliberately broken unit fails the same check.

units_ensure_installed() {
  command -v systemd-analyze >/dev/null && return
  echo "installing systemd (for systemd-analyze)..." >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd >/dev/null
}

# _units_check DIR UNIT: verify UNIT in DIR; fails on a non-zero exit or on any message.
_units_check() {
  local out
  out=$(cd "$1" && SYSTEMD_LOG_COLOR=0 systemd-analyze verify --man=no "./$2" 2>&1) || {
    printf '%s\n' "$out" >&2
    return 1
  }
  if [ -n "$out" ]; then
    printf '%s\n' "$out" >&2
    return 1
  fi
}

_units_copy() { # SRC_DIR BIN_DIR DEST_DIR
  mkdir -p "$3"
  local f
  for f in "$1"/*.service; do
    sed "s#/usr/local/bin/#$2/#g" "$f" >"$3/$(basename "$f")"
  done
}

units_verify() {
  local bin_dir=$1 tmp unit
  units_ensure_installed
  tmp=$(mktemp -d /tmp/berth-units.XXXXXX)
  _units_copy deploy/systemd "$bin_dir" "$tmp/good"
  # The check must be able to fail: a misspelt directive and a missing program, each alone.
  _units_copy deploy/systemd "$bin_dir" "$tmp/misspelt"
  sed -i 's/^NoNewPrivileges=/NoNewPrivilege=/' "$tmp/misspelt/berth-api.service"
  _units_copy deploy/systemd "$bin_dir/missing" "$tmp/missing"
  if _units_check "$tmp/misspelt" berth-api.service 2>/dev/null \
    || _units_check "$tmp/missing" berth-worker@1.service 2>/dev/null; then
    echo "systemd units: the check passed a broken unit" >&2
    rm -rf "$tmp"
    return 1
  fi
  for unit in berth-api.service berth-worker@1.service berth-worker@2.service; do
    _units_check "$tmp/good" "$unit" || {
      echo "systemd units: $unit failed systemd-analyze verify" >&2
      rm -rf "$tmp"
      return 1
    }
  done
  rm -rf "$tmp"
  echo "systemd units: berth-api.service and berth-worker@.service pass systemd-analyze verify" >&2
}
