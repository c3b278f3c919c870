//! The data volume that outlives an instance's VMs: found by its tags, made once, attached to the VM.

use aws_sdk_ec2::{
    Client,
    types::{Filter, ResourceType, VolumeType},
};

use super::{
    super::errors::{classify, tolerate},
    DEVICE, ROLE_TAG, tag_filter, tags,
};
use crate::registry::TaskError;

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
