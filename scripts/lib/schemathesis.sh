# Shell helper for the OpenAPI test (source this file):
# schemathesis_ensure_installed: schemathesis (PyPI, pinned) in a virtualenv of its own, kept outside the clone
#   and keyed by the version (/var/tmp/berth-venv-schemathesis-<version>), so it is installed once per machine
#   and a new pin gets a fresh one; exports BERTH_TEST_SCHEMATHESIS, the path of its `schemathesis` command.

SCHEMATHESIS_VERSION=4.32.5

schemathesis_ensure_installed() {
  local venv=${BERTH_SCHEMATHESIS_VENV:-/var/tmp/berth-venv-schemathesis-$SCHEMATHESIS_VERSION}
  # The marker is written last: a half-made venv (an install cut short) is made again.
  if [ ! -e "$venv/.installed" ]; then
    echo "installing schemathesis $SCHEMATHESIS_VERSION into $venv (pip)..." >&2
    rm -rf "$venv"
    # Debian's python3 makes virtualenvs only with python3-venv.
    if ! python3 -c 'import ensurepip' 2>/dev/null; then
      echo "installing python3-venv (apt-get)..." >&2
      apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
    fi
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install -q "schemathesis==$SCHEMATHESIS_VERSION" >&2
    touch "$venv/.installed"
  fi
  export BERTH_TEST_SCHEMATHESIS=$venv/bin/schemathesis
}
