//! The EC2 resources of one instance, each found by its `berth:instance` tag before it is made, so a retry after
//! a crash adopts what the first try made: the security group, the data volume, the Elastic IP and the VM.

use aws_sdk_ec2::{
    Client,
    types::{
        BlockDeviceMapping, DomainType, EbsBlockDevice, Filter, InstanceInterruptionBehavior,
        InstanceMarketOptionsRequest, InstanceMetadataOptionsRequest, InstanceMetadataTagsState,
        InstanceNetworkInterfaceSpecification, InstanceType, IpPermission, IpRange, MarketType,
        Placement, ResourceType, SpotInstanceType, SpotMarketOptions, Tag, TagSpecification,
        VolumeType,
    },
};
use base64::Engine as _;

use super::errors::{classify, code, is_capacity, tolerate};
use crate::registry::TaskError;

pub const TAG: &str = "berth:instance";
/// Which of the instance's resources a thing is (`data`: the volume that outlives VMs).
pub const ROLE_TAG: &str = "berth:role";
/// Which member slot of an ha cluster a VM, interface or address belongs to (`m1`, `m2`, ...).
pub const MEMBER_TAG: &str = "berth:member";
/// On an ha cluster's VMs: the wanted members' names, read by each member from its instance metadata.
pub const MEMBERS_TAG: &str = "berth:members";
/// Where the data volume is attached (it shows up as an NVMe disk on Nitro types).
pub const DEVICE: &str = "/dev/sdf";

pub fn tag_filter(instance_id: &str) -> Filter {
    Filter::builder()
        .name(format!("tag:{TAG}"))
        .values(instance_id)
        .build()
}

pub fn tags(resource: ResourceType, pairs: &[(String, String)]) -> TagSpecification {
    let mut spec = TagSpecification::builder().resource_type(resource);
    for (k, v) in pairs {
        spec = spec.tags(Tag::builder().key(k).value(v).build());
    }
    spec.build()
}

/// A VM as DescribeInstances shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct Vm {
    pub id: String,
    pub state: String,
    pub instance_type: String,
    pub zone: String,
    pub private_ip: Option<String>,
    pub public_ip: Option<String>,
    pub launched_at: Option<i64>,
    pub berth_instance: Option<String>,
    pub member: Option<String>,
}

impl Vm {
    fn of(i: &aws_sdk_ec2::types::Instance) -> Self {
        Self {
            id: i.instance_id().unwrap_or_default().to_string(),
            state: i
                .state()
                .and_then(|s| s.name())
                .map(|n| n.as_str().to_string())
                .unwrap_or_default(),
            instance_type: i
                .instance_type()
                .map(|t| t.as_str().to_string())
                .unwrap_or_default(),
            zone: i
                .placement()
                .and_then(|p| p.availability_zone())
                .unwrap_or_default()
                .to_string(),
            private_ip: i.private_ip_address().map(str::to_string),
            public_ip: i.public_ip_address().map(str::to_string),
            launched_at: i.launch_time().map(|t| t.secs()),
            berth_instance: tag_value(i, TAG),
            member: tag_value(i, MEMBER_TAG),
        }
    }
}

fn tag_value(i: &aws_sdk_ec2::types::Instance, key: &str) -> Option<String> {
    i.tags()
        .iter()
        .find(|t| t.key() == Some(key))
        .and_then(|t| t.value())
        .map(str::to_string)
}

/// VMs in `filters`, every page (`calls` counts the requests, for the benchmark).
pub async fn describe(
    client: &Client,
    filters: Vec<Filter>,
    calls: &mut u32,
) -> Result<Vec<Vm>, TaskError> {
    let mut out = Vec::new();
    let mut token: Option<String> = None;
    loop {
        *calls += 1;
        let page = client
            .describe_instances()
            .set_filters(Some(filters.clone()))
            .max_results(1000)
            .set_next_token(token.clone())
            .send()
            .await
            .map_err(|e| classify(e, "describing VMs"))?;
        out.extend(
            page.reservations()
                .iter()
                .flat_map(|r| r.instances())
                .map(Vm::of),
        );
        token = page
            .next_token()
            .filter(|t| !t.is_empty())
            .map(str::to_string);
        if token.is_none() {
            return Ok(out);
        }
    }
}

/// Every pending or running VM berth made in the client's region (any engine's: one listing serves the
/// reconcile passes of both EC2 engines), counting the DescribeInstances pages in `calls`.
pub async fn berth_vms_in_region(client: &Client, calls: &mut u32) -> Result<Vec<Vm>, TaskError> {
    let filters = vec![
        Filter::builder().name("tag-key").values(TAG).build(),
        Filter::builder()
            .name("instance-state-name")
            .values("pending")
            .values("running")
            .build(),
    ];
    describe(client, filters, calls).await
}

/// The instance's VMs that are not terminated.
pub async fn live_vms(client: &Client, instance_id: &str) -> Result<Vec<Vm>, TaskError> {
    let state = Filter::builder()
        .name("instance-state-name")
        .set_values(Some(vec![
            "pending".into(),
            "running".into(),
            "stopping".into(),
            "stopped".into(),
        ]))
        .build();
    describe(client, vec![tag_filter(instance_id), state], &mut 0).await
}

pub async fn vm(client: &Client, vm_id: &str) -> Result<Option<Vm>, TaskError> {
    let filter = Filter::builder().name("instance-id").values(vm_id).build();
    Ok(describe(client, vec![filter], &mut 0)
        .await?
        .into_iter()
        .next())
}

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

/// A volume as DescribeVolumes shows it.
#[derive(Debug, Clone)]
pub struct Volume {
    pub id: String,
    pub zone: String,
    /// The VM it is attached (or attaching) to.
    pub attached_to: Option<String>,
}

pub async fn data_volume(client: &Client, instance_id: &str) -> Result<Option<Volume>, TaskError> {
    let found = client
        .describe_volumes()
        .filters(tag_filter(instance_id))
        .filters(
            Filter::builder()
                .name(format!("tag:{ROLE_TAG}"))
                .values("data")
                .build(),
        )
        .send()
        .await
        .map_err(|e| classify(e, "looking for the data volume"))?;
    Ok(found.volumes().first().map(|v| Volume {
        id: v.volume_id().unwrap_or_default().to_string(),
        zone: v.availability_zone().unwrap_or_default().to_string(),
        attached_to: v
            .attachments()
            .iter()
            .find(|a| {
                a.state()
                    .is_some_and(|s| s.as_str() == "attached" || s.as_str() == "attaching")
            })
            .and_then(|a| a.instance_id())
            .map(str::to_string),
    }))
}

/// The encrypted gp3 data volume, made once in `zone` (ClientToken `token` on AWS; the tag lookup everywhere).
pub async fn ensure_data_volume(
    client: &Client,
    instance_id: &str,
    zone: &str,
    size_gb: u32,
    token: &str,
    tag_pairs: &[(String, String)],
) -> Result<Volume, TaskError> {
    if let Some(volume) = data_volume(client, instance_id).await? {
        return Ok(volume);
    }
    let mut pairs = tag_pairs.to_vec();
    pairs.push((ROLE_TAG.into(), "data".into()));
    let made = client
        .create_volume()
        .availability_zone(zone)
        .size(size_gb as i32)
        .volume_type(VolumeType::Gp3)
        .encrypted(true)
        .client_token(token)
        .tag_specifications(tags(ResourceType::Volume, &pairs))
        .send()
        .await
        .map_err(|e| classify(e, "creating the data volume"))?;
    Ok(Volume {
        id: made.volume_id().unwrap_or_default().to_string(),
        zone: zone.to_string(),
        attached_to: None,
    })
}

pub async fn attach(client: &Client, volume_id: &str, vm_id: &str) -> Result<(), TaskError> {
    let result = client
        .attach_volume()
        .volume_id(volume_id)
        .instance_id(vm_id)
        .device(DEVICE)
        .send()
        .await;
    tolerate(result, &["VolumeInUse"], "attaching the data volume")?;
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

/// What RunInstances is asked for.
pub struct Launch<'a> {
    pub image_id: &'a str,
    pub instance_type: &'a str,
    pub zone: &'a str,
    pub subnet_id: &'a str,
    pub security_group_id: &'a str,
    pub public_ip: bool,
    pub spot: bool,
    pub max_price: Option<f64>,
    pub user_data: &'a str,
    pub client_token: &'a str,
    pub tags: &'a [(String, String)],
    /// A network interface made beforehand (its address known before the launch) instead of a new one in
    /// `subnet_id`; `security_group_id` and `public_ip` are then the interface's own business.
    pub network_interface_id: Option<&'a str>,
    /// An encrypted gp3 disk of this size at `/dev/sdf`, deleted with the VM (data that peers can rebuild).
    pub scratch_disk_gb: Option<u32>,
    /// Lets the VM read its own tags from the instance metadata service.
    pub tags_in_metadata: bool,
}

/// Why a launch did not give a VM.
#[derive(Debug)]
pub enum LaunchError {
    /// No capacity for this type here (or its spot price is above the cap): try the next candidate.
    NoCapacity(String),
    Failed(TaskError),
}

pub async fn launch(client: &Client, spec: &Launch<'_>) -> Result<Vm, LaunchError> {
    let mut request = client
        .run_instances()
        .image_id(spec.image_id)
        .instance_type(InstanceType::from(spec.instance_type))
        .min_count(1)
        .max_count(1)
        .client_token(spec.client_token)
        .placement(Placement::builder().availability_zone(spec.zone).build())
        .network_interfaces(network_interface(spec))
        .user_data(base64::engine::general_purpose::STANDARD.encode(spec.user_data))
        .tag_specifications(tags(ResourceType::Instance, spec.tags));
    if let Some(size) = spec.scratch_disk_gb {
        request = request
            .block_device_mappings(scratch_disk(size))
            .tag_specifications(tags(ResourceType::Volume, spec.tags));
    }
    if spec.tags_in_metadata {
        request = request.metadata_options(
            InstanceMetadataOptionsRequest::builder()
                .instance_metadata_tags(InstanceMetadataTagsState::Enabled)
                .build(),
        );
    }
    if spec.spot {
        request = request.instance_market_options(spot_market(spec.max_price));
    }
    match request.send().await {
        Ok(out) => out.instances().first().map(Vm::of).ok_or_else(|| {
            LaunchError::Failed(TaskError::retryable("RunInstances returned no VM"))
        }),
        Err(e) => match code(&e) {
            Some(c) if is_capacity(&c) => Err(LaunchError::NoCapacity(c)),
            _ => Err(LaunchError::Failed(classify(e, "launching the VM"))),
        },
    }
}

/// The VM's network interface: the one made beforehand, or a new one in the subnet.
fn network_interface(spec: &Launch<'_>) -> InstanceNetworkInterfaceSpecification {
    match spec.network_interface_id {
        Some(id) => InstanceNetworkInterfaceSpecification::builder()
            .device_index(0)
            .network_interface_id(id)
            .build(),
        None => InstanceNetworkInterfaceSpecification::builder()
            .device_index(0)
            .subnet_id(spec.subnet_id)
            .groups(spec.security_group_id)
            .associate_public_ip_address(spec.public_ip)
            .delete_on_termination(true)
            .build(),
    }
}

/// An encrypted gp3 disk of `size_gb` at `/dev/sdf`, deleted with the VM.
fn scratch_disk(size_gb: u32) -> BlockDeviceMapping {
    BlockDeviceMapping::builder()
        .device_name(DEVICE)
        .ebs(
            EbsBlockDevice::builder()
                .volume_size(size_gb as i32)
                .volume_type(VolumeType::Gp3)
                .encrypted(true)
                .delete_on_termination(true)
                .build(),
        )
        .build()
}

/// A one-time spot request, terminated on interruption, capped at `max_price` when given.
fn spot_market(max_price: Option<f64>) -> InstanceMarketOptionsRequest {
    let mut spot = SpotMarketOptions::builder()
        .spot_instance_type(SpotInstanceType::OneTime)
        .instance_interruption_behavior(InstanceInterruptionBehavior::Terminate);
    if let Some(cap) = max_price {
        spot = spot.max_price(format!("{cap}"));
    }
    InstanceMarketOptionsRequest::builder()
        .market_type(MarketType::Spot)
        .spot_options(spot.build())
        .build()
}

pub async fn terminate(client: &Client, vm_ids: &[String]) -> Result<(), TaskError> {
    if vm_ids.is_empty() {
        return Ok(());
    }
    let result = client
        .terminate_instances()
        .set_instance_ids(Some(vm_ids.to_vec()))
        .send()
        .await;
    tolerate(
        result,
        &["InvalidInstanceID.NotFound"],
        "terminating the VM",
    )?;
    Ok(())
}

/// The AMI for `arch`: the configured one, else the newest official Debian 12 image.
pub async fn image(
    client: &Client,
    arch: &str,
    configured: Option<&str>,
) -> Result<String, TaskError> {
    if let Some(id) = configured {
        return Ok(id.to_string());
    }
    let debian_arch = if arch == "arm64" { "arm64" } else { "amd64" };
    let images = client
        .describe_images()
        .owners("136693071363")
        .filters(
            Filter::builder()
                .name("name")
                .values(format!("debian-12-{debian_arch}-*"))
                .build(),
        )
        .filters(Filter::builder().name("architecture").values(arch).build())
        .send()
        .await
        .map_err(|e| classify(e, "finding the Debian 12 image"))?;
    images
        .images()
        .iter()
        .max_by_key(|i| i.creation_date().unwrap_or_default().to_string())
        .and_then(|i| i.image_id())
        .map(str::to_string)
        .ok_or_else(|| {
            TaskError::fatal(format!(
                "no Debian 12 {arch} image found; set EC2_AMI_{}",
                arch.to_uppercase()
            ))
        })
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
