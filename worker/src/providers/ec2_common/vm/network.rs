//! An instance's network: the subnet it launches into, its security group and what that group lets in, its Elastic
//! IP, and the deletion of a network interface.

use aws_sdk_ec2::{
    Client,
    types::{DomainType, Filter, IpPermission, IpRange, ResourceType},
};

use super::{
    super::errors::{classify, tolerate},
    tag_filter, tags,
};
use crate::registry::TaskError;

/// The subnet to launch into in `zone`: one of the configured ones there, else the default VPC's. Returns
/// (subnet, its VPC).
pub async fn subnet(
    client: &Client,
    zone: &str,
    configured: &[String],
) -> Result<(String, String), TaskError> {
    let mut request = client.describe_subnets().filters(
        Filter::builder()
            .name("availability-zone")
            .values(zone)
            .build(),
    );
    request = if configured.is_empty() {
        request.filters(
            Filter::builder()
                .name("default-for-az")
                .values("true")
                .build(),
        )
    } else {
        request.filters(
            Filter::builder()
                .name("subnet-id")
                .set_values(Some(configured.to_vec()))
                .build(),
        )
    };
    let subnets = request
        .send()
        .await
        .map_err(|e| classify(e, "finding a subnet"))?;
    subnets
        .subnets()
        .iter()
        .find_map(|s| Some((s.subnet_id()?.to_string(), s.vpc_id()?.to_string())))
        .ok_or_else(|| {
            TaskError::fatal(format!(
                "no subnet in zone {zone} ({}); set EC2_SUBNET_IDS or choose another `zone`",
                if configured.is_empty() {
                    "the default VPC has none"
                } else {
                    "none of EC2_SUBNET_IDS is there"
                }
            ))
        })
}

/// The instance's security group in `vpc`, with `ports` open to `cidr`. `description` must hold no spaces
/// (moto re-encodes form bodies with `+` for a space when it checks signatures).
pub async fn ensure_security_group(
    client: &Client,
    name: &str,
    description: &str,
    vpc: &str,
    cidr: &str,
    ports: &[i32],
    tag_pairs: &[(String, String)],
) -> Result<String, TaskError> {
    let found = client
        .describe_security_groups()
        .filters(Filter::builder().name("group-name").values(name).build())
        .filters(Filter::builder().name("vpc-id").values(vpc).build())
        .send()
        .await
        .map_err(|e| classify(e, "looking for the security group"))?;
    let id = match found.security_groups().first().and_then(|g| g.group_id()) {
        Some(id) => id.to_string(),
        None => client
            .create_security_group()
            .group_name(name)
            .description(description)
            .vpc_id(vpc)
            .tag_specifications(tags(ResourceType::SecurityGroup, tag_pairs))
            .send()
            .await
            .map_err(|e| classify(e, "creating the security group"))?
            .group_id()
            .unwrap_or_default()
            .to_string(),
    };
    for port in ports {
        let rule = IpPermission::builder()
            .ip_protocol("tcp")
            .from_port(*port)
            .to_port(*port)
            .ip_ranges(IpRange::builder().cidr_ip(cidr).build())
            .build();
        authorize_ingress(client, &id, rule, "opening the security group's port").await?;
    }
    Ok(id)
}

/// Lets `rule` in through the security group `group_id`; a rule it has already is fine.
pub async fn authorize_ingress(
    client: &Client,
    group_id: &str,
    rule: IpPermission,
    what: &str,
) -> Result<(), TaskError> {
    let result = client
        .authorize_security_group_ingress()
        .group_id(group_id)
        .ip_permissions(rule)
        .send()
        .await;
    tolerate(result, &["InvalidPermission.Duplicate"], what)?;
    Ok(())
}

/// The instance's Elastic IP: (allocation id, address, association id).
pub async fn address(
    client: &Client,
    instance_id: &str,
) -> Result<Option<(String, String, Option<String>)>, TaskError> {
    let found = client
        .describe_addresses()
        .filters(tag_filter(instance_id))
        .send()
        .await
        .map_err(|e| classify(e, "looking for the Elastic IP"))?;
    Ok(found.addresses().first().map(|a| {
        (
            a.allocation_id().unwrap_or_default().to_string(),
            a.public_ip().unwrap_or_default().to_string(),
            a.association_id()
                .filter(|s| !s.is_empty())
                .map(str::to_string),
        )
    }))
}

pub async fn ensure_address(
    client: &Client,
    instance_id: &str,
    tag_pairs: &[(String, String)],
) -> Result<(String, String), TaskError> {
    if let Some((allocation, ip, _)) = address(client, instance_id).await? {
        return Ok((allocation, ip));
    }
    let made = client
        .allocate_address()
        .domain(DomainType::Vpc)
        .tag_specifications(tags(ResourceType::ElasticIp, tag_pairs))
        .send()
        .await
        .map_err(|e| classify(e, "allocating the Elastic IP"))?;
    Ok((
        made.allocation_id().unwrap_or_default().to_string(),
        made.public_ip().unwrap_or_default().to_string(),
    ))
}

pub async fn associate(client: &Client, allocation_id: &str, vm_id: &str) -> Result<(), TaskError> {
    client
        .associate_address()
        .allocation_id(allocation_id)
        .instance_id(vm_id)
        .allow_reassociation(true)
        .send()
        .await
        .map_err(|e| classify(e, "associating the Elastic IP"))?;
    Ok(())
}

/// Deletes a network interface; gone already is fine, still attached (its VM terminating) is "not yet".
pub async fn delete_interface(client: &Client, id: &str) -> Result<(), TaskError> {
    let result = client
        .delete_network_interface()
        .network_interface_id(id)
        .send()
        .await;
    tolerate(
        result,
        &["InvalidNetworkInterfaceID.NotFound"],
        "deleting a network interface",
    )?;
    Ok(())
}
