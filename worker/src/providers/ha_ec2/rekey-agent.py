#!/usr/bin/python3
# berth's re-key agent (docs/pools.md): when a pooled cluster is taken, berth writes a nonce into the primary's
# berth.rekey table (it reaches every member through WAL) and sets the roles' new passwords in the same
# transaction. Each member derives the same passwords from that nonce and its re-key key (written by cloud-init,
# readable by root only), writes them into Patroni's configuration and reloads Patroni. Neither the key nor the
# nonce alone gives a password. Never prints one.
#
#   berth-rekey            poll the local PostgreSQL every second, apply each new nonce once
#   berth-rekey derive N   print the derived passwords for nonce N as JSON (berth's tests compare them)
import base64
import hashlib
import hmac
import json
import os
import ssl
import subprocess
import sys
import time
import urllib.request

KEY_FILE = "/etc/berth/rekey.key"
CONFIG = "/etc/berth/patroni.yml"
APPLIED = "/etc/berth/rekey.applied"
CA = "/etc/berth/tls/ca.crt"
LABEL = b"berth-rekey-v1"
ROLES = ("superuser", "replication", "rewind", "restapi")


def derive(key, nonce):
    """The new password of each role: hex(HMAC-SHA256(key, label 0 nonce 0 role))."""
    return {
        role: hmac.new(key, LABEL + b"\0" + nonce.encode() + b"\0" + role.encode(), hashlib.sha256).hexdigest()
        for role in ROLES
    }


def read_key():
    with open(KEY_FILE) as f:
        return bytes.fromhex(f.read().strip())


# Until a take, the table does not exist (clusters that were never pooled never get it): looked up first, so that
# the server does not log an error every second.
NONCE_QUERY = """SELECT to_regclass('berth.rekey') IS NOT NULL AS present \\gset
\\if :present
SELECT nonce FROM berth.rekey WHERE id = 1;
\\endif
"""


def current_nonce():
    """The nonce in the local PostgreSQL (a replica has it once it replayed the commit); None when there is none."""
    try:
        out = subprocess.run(
            ["runuser", "-u", "postgres", "--", "psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
             "-h", "/var/run/postgresql", "-d", "postgres", "-f", "-"],
            input=NONCE_QUERY, capture_output=True, text=True, timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    nonce = out.stdout.strip()
    return nonce if out.returncode == 0 and nonce.isalnum() else None


def applied_nonce():
    try:
        with open(APPLIED) as f:
            return f.read().strip()
    except FileNotFoundError:
        return None


def write_atomically(path, text, uid, gid):
    tmp = path + ".rekey-tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchown(fd, uid, gid)
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    dir_fd = os.open(os.path.dirname(path), os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def wake(config, password):
    """Patroni reloads its configuration at its next loop; a no-op PATCH of the cluster's settings (with the REST
    API password it still has) wakes it now. Best effort."""
    address = config.get("restapi", {}).get("connect_address")
    if not address:
        return
    request = urllib.request.Request(
        "https://%s/config" % address, data=b'{"postgresql":{}}', method="PATCH",
        headers={"Content-Type": "application/json"},
    )
    user = config["restapi"]["authentication"]["username"]
    token = ("%s:%s" % (user, password)).encode()
    request.add_header("Authorization", "Basic " + base64.b64encode(token).decode())
    try:
        urllib.request.urlopen(request, context=ssl.create_default_context(cafile=CA), timeout=3).read()
    except Exception:
        pass


def apply(nonce):
    passwords = derive(read_key(), nonce)
    with open(CONFIG) as f:
        text = f.read()
    try:
        config = json.loads(text)
    except ValueError:
        import yaml
        config = yaml.safe_load(text)
    auth = config["postgresql"]["authentication"]
    old_restapi = config["restapi"]["authentication"]["password"]
    wanted = [
        (auth["superuser"], passwords["superuser"]),
        (auth["replication"], passwords["replication"]),
        (auth["rewind"], passwords["rewind"]),
        (config["restapi"]["authentication"], passwords["restapi"]),
    ]
    if any(section["password"] != password for section, password in wanted):
        for section, password in wanted:
            section["password"] = password
        st = os.stat(CONFIG)
        write_atomically(CONFIG, json.dumps(config, indent=2), st.st_uid, st.st_gid)
        subprocess.run(["systemctl", "reload", "berth-patroni"], capture_output=True, timeout=30)
        wake(config, old_restapi)
        print("re-key %s applied to Patroni's configuration" % hashlib.sha256(nonce.encode()).hexdigest()[:12])
    write_atomically(APPLIED, nonce, 0, 0)


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "derive":
        print(json.dumps(derive(bytes.fromhex(sys.stdin.read().strip()), sys.argv[2])))
        return
    sys.stdout.reconfigure(line_buffering=True)
    while True:
        nonce = current_nonce()
        if nonce and nonce != applied_nonce():
            try:
                apply(nonce)
            except Exception as e:
                # The message names files and steps, never a password.
                print("re-key not applied yet: %s" % type(e).__name__, file=sys.stderr)
        time.sleep(1)


if __name__ == "__main__":
    main()
