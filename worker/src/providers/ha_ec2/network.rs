//! A cluster's network: its security group (PostgreSQL and Patroni's REST API for the allowed range; etcd,
//! replication and the REST API between members), a network interface per member slot, made before the VM so
//! its private address is known when every member's user-data is rendered and kept when a VM is replaced, and
//! an Elastic IP per slot with `public_ip`. Each is found by its tags before it is made.

use aws_sdk_ec2::{
    Client,
    types::{DomainType, Filter, IpPermission, ResourceType, Tag, UserIdGroupPair},
};

use super::user_data::{API_PORT, ETCD_CLIENT_PORT, ETCD_PEER_PORT, PG_PORT};
use crate::{
    providers::ec2_common::{
        errors::{classify, code},
        vm::{self, MEMBER_TAG, tag_filter, tags},
    },
    registry::TaskError,
};

fn member_filter(member: &str) -> Filter {
    Filter::builder()
        .name(format!("tag:{MEMBER_TAG}"))
        .values(member)
        .build()
}

/// The group: PostgreSQL and Patroni's REST API (and ssh with keys) from `cidr`; between members, etcd's client
/// and peer ports, PostgreSQL and the REST API.
pub async fn ensure_security_group(
    client: &Client,
    name: &str,
    vpc: &str,
    cidr: &str,
    ssh: bool,
    tag_pairs: &[(String, String)],
) -> Result<String, TaskError> {
    let ports: &[i32] = if ssh {
        &[PG_PORT as i32, API_PORT as i32, 22]
    } else {
        &[PG_PORT as i32, API_PORT as i32]
    };
    let id = vm::ensure_security_group(
        client,
        name,
        "berth-ha-postgres-5432-patroni-8008-etcd-2379-2380-between-members",
        vpc,
        cidr,
        ports,
        tag_pairs,
    )
    .await?;
    for (from, to) in [
        (ETCD_CLIENT_PORT, ETCD_PEER_PORT),
        (PG_PORT, PG_PORT),
        (API_PORT, API_PORT),
    ] {
        let rule = IpPermission::builder()
            .ip_protocol("tcp")
            .from_port(from as i32)
            .to_port(to as i32)
            .user_id_group_pairs(UserIdGroupPair::builder().group_id(&id).build())
            .build();
        vm::authorize_ingress(
            client,
            &id,
            rule,
            "opening the security group between members",
        )
        .await?;
    }
    Ok(id)
}

/// The VPC's address range (members replicate from there only).
pub async fn vpc_cidr(client: &Client, vpc: &str) -> Result<String, TaskError> {
    let found = client
        .describe_vpcs()
        .vpc_ids(vpc)
        .send()
        .await
        .map_err(|e| classify(e, "looking up the VPC"))?;
    found
        .vpcs()
        .first()
        .and_then(|v| v.cidr_block())
        .map(str::to_string)
        .ok_or_else(|| TaskError::fatal(format!("VPC {vpc} has no IPv4 range")))
}

/// A slot's network interface: (id, private address).
pub async fn ensure_interface(
    client: &Client,
    instance_id: &str,
    member: &str,
    subnet: &str,
    group: &str,
    tag_pairs: &[(String, String)],
) -> Result<(String, String), TaskError> {
    let found = client
        .describe_network_interfaces()
        .filters(tag_filter(instance_id))
        .filters(member_filter(member))
        .send()
        .await
        .map_err(|e| classify(e, "looking for the member's network interface"))?;
    let interface = match found.network_interfaces().first() {
        Some(i) => i.clone(),
        None => client
            .create_network_interface()
            .subnet_id(subnet)
            .groups(group)
            .description(format!("berth-ha-member-{member}"))
            .tag_specifications(tags(ResourceType::NetworkInterface, tag_pairs))
            .send()
            .await
            .map_err(|e| classify(e, "creating the member's network interface"))?
            .network_interface()
            .cloned()
            .ok_or_else(|| TaskError::retryable("CreateNetworkInterface returned no interface"))?,
    };
    match (
        interface.network_interface_id(),
        interface.private_ip_address(),
    ) {
        (Some(id), Some(ip)) => Ok((id.to_string(), ip.to_string())),
        _ => Err(TaskError::retryable(
            "the member's network interface has no address yet",
        )),
    }
}

/// A slot's Elastic IP on its network interface: (allocation id, address).
pub async fn ensure_address(
    client: &Client,
    instance_id: &str,
    member: &str,
    interface_id: &str,
    tag_pairs: &[(String, String)],
) -> Result<(String, String), TaskError> {
    let found = client
        .describe_addresses()
        .filters(tag_filter(instance_id))
        .filters(member_filter(member))
        .send()
        .await
        .map_err(|e| classify(e, "looking for the member's Elastic IP"))?;
    let (allocation, ip, associated) = match found.addresses().first() {
        Some(a) => (
            a.allocation_id().unwrap_or_default().to_string(),
            a.public_ip().unwrap_or_default().to_string(),
            a.network_interface_id() == Some(interface_id),
        ),
        None => {
            let made = client
                .allocate_address()
                .domain(DomainType::Vpc)
                .tag_specifications(tags(ResourceType::ElasticIp, tag_pairs))
                .send()
                .await
                .map_err(|e| classify(e, "allocating the member's Elastic IP"))?;
            (
                made.allocation_id().unwrap_or_default().to_string(),
                made.public_ip().unwrap_or_default().to_string(),
                false,
            )
        }
    };
    if !associated {
        client
            .associate_address()
            .allocation_id(&allocation)
            .network_interface_id(interface_id)
            .allow_reassociation(true)
            .send()
            .await
            .map_err(|e| classify(e, "associating the member's Elastic IP"))?;
    }
    Ok((allocation, ip))
}

/// Releases a slot's Elastic IP (a scale-down).
pub async fn release_address(client: &Client, allocation_id: &str) -> Result<(), TaskError> {
    match client
        .release_address()
        .allocation_id(allocation_id)
        .send()
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if code(&e).as_deref() == Some("InvalidAllocationID.NotFound") => Ok(()),
        Err(e) => Err(classify(e, "releasing the member's Elastic IP")),
    }
}

/// Sets the `berth:members` tag (the wanted member names) on the cluster's VMs: what each member's etcd prune
/// reads from its instance metadata.
pub async fn tag_wanted(client: &Client, vm_ids: &[String], wanted: &str) -> Result<(), TaskError> {
    if vm_ids.is_empty() {
        return Ok(());
    }
    client
        .create_tags()
        .set_resources(Some(vm_ids.to_vec()))
        .tags(Tag::builder().key(vm::MEMBERS_TAG).value(wanted).build())
        .send()
        .await
        .map_err(|e| classify(e, "tagging the members with the member list"))?;
    Ok(())
}
