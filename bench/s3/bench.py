#!/usr/bin/env python3
"""One store's S3 figures, printed as one JSON line:
provision_s   PUT ?accepts_incomplete=true (plan basic) until last_operation says succeeded (polled every 5 ms)
deprovision_s DELETE until last_operation is 410 Gone, with `objects` objects in the bucket (berth empties, deletes)
anchor_s      the same objects in a bucket of the bench's own, emptied with list_objects_v2 + delete_objects
              (1,000 per call, like `aws s3 rm --recursive`) and deleted, on the same server, in one thread
Both buckets are filled the same way (not timed, 32 threads); the anchor runs first."""
import argparse, base64, concurrent.futures as cf, json, sys, time, urllib.error, urllib.request, uuid

import boto3
from botocore.config import Config

SERVICE = "6f0c2f4e-3b1a-4c55-9d0e-8a4b7c2e1f01"
BASIC = "b1c7a3e0-52d4-4f0a-8e61-3d2f9a7c5b11"


def main():
    ap = argparse.ArgumentParser()
    for name in ("store", "url", "endpoint", "key", "secret", "prefix"):
        ap.add_argument("--" + name, required=True)
    ap.add_argument("--objects", type=int, default=10000)
    a = ap.parse_args()
    import os
    auth = "Basic " + base64.b64encode(f"bench:{os.environ['BROKER_PASSWORD']}".encode()).decode()

    def call(method, path, body=None):
        req = urllib.request.Request(a.url + path, method=method, data=json.dumps(body).encode() if body else None,
                                     headers={"Authorization": auth, "X-Broker-API-Version": "2.17",
                                              "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req) as r:
                return r.status, json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def wait_health():
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                urllib.request.urlopen(a.url + "/health"); return
            except Exception:
                time.sleep(0.1)
        sys.exit("berth-api did not come up")

    def until(path, done):
        deadline = time.time() + 1800
        while time.time() < deadline:
            status, body = call("GET", path)
            if done(status, body):
                return body
            if body.get("state") == "failed":
                sys.exit(f"operation failed: {body}")
            time.sleep(0.005)
        sys.exit("timed out")

    s3 = boto3.client("s3", endpoint_url=a.endpoint, region_name="us-east-1", aws_access_key_id=a.key,
                      aws_secret_access_key=a.secret, config=Config(max_pool_connections=32))

    def fill(bucket):
        with cf.ThreadPoolExecutor(32) as ex:
            list(ex.map(lambda i: s3.put_object(Bucket=bucket, Key=f"obj/{i:06}", Body=b"x"), range(a.objects)))

    wait_health()
    iid = "bench-" + uuid.uuid4().hex[:12]
    t = time.perf_counter()
    status, body = call("PUT", f"/v2/service_instances/{iid}?accepts_incomplete=true",
                        {"service_id": SERVICE, "plan_id": BASIC, "organization_guid": "o", "space_guid": "s"})
    assert status == 202, (status, body)
    until(f"/v2/service_instances/{iid}/last_operation", lambda s, b: b.get("state") == "succeeded")
    provision_s = time.perf_counter() - t
    import hashlib
    bucket = a.prefix + hashlib.sha256(iid.encode()).hexdigest()[:20]
    s3.head_bucket(Bucket=bucket)
    anchor = f"{a.prefix}anchor-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=anchor)
    fill(bucket)
    fill(anchor)

    def run_anchor():
        t = time.perf_counter()
        while True:
            page = s3.list_objects_v2(Bucket=anchor, MaxKeys=1000)
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if not keys:
                break
            s3.delete_objects(Bucket=anchor, Delete={"Objects": keys, "Quiet": True})
        s3.delete_bucket(Bucket=anchor)
        return time.perf_counter() - t

    def run_berth():
        t = time.perf_counter()
        status, body = call("DELETE", f"/v2/service_instances/{iid}?service_id={SERVICE}&plan_id={BASIC}&accepts_incomplete=true")
        assert status == 202, (status, body)
        until(f"/v2/service_instances/{iid}/last_operation", lambda s, b: s == 410)
        return time.perf_counter() - t

    anchor_s = run_anchor()
    deprovision_s = run_berth()
    print(json.dumps({"store": a.store, "objects": a.objects, "provision_s": provision_s,
                      "deprovision_s": deprovision_s, "anchor_delete_s": anchor_s,
                      "ratio": deprovision_s / anchor_s}), flush=True)


if __name__ == "__main__":
    main()
