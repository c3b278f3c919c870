//! Launching a VM: the RunInstances request (its network interface, scratch disk, spot options), and the
//! "no capacity" answer that sends the caller on to the next instance type.

use aws_sdk_ec2::{
    Client,
    types::{
        BlockDeviceMapping, EbsBlockDevice, InstanceInterruptionBehavior,
        InstanceMarketOptionsRequest, InstanceMetadataOptionsRequest, InstanceMetadataTagsState,
        InstanceNetworkInterfaceSpecification, InstanceType, MarketType, Placement, ResourceType,
        SpotInstanceType, SpotMarketOptions, VolumeType,
    },
};
use base64::Engine as _;

use super::{
    super::errors::{classify, code, is_capacity},
    DEVICE, Vm, tags,
};
use crate::registry::TaskError;

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
