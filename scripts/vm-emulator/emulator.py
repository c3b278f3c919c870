#!/usr/bin/env python3
"""berth's VM emulator: moto's EC2 instances, booted as systemd containers on a private Docker engine.

Follows moto's EC2 state (polling) and, for each instance that is pending or running in a VPC tagged
`berth:vm-emulator` (every VPC with BERTH_VM_EVERY_VPC=1), boots a container from the
baked VM image on a docker network of the instance's VPC (its CIDR) at the instance's private address, with its
user-data as a NoCloud seed for Debian's cloud-init. Stopped instances stop their container; terminated (or vanished)
ones lose it. EBS volumes are loop devices over sparse files that follow attach and detach (a block node made in the
VM at the attachment's device name, /dev/sdX as /dev/xvdX like Xen). Elastic IPs (moto hands out 127.x.y.z) are
served on the host's loopback: a TCP forwarder per port the VM's security groups open, to the VM's private address.
Everything it made is removed at exit (SIGTERM/SIGINT) and, left over from a killed run of the same name, at start.

Settings (environment): BERTH_VM_MOTO_URL, BERTH_VM_AWS_ACCESS_KEY_ID, BERTH_VM_AWS_SECRET_ACCESS_KEY,
BERTH_VM_REGIONS (comma separated, default us-east-1), BERTH_VM_IMAGE, BERTH_VM_NAME (prefix of its containers and
networks and the value of their label, default berthvm), BERTH_VM_STATE_DIR (status.json, ready, VM logs),
BERTH_VM_LOOP_DIR (volume files, default STATE_DIR/volumes), BERTH_VM_POLL_SECS (default 0.5), DOCKER_HOST.
See docs/vm-emulator.md.
"""

import asyncio
import base64
import ipaddress
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import boto3

log = logging.getLogger("vm-emulator")

LABEL = "berth.vm.emulator"
# Only instances in VPCs with this tag boot (unless BERTH_VM_EVERY_VPC=1): the suite's other tests share moto and
# launch instances that need no VM, and two emulators must never make the same network.
FOLLOW_TAG = "berth:vm-emulator"
BOOTING_STATES = {"pending", "running"}
STOPPED_STATES = {"stopping", "stopped"}
IMDS_ADDRESS = "169.254.169.254"
# Volumes bigger than this are made with this size: the files are sparse, but mkfs still writes its tables.
MAX_VOLUME_GIB = 64


def docker(*args, check=True, capture=True, input_text=None):
    result = subprocess.run(
        ["docker", *args],
        check=False,
        text=True,
        input=input_text,
        stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    if check and result.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args[:3])}: {result.stderr.strip()}")
    return result.stdout.strip() if capture else ""


def run(*args, check=True):
    result = subprocess.run(list(args), check=False, text=True, capture_output=True)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:3])}: {result.stderr.strip()}")
    return result.stdout.strip()


class Emulator:
    def __init__(self):
        env = os.environ
        self.moto_url = env["BERTH_VM_MOTO_URL"]
        self.key = env.get("BERTH_VM_AWS_ACCESS_KEY_ID", "testing")
        self.secret = env.get("BERTH_VM_AWS_SECRET_ACCESS_KEY", "testing")
        self.regions = [r for r in env.get("BERTH_VM_REGIONS", "us-east-1").split(",") if r]
        self.image = env["BERTH_VM_IMAGE"]
        self.name = env.get("BERTH_VM_NAME", "berthvm")
        self.state_dir = env["BERTH_VM_STATE_DIR"]
        self.loop_dir = env.get("BERTH_VM_LOOP_DIR") or os.path.join(self.state_dir, "volumes")
        self.poll = float(env.get("BERTH_VM_POLL_SECS", "0.5"))
        self.every_vpc = env.get("BERTH_VM_EVERY_VPC") == "1"
        os.makedirs(self.loop_dir, exist_ok=True)
        os.makedirs(os.path.join(self.state_dir, "vms"), exist_ok=True)
        self.clients = {}
        # instance id -> {container, region, ip, network, running, devices: {device path: volume id}}
        self.vms = {}
        # (region, vpc id) -> docker network name
        self.networks = {}
        # docker network name -> its bridge on the host
        self.bridges = {}
        # volume id -> {file, loop}
        self.loops = {}
        # (public ip, port) -> {target, server}
        self.proxies = {}
        # bridge -> the metadata server bound to it
        self.metadata_servers = {}
        self.last_status = None

    # --- moto -------------------------------------------------------------------------------------------------
    def ec2(self, region):
        if region not in self.clients:
            self.clients[region] = boto3.client(
                "ec2",
                endpoint_url=self.moto_url,
                region_name=region,
                aws_access_key_id=self.key,
                aws_secret_access_key=self.secret,
            )
        return self.clients[region]

    def snapshot(self, region):
        """Instances, volumes and addresses of a region, as moto has them now."""
        ec2 = self.ec2(region)
        instances = []
        for page in ec2.get_paginator("describe_instances").paginate():
            for reservation in page["Reservations"]:
                instances.extend(reservation["Instances"])
        volumes = []
        for page in ec2.get_paginator("describe_volumes").paginate():
            volumes.extend(page["Volumes"])
        addresses = ec2.describe_addresses()["Addresses"]
        if not self.every_vpc:
            followed = {
                v["VpcId"]
                for v in ec2.describe_vpcs(Filters=[{"Name": "tag-key", "Values": [FOLLOW_TAG]}])["Vpcs"]
            }
            instances = [i for i in instances if i.get("VpcId") in followed]
        return instances, volumes, addresses

    # --- networks ---------------------------------------------------------------------------------------------
    def network_for(self, region, vpc_id):
        key = (region, vpc_id)
        if key in self.networks:
            return self.networks[key]
        vpc = self.ec2(region).describe_vpcs(VpcIds=[vpc_id])["Vpcs"][0]
        cidr = ipaddress.ip_network(vpc["CidrBlock"])
        self.refuse_overlap(cidr)
        name = f"{self.name}-{region}-{vpc_id}"
        docker("network", "rm", name, check=False)
        # One bridge per VPC: its subnets' VMs reach each other directly (the host forwards nothing), and the
        # host reaches them through the bridge's address (the first of the CIDR, a VPC's router address).
        docker(
            "network", "create", "--driver", "bridge", "--internal",
            "--subnet", str(cidr), "--gateway", str(cidr.network_address + 1),
            "--label", f"{LABEL}={self.name}", name,
        )
        log.info("network %s for %s (%s)", name, vpc_id, cidr)
        self.networks[key] = name
        # The instance metadata service answers on the bridge (a server bound to this bridge only, so another
        # emulator's bridge can hold the same address).
        run("ip", "addr", "add", f"{IMDS_ADDRESS}/32", "dev", self.bridge_of(name), check=False)
        return name

    def refuse_overlap(self, cidr):
        ours = set()
        for name in self.networks.values():
            ours.add(self.bridge_of(name))
        for route in json.loads(run("ip", "-j", "route", "show", "table", "main")):
            dst = route.get("dst")
            if not dst or dst == "default" or route.get("dev") in ours:
                continue
            try:
                other = ipaddress.ip_network(dst, strict=False)
            except ValueError:
                continue
            if other.version == 4 and other.overlaps(cidr):
                raise RuntimeError(
                    f"the VPC CIDR {cidr} overlaps the host's route {dst} dev {route.get('dev')} "
                    "(another emulator's VPC, or the host's own network): give the test's VPC a CIDR of its own"
                )

    def bridge_of(self, network):
        if network not in self.bridges:
            network_id = docker("network", "inspect", "-f", "{{.Id}}", network, check=False)
            if not network_id:
                return ""
            self.bridges[network] = "br-" + network_id[:12]
        return self.bridges[network]

    def prune_networks(self):
        used = {vm["network"] for vm in self.vms.values()}
        for key, name in list(self.networks.items()):
            if name not in used:
                docker("network", "rm", name, check=False)
                del self.networks[key]
                self.bridges.pop(name, None)
                log.info("network %s removed (no VM on it)", name)

    # --- VMs --------------------------------------------------------------------------------------------------
    def boot(self, region, instance):
        vm_id = instance["InstanceId"]
        ip = instance.get("PrivateIpAddress")
        vpc_id = instance.get("VpcId")
        if not ip or not vpc_id:
            return
        network = self.network_for(region, vpc_id)
        user_data = ""
        attribute = self.ec2(region).describe_instance_attribute(InstanceId=vm_id, Attribute="userData")
        encoded = attribute.get("UserData", {}).get("Value")
        if encoded:
            user_data = base64.b64decode(encoded).decode("utf-8", "replace")
        container = f"{self.name}-{vm_id}"
        hostname = "ip-" + ip.replace(".", "-")
        docker("rm", "-f", container, check=False)
        docker(
            "create", "--name", container, "--hostname", hostname,
            "--network", network, "--ip", ip,
            "--cap-add", "SYS_ADMIN", "--tmpfs", "/run", "--tmpfs", "/run/lock",
            "-v", "/sys/fs/cgroup:/sys/fs/cgroup:ro", "-e", "container=docker",
            # EBS volumes are loop devices (major 7), made in /dev when attached.
            "--device-cgroup-rule", "b 7:* rmw",
            "--label", f"{LABEL}={self.name}", "--label", f"berth.vm.instance={vm_id}",
            self.image,
        )
        with tempfile.TemporaryDirectory() as seed:
            with open(os.path.join(seed, "meta-data"), "w") as f:
                f.write(f"instance-id: {vm_id}\nlocal-hostname: {hostname}\n")
            with open(os.path.join(seed, "user-data"), "w") as f:
                f.write(user_data)
            docker("cp", seed + "/.", f"{container}:/var/lib/cloud/seed/nocloud")
        docker("start", container)
        self.route(container, network)
        self.vms[vm_id] = {
            "container": container, "region": region, "ip": ip, "network": network,
            "running": True, "devices": {}, "booted_at": time.time(), "metadata": metadata_of(instance),
        }
        log.info("booted %s as %s at %s on %s", vm_id, container, ip, network)

    def route(self, container, network):
        """No default route (nothing a VM sends can leave the machine, whatever the host forwards); the metadata
        address through the bridge."""
        pid = docker("inspect", "-f", "{{.State.Pid}}", container)
        gateway = docker("network", "inspect", "-f", "{{(index .IPAM.Config 0).Gateway}}", network)
        run("nsenter", "-t", pid, "-n", "ip", "route", "del", "default", check=False)
        run("nsenter", "-t", pid, "-n", "ip", "route", "replace", f"{IMDS_ADDRESS}/32", "via", gateway, check=False)

    def stop(self, vm_id):
        vm = self.vms[vm_id]
        if vm["running"]:
            docker("stop", "-t", "10", vm["container"], check=False)
            vm["running"] = False
            vm["devices"] = {}
            log.info("stopped %s", vm_id)

    def start_again(self, vm_id):
        vm = self.vms[vm_id]
        if not vm["running"]:
            docker("start", vm["container"])
            self.route(vm["container"], vm["network"])
            vm["running"] = True
            log.info("started %s again", vm_id)

    def remove(self, vm_id):
        vm = self.vms.pop(vm_id)
        self.keep_logs(vm_id, vm["container"])
        docker("rm", "-f", vm["container"], check=False)
        log.info("removed %s (%s)", vm_id, vm["container"])

    def keep_logs(self, vm_id, container):
        """The VM's setup logs, kept in STATE_DIR/vms/<id>/ after the VM is gone (for failing tests)."""
        folder = os.path.join(self.state_dir, "vms", vm_id)
        os.makedirs(folder, exist_ok=True)
        for path in ("/var/log/berth-setup.log", "/var/log/cloud-init-output.log", "/var/log/cloud-init.log"):
            text = docker("exec", container, "cat", path, check=False)
            if text:
                with open(os.path.join(folder, os.path.basename(path)), "w") as f:
                    f.write(text + "\n")

    # --- volumes ----------------------------------------------------------------------------------------------
    def loop_of(self, volume):
        volume_id = volume["VolumeId"]
        if volume_id not in self.loops:
            path = os.path.join(self.loop_dir, f"{self.name}-{volume_id}.img")
            size = min(int(volume.get("Size", 8)), MAX_VOLUME_GIB)
            with open(path, "ab") as f:
                f.truncate(size * 1024**3)
            loop = run("losetup", "--find", "--show", path)
            self.loops[volume_id] = {"file": path, "loop": loop}
            log.info("volume %s is %s over %s", volume_id, loop, path)
        return self.loops[volume_id]["loop"]

    def sync_devices(self, region, volumes, root_devices):
        wanted = {}  # vm id -> {device path: volume id}
        for volume in volumes:
            for attachment in volume.get("Attachments", []):
                vm_id = attachment.get("InstanceId")
                if attachment.get("State") not in ("attaching", "attached") or vm_id not in self.vms:
                    continue
                device = attachment.get("Device", "/dev/sdf")
                # The root volume is the container's own file system.
                if device == root_devices.get(vm_id) or device.startswith(("/dev/sda", "/dev/xvda")):
                    continue
                if device.startswith("/dev/sd"):
                    device = "/dev/xvd" + device[len("/dev/sd"):]
                wanted.setdefault(vm_id, {})[device] = volume
        for vm_id, vm in self.vms.items():
            if vm["region"] != region or not vm["running"]:
                continue
            want = wanted.get(vm_id, {})
            for device, volume_id in list(vm["devices"].items()):
                if want.get(device, {}).get("VolumeId") != volume_id:
                    docker("exec", vm["container"], "rm", "-f", device, check=False)
                    del vm["devices"][device]
                    log.info("volume %s detached from %s (%s)", volume_id, vm_id, device)
            for device, volume in want.items():
                if device in vm["devices"]:
                    continue
                loop = self.loop_of(volume)
                minor = os.minor(os.stat(loop).st_rdev)
                docker("exec", vm["container"], "mknod", "-m", "0660", device, "b", "7", str(minor))
                vm["devices"][device] = volume["VolumeId"]
                log.info("volume %s attached to %s as %s (%s)", volume["VolumeId"], vm_id, device, loop)
        known = {v["VolumeId"] for v in volumes}
        for volume_id, loop in list(self.loops.items()):
            if volume_id not in known and self.region_of_loop(volume_id) == region:
                self.drop_loop(volume_id)

    def region_of_loop(self, volume_id):
        return self.loops[volume_id].get("region", self.regions[0])

    def drop_loop(self, volume_id):
        entry = self.loops.pop(volume_id)
        run("losetup", "-d", entry["loop"], check=False)
        try:
            os.unlink(entry["file"])
        except FileNotFoundError:
            pass
        log.info("volume %s deleted (%s released)", volume_id, entry["loop"])

    # --- addresses --------------------------------------------------------------------------------------------
    def wanted_proxies(self, region, addresses, instances):
        by_id = {i["InstanceId"]: i for i in instances}
        wanted = {}
        groups = {}
        for address in addresses:
            vm_id = address.get("InstanceId")
            public_ip = address.get("PublicIp")
            if not vm_id or not public_ip or vm_id not in self.vms or not self.vms[vm_id]["running"]:
                continue
            if not ipaddress.ip_address(public_ip).is_loopback:
                log.warning("address %s of %s is not on the loopback: not served", public_ip, vm_id)
                continue
            # The groups of the instance and of its network interfaces (a launch with an interface spec names
            # them there only).
            instance = by_id.get(vm_id, {})
            group_ids = {g["GroupId"] for g in instance.get("SecurityGroups", [])}
            for interface in instance.get("NetworkInterfaces", []):
                group_ids.update(g["GroupId"] for g in interface.get("Groups", []))
            for group_id in group_ids:
                if group_id not in groups:
                    found = self.ec2(region).describe_security_groups(GroupIds=[group_id])["SecurityGroups"]
                    groups[group_id] = found[0] if found else {}
                for permission in groups[group_id].get("IpPermissions", []):
                    if permission.get("IpProtocol") not in ("tcp", "6"):
                        continue
                    low, high = permission.get("FromPort"), permission.get("ToPort")
                    if low is None or high is None or high - low > 32:
                        continue
                    for port in range(low, high + 1):
                        wanted[(public_ip, port)] = (self.vms[vm_id]["ip"], port)
        return wanted

    # --- one pass ---------------------------------------------------------------------------------------------
    def reconcile(self):
        """Brings docker in line with moto; returns the wanted address forwarders and the bridges (each gets a
        metadata server)."""
        proxies = {}
        for region in self.regions:
            instances, volumes, addresses = self.snapshot(region)
            seen = {i["InstanceId"] for i in instances if i["State"]["Name"] in BOOTING_STATES | STOPPED_STATES}
            # Gone first: a replacement often takes over the volume and the address of the VM it replaces.
            for vm_id in [v for v, vm in self.vms.items() if vm["region"] == region and v not in seen]:
                self.remove(vm_id)
            for instance in instances:
                vm_id = instance["InstanceId"]
                state = instance["State"]["Name"]
                if vm_id in self.vms:
                    self.vms[vm_id]["metadata"] = metadata_of(instance)
                if state in BOOTING_STATES:
                    try:
                        if vm_id in self.vms:
                            self.start_again(vm_id)
                        else:
                            self.boot(region, instance)
                    except Exception as e:  # noqa: BLE001 - one VM's failure must not stop the others
                        log.error("booting %s failed: %s", vm_id, e)
                elif state in STOPPED_STATES and vm_id in self.vms:
                    self.stop(vm_id)
            for volume in volumes:
                if volume["VolumeId"] in self.loops:
                    self.loops[volume["VolumeId"]]["region"] = region
            self.sync_devices(region, volumes, {i["InstanceId"]: i.get("RootDeviceName") for i in instances})
            proxies.update(self.wanted_proxies(region, addresses, instances))
        self.prune_networks()
        return proxies, {self.bridge_of(n) for n in self.networks.values()}

    def vm_at(self, ip):
        return next((vm for vm in self.vms.values() if vm["ip"] == ip), None)

    def write_status(self, proxies):
        status = {
            "vms": self.vms,
            "networks": {f"{r}/{v}": n for (r, v), n in self.networks.items()},
            "volumes": self.loops,
            "addresses": {f"{ip}:{port}": f"{t[0]}:{t[1]}" for (ip, port), t in proxies.items()},
        }
        text = json.dumps(status, indent=1, sort_keys=True, default=str)
        if text != self.last_status:
            path = os.path.join(self.state_dir, "status.json")
            with open(path + ".tmp", "w") as f:
                f.write(text)
            os.replace(path + ".tmp", path)
            self.last_status = text

    # --- start and exit ---------------------------------------------------------------------------------------
    def clean_everything(self):
        """Removes every container and network of this emulator's name, and the loop devices of its files."""
        for container in docker("ps", "-aq", "--filter", f"label={LABEL}={self.name}").split():
            docker("rm", "-f", container, check=False)
        for network in docker("network", "ls", "-q", "--filter", f"label={LABEL}={self.name}").split():
            docker("network", "rm", network, check=False)
        prefix = os.path.join(self.loop_dir, f"{self.name}-")
        for line in run("losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE", check=False).splitlines():
            parts = line.split(None, 1)
            if len(parts) == 2 and parts[1].strip().startswith(prefix):
                run("losetup", "-d", parts[0], check=False)
        for entry in os.listdir(self.loop_dir):
            if entry.startswith(f"{self.name}-") and entry.endswith(".img"):
                os.unlink(os.path.join(self.loop_dir, entry))
        self.vms.clear()
        self.networks.clear()
        self.bridges.clear()
        self.loops.clear()


def metadata_of(instance):
    """What the metadata service tells a VM about itself."""
    options = instance.get("MetadataOptions", {})
    return {
        "instance-id": instance["InstanceId"],
        "instance-type": instance.get("InstanceType", ""),
        "local-ipv4": instance.get("PrivateIpAddress", ""),
        "public-ipv4": instance.get("PublicIpAddress", ""),
        "placement/availability-zone": instance.get("Placement", {}).get("AvailabilityZone", ""),
        "tags": {t["Key"]: t["Value"] for t in instance.get("Tags", [])}
        if options.get("InstanceMetadataTags") == "enabled"
        else None,
    }


def metadata_answer(emulator, peer, method, path):
    """(status, body) of an IMDSv2 request from the VM at `peer`."""
    if method == "PUT" and path == "/latest/api/token":
        return 200, "berth-vm-emulator-token"
    vm = emulator.vm_at(peer)
    prefix = "/latest/meta-data/"
    if method != "GET" or vm is None or not path.startswith(prefix):
        return 404, "Not Found"
    facts = vm.get("metadata", {})
    key = path[len(prefix):]
    if key.startswith("tags/instance"):
        tags = facts.get("tags")
        if tags is None:
            return 404, "Not Found"
        name = key[len("tags/instance"):].strip("/")
        if not name:
            return 200, "\n".join(sorted(tags))
        return (200, tags[name]) if name in tags else (404, "Not Found")
    value = facts.get(key)
    return (200, value) if isinstance(value, str) and value else (404, "Not Found")


async def serve_metadata(emulator, reader, writer):
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        method, path = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")[:2]
        length = 0
        for line in head.decode("latin-1").split("\r\n")[1:]:
            if line.lower().startswith("content-length:"):
                length = int(line.split(":", 1)[1])
        if length:
            await reader.readexactly(length)
        status, body = metadata_answer(emulator, writer.get_extra_info("peername")[0], method, path)
        data = body.encode()
        reason = "OK" if status == 200 else "Not Found"
        writer.write(
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {len(data)}\r\n"
            f"Connection: close\r\n\r\n".encode() + data
        )
        await writer.drain()
    except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError, ValueError):
        pass
    finally:
        writer.close()


async def sync_metadata_servers(emulator, bridges):
    for bridge, server in list(emulator.metadata_servers.items()):
        if bridge not in bridges:
            server.close()
            del emulator.metadata_servers[bridge]
    for bridge in bridges:
        if not bridge or bridge in emulator.metadata_servers:
            continue
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, bridge.encode())
            sock.bind((IMDS_ADDRESS, 80))
            server = await asyncio.start_server(lambda r, w: serve_metadata(emulator, r, w), sock=sock)
        except OSError as e:
            sock.close()
            log.error("the metadata service on %s failed: %s", bridge, e)
            continue
        emulator.metadata_servers[bridge] = server
        log.info("metadata service on %s", bridge)


async def pipe(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        writer.close()


async def forward(target, client_reader, client_writer):
    try:
        vm_reader, vm_writer = await asyncio.wait_for(asyncio.open_connection(*target), 5)
    except (OSError, asyncio.TimeoutError):
        client_writer.close()
        return
    await asyncio.gather(pipe(client_reader, vm_writer), pipe(vm_reader, client_writer))


async def sync_proxies(emulator, wanted):
    for key, entry in list(emulator.proxies.items()):
        if wanted.get(key) != entry["target"]:
            entry["server"].close()
            del emulator.proxies[key]
            log.info("address %s:%s no longer served", *key)
    for key, target in wanted.items():
        if key in emulator.proxies:
            continue
        try:
            server = await asyncio.start_server(
                lambda r, w, t=target: forward(t, r, w), host=key[0], port=key[1], reuse_address=True
            )
        except OSError as e:
            log.error("serving %s:%s failed: %s", key[0], key[1], e)
            continue
        emulator.proxies[key] = {"target": target, "server": server}
        log.info("address %s:%s -> %s:%s", key[0], key[1], *target)


async def main():
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s vm-emulator %(levelname)s %(message)s", stream=sys.stderr
    )
    emulator = Emulator()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await asyncio.to_thread(emulator.clean_everything)
    with open(os.path.join(emulator.state_dir, "ready"), "w") as f:
        f.write(str(os.getpid()))
    log.info("following %s (%s) with image %s", emulator.moto_url, ",".join(emulator.regions), emulator.image)
    try:
        while not stop.is_set():
            try:
                wanted, bridges = await asyncio.to_thread(emulator.reconcile)
                await sync_proxies(emulator, wanted)
                await sync_metadata_servers(emulator, bridges)
                emulator.write_status(wanted)
            except Exception as e:  # noqa: BLE001 - moto may be busy or going away; the next pass retries
                log.warning("pass failed: %s", e)
            try:
                await asyncio.wait_for(stop.wait(), emulator.poll)
            except asyncio.TimeoutError:
                pass
    finally:
        for entry in emulator.proxies.values():
            entry["server"].close()
        emulator.proxies.clear()
        await sync_metadata_servers(emulator, set())
        await asyncio.to_thread(emulator.clean_everything)
        emulator.write_status({})
        log.info("stopped; everything it made is removed")


if __name__ == "__main__":
    asyncio.run(main())
