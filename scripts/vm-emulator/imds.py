"""The emulated VMs' instance metadata service (IMDSv2 at 169.254.169.254), as much of it as berth's user-data reads:
the instance's id, address and zone, and its tags when the instance was launched with InstanceMetadataTags=enabled
(the `ha_ec2` members read `berth:members` there to prune retired etcd members).

Each VM gets a folder of the emulator's state (STATE_DIR/imds/<instance id>), mounted read-only in the VM, holding
`imds_server.py` and `metadata.json`. The emulator puts 169.254.169.254 on the VM's loopback (from the host, with
nsenter: the VM needs no network capability), starts the server in the VM, and rewrites `metadata.json` whenever
moto's record of the instance changes (CreateTags on a running VM shows up within a poll).
"""

import json
import os
import shutil

ADDRESS = "169.254.169.254"
MOUNT = "/var/lib/berth-vm-imds"
SERVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "imds_server.py")


def folder(state_dir, vm_id):
    return os.path.join(state_dir, "imds", vm_id)


def create_args(state_dir, vm_id):
    """`docker create` arguments that mount the VM's metadata folder (made, with the server, first)."""
    path = folder(state_dir, vm_id)
    os.makedirs(path, exist_ok=True)
    shutil.copy(SERVER, os.path.join(path, "imds_server.py"))
    return ["-v", f"{path}:{MOUNT}:ro"]


def start(docker, run, container, pid):
    """The metadata address on the VM's loopback, and the server (again after a stop and start)."""
    run("nsenter", "-t", pid, "-n", "ip", "addr", "replace", f"{ADDRESS}/32", "dev", "lo", check=False)
    docker("exec", "-d", container, "python3", f"{MOUNT}/imds_server.py", check=False)


def publish(state_dir, instance):
    """Writes the instance's metadata when it changed."""
    path = folder(state_dir, instance["InstanceId"])
    if not os.path.isdir(path):
        return
    options = instance.get("MetadataOptions") or {}
    tags = {t["Key"]: t["Value"] for t in instance.get("Tags", [])}
    data = {
        "meta-data": {
            "instance-id": instance["InstanceId"],
            "instance-type": instance.get("InstanceType", ""),
            "local-ipv4": instance.get("PrivateIpAddress", ""),
            "placement/availability-zone": instance.get("Placement", {}).get("AvailabilityZone", ""),
        },
        "tags": tags if options.get("InstanceMetadataTags") == "enabled" else None,
    }
    text = json.dumps(data, sort_keys=True)
    target = os.path.join(path, "metadata.json")
    try:
        with open(target) as f:
            if f.read() == text:
                return
    except FileNotFoundError:
        pass
    with open(target + ".tmp", "w") as f:
        f.write(text)
    os.replace(target + ".tmp", target)


def forget(state_dir, vm_id):
    shutil.rmtree(folder(state_dir, vm_id), ignore_errors=True)


def forget_all(state_dir):
    shutil.rmtree(os.path.join(state_dir, "imds"), ignore_errors=True)
