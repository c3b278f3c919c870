#!/usr/bin/env python3
"""The end-to-end tests' hands on moto's EC2 and on an S3 store (the `tests` crate has no AWS SDK): each command
prints one JSON document. moto from BERTH_TEST_MOTO_URL, BERTH_TEST_MOTO_ACCESS_KEY, BERTH_TEST_MOTO_SECRET_KEY;
region from AWS_REGION (default us-east-1).

  vpc CIDR NAME           a VPC tagged berth:vm-emulator=NAME (the emulator boots its instances) with a /24 subnet
                          per zone (CIDR's 2nd, 3rd, ... /24); prints {vpc, subnets: {zone: id}, ami_x86_64, ami_arm64}
  delete-vpc VPC_ID       deletes the VPC's subnets and the VPC
  terminate VM_ID         terminates a VM (what a spot interruption does)
  tagged INSTANCE_ID      what moto holds tagged berth:instance=INSTANCE_ID: {vms (not terminated, with their
                          tags), volumes, addresses, security_groups}
  s3-bucket URL KEY SECRET BUCKET        creates a bucket
  s3-get URL KEY SECRET BUCKET OBJECT    prints the object (a JSON document)
"""

import ipaddress
import json
import os
import sys

import boto3


def ec2():
    return boto3.client(
        "ec2",
        endpoint_url=os.environ["BERTH_TEST_MOTO_URL"],
        region_name=os.environ.get("AWS_REGION", "us-east-1"),
        aws_access_key_id=os.environ["BERTH_TEST_MOTO_ACCESS_KEY"],
        aws_secret_access_key=os.environ["BERTH_TEST_MOTO_SECRET_KEY"],
    )


def s3(url, key, secret):
    return boto3.client(
        "s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id=key, aws_secret_access_key=secret
    )


def vpc(cidr, name):
    client = ec2()
    network = ipaddress.ip_network(cidr)
    made = client.create_vpc(
        CidrBlock=cidr,
        TagSpecifications=[{"ResourceType": "vpc", "Tags": [{"Key": "berth:vm-emulator", "Value": name}]}],
    )["Vpc"]["VpcId"]
    zones = [z["ZoneName"] for z in client.describe_availability_zones()["AvailabilityZones"]]
    blocks = network.subnets(new_prefix=24)
    next(blocks)  # the first /24 holds the bridge's address (the VPC router's)
    subnets = {}
    for zone in zones:
        block = next(blocks)
        subnets[zone] = client.create_subnet(VpcId=made, CidrBlock=str(block), AvailabilityZone=zone)["Subnet"][
            "SubnetId"
        ]
    images = client.describe_images(Owners=["amazon"])["Images"]

    def image(arch):
        return next((i["ImageId"] for i in images if i.get("Architecture") == arch), None)

    return {
        "vpc": made,
        "subnets": subnets,
        "ami_x86_64": image("x86_64"),
        "ami_arm64": image("arm64") or image("x86_64"),
    }


def delete_vpc(vpc_id):
    client = ec2()
    for subnet in client.describe_subnets(Filters=[{"Name": "vpc-id", "Values": [vpc_id]}])["Subnets"]:
        client.delete_subnet(SubnetId=subnet["SubnetId"])
    client.delete_vpc(VpcId=vpc_id)
    return {"deleted": vpc_id}


def tagged(instance_id):
    client = ec2()
    tag = [{"Name": "tag:berth:instance", "Values": [instance_id]}]
    vms = []
    for reservation in client.describe_instances(Filters=tag)["Reservations"]:
        for vm in reservation["Instances"]:
            if vm["State"]["Name"] == "terminated":
                continue
            vms.append({
                "id": vm["InstanceId"],
                "state": vm["State"]["Name"],
                "zone": vm["Placement"]["AvailabilityZone"],
                "private_ip": vm.get("PrivateIpAddress"),
                "public_ip": vm.get("PublicIpAddress"),
                "lifecycle": vm.get("InstanceLifecycle"),
                "tags": {t["Key"]: t["Value"] for t in vm.get("Tags", [])},
            })
    volumes = [
        {
            "id": v["VolumeId"],
            "zone": v["AvailabilityZone"],
            "attached_to": next((a["InstanceId"] for a in v.get("Attachments", [])), None),
        }
        for v in client.describe_volumes(Filters=tag)["Volumes"]
    ]
    addresses = [
        {"public_ip": a["PublicIp"], "instance": a.get("InstanceId")}
        for a in client.describe_addresses(Filters=tag)["Addresses"]
    ]
    groups = [g["GroupId"] for g in client.describe_security_groups(Filters=tag)["SecurityGroups"]]
    return {"vms": vms, "volumes": volumes, "addresses": addresses, "security_groups": groups}


def main(args):
    command, rest = args[0], args[1:]
    if command == "vpc":
        out = vpc(*rest)
    elif command == "delete-vpc":
        out = delete_vpc(*rest)
    elif command == "terminate":
        ec2().terminate_instances(InstanceIds=rest)
        out = {"terminated": rest}
    elif command == "tagged":
        out = tagged(*rest)
    elif command == "s3-bucket":
        url, key, secret, bucket = rest
        s3(url, key, secret).create_bucket(Bucket=bucket)
        out = {"bucket": bucket}
    elif command == "s3-get":
        url, key, secret, bucket, name = rest
        out = json.loads(s3(url, key, secret).get_object(Bucket=bucket, Key=name)["Body"].read())
    else:
        sys.exit(__doc__)
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
