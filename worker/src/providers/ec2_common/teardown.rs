//! The teardown of one instance's EC2 resources, found by their `berth:instance` tag: first the VMs, and only once
//! every one is terminated the volumes, Elastic IPs, network interfaces and the security group (they free up
//! with their VMs). Each step skips what is gone, so a run after a crash goes on where the last one stopped.

use std::time::Duration;

use aws_sdk_ec2::{
    Client,
    types::{Filter, InstanceStateName},
};
use broker::db::instances::InstanceRow;

use super::{
    errors::{classify, code, tolerate},
    vm::{self, address, delete_interface, describe, tag_filter},
};
use crate::{
    providers::{Progress, aws::errors::tolerate_codes},
    registry::TaskError,
};

/// One pass of the teardown: `Wait` (`poll` later) while VMs are going, `Done` once everything is deleted.
/// `vms` is how the progress names the instance's VMs ("VM", "VMs"); `group_name` is its security group.
pub async fn tear_down(
    client: &Client,
    instance_id: &str,
    group_name: &str,
    poll: Duration,
    vms: &str,
) -> Result<Progress<()>, TaskError> {
    tear_down_all(client, &[instance_id], &[group_name], poll, vms).await
}

/// The deprovision's teardown of `instance`: an instance that took a pool item may hold resources under the item's
/// id (what a failed take left) and a security group named after it (`group_of` names an id's group).
pub async fn tear_down_instance(
    client: &Client,
    instance: &InstanceRow,
    group_of: impl Fn(&str) -> String,
    poll: Duration,
    vms: &str,
) -> Result<Progress<()>, TaskError> {
    let pool_item = instance
        .details
        .get("pool_item")
        .and_then(serde_json::Value::as_str);
    let keys: Vec<&str> = std::iter::once(instance.id.as_str())
        .chain(pool_item)
        .collect();
    let groups: Vec<String> = keys.iter().map(|key| group_of(key)).collect();
    let groups: Vec<&str> = groups.iter().map(String::as_str).collect();
    tear_down_all(client, &keys, &groups, poll, vms).await
}

/// [`tear_down`] of the resources tagged with any of `keys` (an instance that took a warm-pool item may hold
/// some under the item's id) and the security groups named `group_names`: every VM is terminated before any
/// volume or group goes, whichever key it carries.
pub async fn tear_down_all(
    client: &Client,
    keys: &[&str],
    group_names: &[&str],
    poll: Duration,
    vms: &str,
) -> Result<Progress<()>, TaskError> {
    let wait = |progress: String| Progress::Wait {
        after: poll,
        progress,
    };
    let mut live = Vec::new();
    for key in keys {
        live.extend(vm::live_vms(client, key).await?);
    }
    if !live.is_empty() {
        let ids: Vec<String> = live.iter().map(|v| v.id.clone()).collect();
        vm::terminate(client, &ids).await?;
        return Ok(wait(format!("terminating {vms} {}", ids.join(", "))));
    }
    for key in keys {
        if !all_terminated(client, key).await? {
            return Ok(wait(format!("waiting for the {vms} to terminate")));
        }
    }
    for key in keys {
        delete_volumes(client, key).await?;
        release_addresses(client, key).await?;
        delete_interfaces(client, key).await?;
    }
    for group_name in group_names {
        delete_security_group(client, group_name).await?;
    }
    Ok(Progress::Done(()))
}

/// Whether every VM of the instance is gone (terminated): the volume and the group can go next.
async fn all_terminated(client: &Client, instance_id: &str) -> Result<bool, TaskError> {
    let vms = describe(client, vec![tag_filter(instance_id)], &mut 0).await?;
    Ok(vms
        .iter()
        .all(|v| v.state == InstanceStateName::Terminated.as_str()))
}

async fn delete_volumes(client: &Client, instance_id: &str) -> Result<(), TaskError> {
    let volumes = client
        .describe_volumes()
        .filters(tag_filter(instance_id))
        .send()
        .await
        .map_err(|e| classify(e, "listing the instance's volumes"))?;
    for volume in volumes.volumes() {
        let id = volume.volume_id().unwrap_or_default();
        tolerate(
            client.delete_volume().volume_id(id).send().await,
            &["InvalidVolume.NotFound"],
            "deleting a volume",
        )?;
    }
    Ok(())
}

async fn release_addresses(client: &Client, instance_id: &str) -> Result<(), TaskError> {
    while let Some((allocation, _, association)) = address(client, instance_id).await? {
        if let Some(association) = association {
            let _ = client
                .disassociate_address()
                .association_id(association)
                .send()
                .await;
        }
        client
            .release_address()
            .allocation_id(&allocation)
            .send()
            .await
            .map_err(|e| classify(e, "releasing the Elastic IP"))?;
    }
    Ok(())
}

async fn delete_interfaces(client: &Client, instance_id: &str) -> Result<(), TaskError> {
    let interfaces = client
        .describe_network_interfaces()
        .filters(tag_filter(instance_id))
        .send()
        .await
        .map_err(|e| classify(e, "listing the instance's network interfaces"))?;
    for interface in interfaces.network_interfaces() {
        delete_interface(client, interface.network_interface_id().unwrap_or_default()).await?;
    }
    Ok(())
}

async fn delete_security_group(client: &Client, group_name: &str) -> Result<(), TaskError> {
    let groups = client
        .describe_security_groups()
        .filters(
            Filter::builder()
                .name("group-name")
                .values(group_name)
                .build(),
        )
        .send()
        .await
        .map_err(|e| classify(e, "looking for the security group"))?;
    for group in groups.security_groups() {
        let deleted = client
            .delete_security_group()
            .group_id(group.group_id().unwrap_or_default())
            .send()
            .await;
        match tolerate_codes(deleted, &["InvalidGroup.NotFound"]) {
            Ok(_) => {}
            // Still in use by a network interface that is going away with its VM.
            Err(e) if code(&e).as_deref() == Some("DependencyViolation") => {
                return Err(TaskError::retryable(
                    "the security group is still in use; trying again",
                ));
            }
            Err(e) => return Err(classify(e, "deleting the security group")),
        }
    }
    Ok(())
}
