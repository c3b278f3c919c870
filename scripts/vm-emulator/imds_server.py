#!/usr/bin/env python3
"""An emulated VM's instance metadata service (IMDSv2), run in the VM by the VM emulator (see imds.py): a session
token from `PUT /latest/api/token`, then `GET /latest/meta-data/...` with it, from metadata.json beside this file.
Python's standard library only (the VM image has python3 for Patroni)."""

import http.server
import json
import os
import secrets
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ADDRESS = ("169.254.169.254", 80)
PREFIX = "/latest/meta-data/"
tokens = {}


def metadata():
    try:
        with open(os.path.join(HERE, "metadata.json")) as f:
            return json.load(f)
    except (FileNotFoundError, ValueError):
        return {"meta-data": {}, "tags": None}


class Handler(http.server.BaseHTTPRequestHandler):
    def answer(self, status, text=""):
        body = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_PUT(self):
        ttl = self.headers.get("X-aws-ec2-metadata-token-ttl-seconds", "")
        if self.path != "/latest/api/token" or not ttl.isdigit() or not 1 <= int(ttl) <= 21600:
            return self.answer(400)
        token = secrets.token_urlsafe(32)
        tokens[token] = time.time() + int(ttl)
        self.answer(200, token)

    def do_GET(self):
        if tokens.get(self.headers.get("X-aws-ec2-metadata-token", ""), 0) < time.time():
            return self.answer(401)
        if not self.path.startswith(PREFIX):
            return self.answer(404)
        key = self.path[len(PREFIX):].rstrip("/")
        data = metadata()
        tags = data.get("tags")
        if key == "tags/instance" and tags is not None:
            return self.answer(200, "\n".join(sorted(tags)))
        if key.startswith("tags/instance/") and tags is not None:
            name = key[len("tags/instance/"):]
            return self.answer(200, tags[name]) if name in tags else self.answer(404)
        value = data.get("meta-data", {}).get(key)
        return self.answer(200, value) if value is not None else self.answer(404)

    def log_message(self, *args):
        pass


def main():
    # The emulator adds the address from the host just before starting this; wait for it briefly.
    for _ in range(50):
        try:
            server = http.server.ThreadingHTTPServer(ADDRESS, Handler)
            break
        except OSError:
            time.sleep(0.1)
    else:
        raise SystemExit(f"cannot listen on {ADDRESS[0]}:{ADDRESS[1]}")
    server.serve_forever()


if __name__ == "__main__":
    main()
