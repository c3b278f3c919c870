//! An update of an `ha_ec2` cluster: `members` one member at a time (a new slot's VM joins its peers and runs
//! before the next change; removal retires one member that is not the primary, the synchronous standby last:
//! its name leaves the other VMs' `berth:members` tag, then its VM is terminated and its interface deleted, and
//! the members prune it from etcd once it no longer answers), and `synchronous`/`tuning_profile` through
//! Patroni's REST API when this worker reaches it.

use anyhow::Context as _;
use broker::db::{instances, instances::InstanceRow};
use serde_json::{Value, json};
use tracing::info;

use super::{
    HaEc2, LaunchInput,
    members::{SlotVm, slot_vm},
    members_details, network, not_ready,
    params::Params,
    patroni_bases, patroni_http,
    state::{ClusterState, Secrets},
    wait,
};
use crate::{
    context::TaskContext,
    providers::{
        Progress,
        ec2_common::vm,
        ha_local::{patroni::Patroni, settings::parameter_patch},
    },
    registry::TaskError,
};

/// One step toward `want` members. `Some(wait)` while there is more to do.
pub async fn step(
    engine: &HaEc2,
    ctx: &TaskContext<'_>,
    state: &mut ClusterState,
    input: &LaunchInput<'_>,
    want: usize,
) -> Result<Option<Progress<()>>, TaskError> {
    let (pool, client, id) = (ctx.pool, input.client, &input.instance.id);
    // 1. A member being removed: its VM terminated, then its interface and address, then its slot.
    if let Some(victim) = state.members.iter().find(|m| m.retiring).cloned() {
        let left: Vec<String> = vm::live_vms(client, id)
            .await?
            .into_iter()
            .filter(|v| v.member.as_deref() == Some(victim.name.as_str()))
            .map(|v| v.id)
            .collect();
        if !left.is_empty() {
            vm::terminate(client, &left).await?;
            return Ok(Some(wait(
                2,
                format!("removing member {}: terminating its VM", victim.name),
            )?));
        }
        // Until it is terminated it holds the interface.
        if let Some(vm_id) = &victim.vm_id
            && !matches!(slot_vm(client, vm_id, None).await?, SlotVm::Gone)
        {
            return Ok(Some(wait(
                2,
                format!(
                    "removing member {}: waiting for its VM to terminate",
                    victim.name
                ),
            )?));
        }
        if let Some(interface) = &victim.interface_id {
            vm::delete_interface(client, interface).await?;
        }
        if let Some(allocation) = &victim.allocation_id {
            network::release_address(client, allocation).await?;
        }
        state.members.retain(|m| m.name != victim.name);
        state.save(pool, id).await?;
        info!(instance_id = %id, member = %victim.name, "member removed");
    }

    // 2. Every slot has a running VM (a new member's included); with the probe, Patroni sees them streaming.
    engine
        .ensure_interfaces(pool, client, id, state, input.params.public_ip, input.tags)
        .await?;
    let live = engine.ensure_vms(pool, state, input).await?;
    let running = state
        .members
        .iter()
        .filter(|m| live.get(&m.name).is_some_and(|v| v.state == "running"))
        .count();
    let have = state.members.len();
    if running < have {
        return Ok(Some(wait(
            3,
            format!("{running} of {have} members' VMs running"),
        )?));
    }
    let view = if engine.account.readiness_probe {
        let view = engine.view(state, input.secrets).await.ok();
        let why = match &view {
            Some(v) => not_ready(state, v),
            None => Some("Patroni does not answer yet".into()),
        };
        if let Some(why) = why {
            return Ok(Some(wait(5, why)?));
        }
        view
    } else {
        None
    };
    let primary = view
        .as_ref()
        .and_then(|v| v.leader())
        .map(|l| l.name.clone())
        .or_else(|| {
            input
                .instance
                .details
                .get("primary")
                .and_then(Value::as_str)
                .map(str::to_string)
        });
    let mut patch = json!({ "members": members_details(state, view.as_ref()) });
    if let Some(primary) = &primary {
        patch["primary"] = json!(primary);
    }
    instances::merge_details(pool, id, &patch)
        .await
        .context("recording the cluster's members")?;

    // 3. One change toward `want`.
    let vm_ids = |state: &ClusterState| -> Vec<String> {
        state
            .members
            .iter()
            .filter(|m| !m.retiring)
            .filter_map(|m| m.vm_id.clone())
            .collect()
    };
    if have < want {
        let name = state.add_member(true);
        state.save(pool, id).await?;
        ctx.progress(&format!("adding member {name} ({} of {want})", have + 1))
            .await?;
        // The others learn the new name before it exists, so their prune never takes it for a retired member.
        network::tag_wanted(client, &vm_ids(state), &state.wanted()).await?;
        engine
            .ensure_interfaces(pool, client, id, state, input.params.public_ip, input.tags)
            .await?;
        engine.ensure_vms(pool, state, input).await?;
        info!(instance_id = %id, member = %name, "member added");
        return Ok(Some(wait(
            3,
            format!("adding member {name} ({} of {want})", have + 1),
        )?));
    }
    if have > want {
        // The newest plain replica first; the synchronous standby only when no other is left; never the primary.
        let sync = |name: &str| {
            view.as_ref()
                .and_then(|v| v.member(name))
                .is_some_and(|m| m.role == "sync_standby")
        };
        let victim = state
            .members
            .iter()
            .rev()
            .filter(|m| Some(&m.name) != primary.as_ref())
            .min_by_key(|m| sync(&m.name))
            .map(|m| m.name.clone())
            .ok_or_else(|| TaskError::fatal("no replica to remove"))?;
        if let Some(m) = state.member_mut(&victim) {
            m.retiring = true;
        }
        state.save(pool, id).await?;
        ctx.progress(&format!(
            "removing member {victim} ({} of {want})",
            have - 1
        ))
        .await?;
        network::tag_wanted(client, &vm_ids(state), &state.wanted()).await?;
        if let Some(vm_id) = state.member(&victim).and_then(|m| m.vm_id.clone()) {
            vm::terminate(client, &[vm_id]).await?;
        }
        return Ok(Some(wait(
            2,
            format!("removing member {victim} ({} of {want})", have - 1),
        )?));
    }
    Ok(None)
}

/// `synchronous` and `tuning_profile` to Patroni's configuration (`PATCH /config`), then the members that need
/// a restart restarted, replicas first. Needs the worker to reach the members' REST API.
pub async fn apply_settings(
    engine: &HaEc2,
    ctx: &TaskContext<'_>,
    instance: &InstanceRow,
    state: &ClusterState,
    secrets: &Secrets,
    params: &Params,
) -> Result<(), TaskError> {
    let synchronous = instance
        .details
        .get("synchronous")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let profile = instance
        .details
        .get("tuning_profile")
        .and_then(Value::as_str)
        .unwrap_or("default");
    let new_profile = params.cluster.server.tuning_profile.as_str();
    if synchronous == params.cluster.synchronous && profile == new_profile {
        return Ok(());
    }
    let http = patroni_http(secrets)?;
    let bases = patroni_bases(state);
    let patroni = Patroni::at(&http, bases.clone(), &secrets.restapi);
    let view = engine.view(state, secrets).await.map_err(|e| {
        TaskError::fatal(format!(
            "changing `synchronous` or `tuning_profile` is asked of Patroni, and this worker cannot reach its REST \
             API ({}): {e}",
            bases.join(", ")
        ))
    })?;
    ctx.progress("applying the cluster's settings").await?;
    let patch = json!({
        "synchronous_mode": params.cluster.synchronous,
        "postgresql": { "parameters": parameter_patch(profile, new_profile) },
    });
    let (status, text) = patroni
        .change(reqwest::Method::PATCH, "/config", &patch)
        .await
        .map_err(TaskError::Retryable)?;
    if !(200..300).contains(&status) {
        return Err(TaskError::retryable(format!(
            "Patroni refused the new configuration ({status}): {text}"
        )));
    }
    // Patroni applies it within a loop; a pending restart shows up only then.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let mut order: Vec<_> = state.members.iter().filter(|m| !m.retiring).collect();
    order.sort_by_key(|m| view.member(&m.name).is_some_and(|v| v.is_leader()));
    for member in order {
        let Some(host) = super::host(member) else {
            continue;
        };
        let one = Patroni::at(
            &http,
            vec![format!("https://{host}:{}", super::API_PORT)],
            &secrets.restapi,
        );
        let (status, text) = one
            .change(
                reqwest::Method::POST,
                "/restart",
                &json!({ "restart_pending": true }),
            )
            .await
            .map_err(TaskError::Retryable)?;
        // 503 "restart conditions are not satisfied": nothing pending.
        if !(200..300).contains(&status) && status != 503 {
            return Err(TaskError::retryable(format!(
                "Patroni refused to restart member {} ({status}): {text}",
                member.name
            )));
        }
    }
    instances::merge_details(
        ctx.pool,
        &instance.id,
        &json!({ "synchronous": params.cluster.synchronous, "tuning_profile": new_profile }),
    )
    .await
    .context("recording the cluster's settings")?;
    Ok(())
}
