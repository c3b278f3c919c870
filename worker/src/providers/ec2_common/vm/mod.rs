//! The EC2 resources of one instance, each found by its `berth:instance` tag before it is made, so a retry after
//! a crash adopts what the first try made: the VM (`launch.rs`), the security group and Elastic IP (`network.rs`)
//! and the data volume (`volume.rs`). This file: the tags, and describing, terminating and imaging VMs.

mod launch;
mod network;
mod volume;

use aws_sdk_ec2::{
    Client,
    types::{Filter, ResourceType, Tag, TagSpecification},
};

use super::errors::{classify, tolerate};
use crate::registry::TaskError;

pub use launch::{Launch, LaunchError, launch};
pub use network::{
    address, associate, authorize_ingress, delete_interface, ensure_address, ensure_security_group,
    subnet,
};
pub use volume::{Volume, attach, data_volume, ensure_data_volume};

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

/// Gives `pairs` (its `berth:instance` replacing the old one) to every resource tagged `berth:instance=<from>`
/// and to `also` (resources the caller knows of, tagged already on a retry): one DescribeTags and one
/// CreateTags, so doing it again is harmless. Returns the resources tagged.
pub async fn retag(
    client: &Client,
    from: &str,
    also: &[String],
    pairs: &[(String, String)],
) -> Result<Vec<String>, TaskError> {
    let found = client
        .describe_tags()
        .filters(Filter::builder().name("key").values(TAG).build())
        .filters(Filter::builder().name("value").values(from).build())
        .send()
        .await
        .map_err(|e| classify(e, "listing the resources to tag again"))?;
    let mut ids = also.to_vec();
    for id in found.tags().iter().filter_map(|t| t.resource_id()) {
        if !ids.iter().any(|known| known == id) {
            ids.push(id.to_string());
        }
    }
    if ids.is_empty() {
        return Ok(ids);
    }
    client
        .create_tags()
        .set_resources(Some(ids.clone()))
        .set_tags(Some(
            pairs
                .iter()
                .map(|(k, v)| Tag::builder().key(k).value(v).build())
                .collect(),
        ))
        .send()
        .await
        .map_err(|e| classify(e, "tagging the resources again"))?;
    Ok(ids)
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
    Ok(vms(client, &[vm_id.to_string()]).await?.into_iter().next())
}

/// The VMs EC2 knows of `vm_ids` (in any state), in one DescribeInstances.
pub async fn vms(client: &Client, vm_ids: &[String]) -> Result<Vec<Vm>, TaskError> {
    if vm_ids.is_empty() {
        return Ok(Vec::new());
    }
    let filter = Filter::builder()
        .name("instance-id")
        .set_values(Some(vm_ids.to_vec()))
        .build();
    describe(client, vec![filter], &mut 0).await
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
