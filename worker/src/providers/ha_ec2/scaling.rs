//! An update of an `ha_ec2` cluster: `members` one member at a time (a new slot's VM joins its peers and runs
//! before the next change; removal retires one member that is not the primary, the synchronous standby last:
//! its name leaves the other VMs' `berth:members` tag, then its VM is terminated and its interface deleted, and
//! the members prune it from etcd once it no longer answers), and `synchronous`/`tuning_profile` through
//! Patroni's REST API when this worker reaches it.

use anyhow::Context as _;
use broker::db::{instances, instances::InstanceRow};
use serde_json::Value;
use tracing::info;

use super::{
    HaEc2, LaunchInput,
    access::api_base,
    host,
    members::{SlotVm, slot_vm},
    members_details, network, not_ready,
    params::Params,
    patroni_bases, patroni_http,
    state::{ClusterState, Secrets},
};
use crate::{
    context::TaskContext,
    providers::{
        Progress,
        ec2_common::vm,
        patroni::{ClusterView, Patroni, roles, settings},
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
    // 1. A member being removed: its VM terminated, then its interface and address, then its slot.
    if let Some(wait) = finish_removal(ctx, state, input).await? {
        return Ok(Some(wait));
    }
    // 2. Every slot has a running VM (a new member's included); with the probe, Patroni sees them streaming.
    let (view, primary) = match running_members(engine, ctx, state, input).await? {
        Ok(seen) => seen,
        Err(wait) => return Ok(Some(wait)),
    };
    // 3. One change toward `want`.
    let have = state.members.len();
    if have < want {
        return add_member(engine, ctx, state, input, want).await.map(Some);
    }
    if have > want {
        let victim = victim(state, view.as_ref(), primary.as_deref())?;
        return retire_member(ctx, state, input, victim, want)
            .await
            .map(Some);
    }
    Ok(None)
}

/// Step 1: the rest of a removal under way, if any. `Some(wait)` while its VM is still terminating.
async fn finish_removal(
    ctx: &TaskContext<'_>,
    state: &mut ClusterState,
    input: &LaunchInput<'_>,
) -> Result<Option<Progress<()>>, TaskError> {
    let (client, id) = (input.client, &input.instance.id);
    let Some(victim) = state.members.iter().find(|m| m.retiring).cloned() else {
        return Ok(None);
    };
    let left: Vec<String> = vm::live_vms(client, id)
        .await?
        .into_iter()
        .filter(|v| v.member.as_deref() == Some(victim.name.as_str()))
        .map(|v| v.id)
        .collect();
    if !left.is_empty() {
        vm::terminate(client, &left).await?;
        return Ok(Some(Progress::wait_secs(
            2,
            format!("removing member {}: terminating its VM", victim.name),
        )));
    }
    // Until it is terminated it holds the interface.
    if let Some(vm_id) = &victim.vm_id
        && !matches!(slot_vm(client, vm_id, None).await?, SlotVm::Gone)
    {
        return Ok(Some(Progress::wait_secs(
            2,
            format!(
                "removing member {}: waiting for its VM to terminate",
                victim.name
            ),
        )));
    }
    if let Some(interface) = &victim.interface_id {
        vm::delete_interface(client, interface).await?;
    }
    if let Some(allocation) = &victim.allocation_id {
        network::release_address(client, allocation).await?;
    }
    state.members.retain(|m| m.name != victim.name);
    state.save(ctx.pool, &input.record).await?;
    info!(instance_id = %id, member = %victim.name, "member removed");
    Ok(None)
}

/// Step 2: every slot's VM running and, with the readiness probe, Patroni's view of them all replicating;
/// the members and the primary recorded. `Err(wait)` until then.
async fn running_members<T>(
    engine: &HaEc2,
    ctx: &TaskContext<'_>,
    state: &mut ClusterState,
    input: &LaunchInput<'_>,
) -> Result<Result<(Option<ClusterView>, Option<String>), Progress<T>>, TaskError> {
    let (pool, client, id) = (ctx.pool, input.client, &input.instance.id);
    engine
        .ensure_interfaces(
            pool,
            client,
            &input.record,
            state,
            input.params.public_ip,
            input.tags,
        )
        .await?;
    let live = engine.ensure_vms(pool, state, input).await?;
    let running = state
        .members
        .iter()
        .filter(|m| live.get(&m.name).is_some_and(|v| v.state == "running"))
        .count();
    let have = state.members.len();
    if running < have {
        return Ok(Err(Progress::wait_secs(
            3,
            format!("{running} of {have} members' VMs running"),
        )));
    }
    let view = if engine.account.readiness_probe {
        let view = engine.view(state, input.secrets).await.ok();
        let why = match &view {
            Some(v) => not_ready(state, v),
            None => Some("Patroni does not answer yet".into()),
        };
        if let Some(why) = why {
            return Ok(Err(Progress::wait_secs(5, why)));
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
    let patch = roles(members_details(state, view.as_ref()), primary.as_deref());
    instances::merge_details(pool, id, &patch)
        .await
        .context("recording the cluster's members")?;
    Ok(Ok((view, primary)))
}

/// The VMs of the members that stay.
fn staying_vms(state: &ClusterState) -> Vec<String> {
    state
        .members
        .iter()
        .filter(|m| !m.retiring)
        .filter_map(|m| m.vm_id.clone())
        .collect()
}

/// Step 3, up: a new slot, its interface and its VM, which joins the others.
async fn add_member(
    engine: &HaEc2,
    ctx: &TaskContext<'_>,
    state: &mut ClusterState,
    input: &LaunchInput<'_>,
    want: usize,
) -> Result<Progress<()>, TaskError> {
    let (pool, client, id) = (ctx.pool, input.client, &input.instance.id);
    let have = state.members.len();
    let name = state.add_member(true);
    state.save(pool, &input.record).await?;
    ctx.progress(&format!("adding member {name} ({} of {want})", have + 1))
        .await?;
    // The others learn the new name before it exists, so their prune never takes it for a retired member.
    network::tag_wanted(client, &staying_vms(state), &state.wanted()).await?;
    engine
        .ensure_interfaces(
            pool,
            client,
            &input.record,
            state,
            input.params.public_ip,
            input.tags,
        )
        .await?;
    engine.ensure_vms(pool, state, input).await?;
    info!(instance_id = %id, member = %name, "member added");
    Ok(Progress::wait_secs(
        3,
        format!("adding member {name} ({} of {want})", have + 1),
    ))
}

/// The member a scale-down removes: the newest plain replica first; the synchronous standby only when no other
/// is left; never the primary.
fn victim(
    state: &ClusterState,
    view: Option<&ClusterView>,
    primary: Option<&str>,
) -> Result<String, TaskError> {
    let sync = |name: &str| {
        view.and_then(|v| v.member(name))
            .is_some_and(|m| m.role == "sync_standby")
    };
    state
        .members
        .iter()
        .rev()
        .filter(|m| Some(m.name.as_str()) != primary)
        .min_by_key(|m| sync(&m.name))
        .map(|m| m.name.clone())
        .ok_or_else(|| TaskError::fatal("no replica to remove"))
}

/// Step 3, down: `victim` marked retiring, its name gone from the others' tag, its VM terminated (step 1 of
/// the next runs finishes the removal).
async fn retire_member(
    ctx: &TaskContext<'_>,
    state: &mut ClusterState,
    input: &LaunchInput<'_>,
    victim: String,
    want: usize,
) -> Result<Progress<()>, TaskError> {
    let client = input.client;
    let have = state.members.len();
    if let Some(m) = state.member_mut(&victim) {
        m.retiring = true;
    }
    state.save(ctx.pool, &input.record).await?;
    ctx.progress(&format!(
        "removing member {victim} ({} of {want})",
        have - 1
    ))
    .await?;
    network::tag_wanted(client, &staying_vms(state), &state.wanted()).await?;
    if let Some(vm_id) = state.member(&victim).and_then(|m| m.vm_id.clone()) {
        vm::terminate(client, &[vm_id]).await?;
    }
    Ok(Progress::wait_secs(
        2,
        format!("removing member {victim} ({} of {want})", have - 1),
    ))
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
    let Some(old_profile) = settings::changed_from(instance, &params.cluster) else {
        return Ok(());
    };
    let http = patroni_http(secrets)?;
    let bases = patroni_bases(state);
    let patroni = Patroni::at(&http, bases.clone(), &secrets.passwords.restapi);
    let view = engine.view(state, secrets).await.map_err(|e| {
        TaskError::fatal(format!(
            "changing `synchronous` or `tuning_profile` is asked of Patroni, and this worker cannot reach its REST \
             API ({}): {e}",
            bases.join(", ")
        ))
    })?;
    let members = state
        .members
        .iter()
        .filter(|m| !m.retiring)
        .filter_map(|m| Some((m.name.clone(), api_base(host(m)?))))
        .collect();
    settings::apply(
        ctx,
        instance,
        &patroni,
        &view,
        members,
        old_profile,
        &params.cluster,
    )
    .await
}
