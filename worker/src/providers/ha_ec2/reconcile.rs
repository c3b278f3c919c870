//! The reconcile loop for `ha_ec2` clusters. One DescribeInstances per region and pass (every live VM tagged
//! `berth:instance`, 1,000 a page) tells which provisioned clusters lost a member's VM (a spot interruption, a
//! termination). Each such member slot gets a new VM in its zone, on its network interface (so its address, and
//! what its peers know of it, stays), with user-data in "join existing" mode: it removes the dead etcd member and
//! adds itself through the survivors, and Patroni clones it from the primary. Like a provision it is a step per
//! pass, so no pass waits for a VM to boot; two workers never replace one member twice (a per-instance advisory
//! lock), and clusters with an operation in progress are left to it. Where the worker reaches Patroni's REST
//! API, each pass also records the current primary and the members' roles.

use std::collections::{HashMap, HashSet};

use anyhow::Context as _;
use broker::{
    db::{instances, instances::InstanceRow},
    names,
};
use serde_json::json;
use sqlx::PgPool;
use tracing::{info, warn};

use super::{
    ENGINE, HaEc2, LaunchInput, members_details, not_ready, open_secrets, params::Params,
    resource_tags, state::ClusterState,
};
use crate::{
    context::Services,
    providers::{
        HA_EC2_LOCKS,
        ec2_common::{pooled, vm},
        lock_idle_instance,
        patroni::{record_recovery, roles_patch},
    },
    records::Record,
};

const PAGE: i64 = 1000;
/// What one pass looked at and did.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Pass {
    pub clusters: usize,
    pub describe_calls: u32,
    pub healing: usize,
}

pub async fn pass(engine: &HaEc2, pool: &PgPool, services: &Services) -> anyhow::Result<Pass> {
    let mut pass = Pass::default();
    let plan_ids = services.plan_ids_of_engine(ENGINE);
    if plan_ids.is_empty() {
        return Ok(pass);
    }
    let started = pooled::database_now(pool).await?;
    let mut live: HashMap<String, HashSet<String>> = HashMap::new();
    let mut after = String::new();
    loop {
        let page = instances::list_ready_page(pool, &plan_ids, &after, PAGE)
            .await
            .context("listing ha_ec2 clusters")?;
        let Some(last) = page.last() else { break };
        after = last.id.clone();
        for instance in page {
            let state = ClusterState::of(&instance.details);
            if state.members.is_empty() {
                continue;
            }
            pass.clusters += 1;
            let region = engine.region_of(None, &state);
            if !live.contains_key(&region) {
                let vms: HashSet<String> = vm::berth_vms_in_region(
                    &engine.account.client(&region),
                    &mut pass.describe_calls,
                )
                .await?
                .into_iter()
                .map(|v| v.id)
                .collect();
                live.insert(region.clone(), vms);
            }
            let vms = &live[&region];
            let lost = state
                .members
                .iter()
                .filter(|m| !m.retiring)
                .any(|m| m.replacing || m.vm_id.as_ref().is_none_or(|v| !vms.contains(v)));
            if lost {
                pass.healing += 1;
                if let Err(e) = heal(engine, pool, services, &instance.id).await {
                    warn!(instance_id = %instance.id, error = %format!("{e:#}"), "replacing a member's VM failed; will try again");
                }
            } else if engine.account.readiness_probe
                && let Err(e) = record_roles(engine, pool, services, &instance, &state).await
            {
                warn!(instance_id = %instance.id, error = %format!("{e:#}"), "reading the cluster's state from Patroni failed");
            }
        }
    }
    remove_pooled_missing_members(engine, pool, &plan_ids, &mut live, &mut pass, started).await?;
    Ok(pass)
}

/// Ready warm-pool clusters that lost a member's VM while they waited (a termination, a spot interruption):
/// nobody's instance yet, so no repair; the item is removed (its `pool.remove` tears down what is left by the
/// item's tag) and the pool check makes another. Only items ready before this pass began: their VMs ran before
/// it described any region.
async fn remove_pooled_missing_members(
    engine: &HaEc2,
    pool: &PgPool,
    plan_ids: &[String],
    live: &mut HashMap<String, HashSet<String>>,
    pass: &mut Pass,
    started: chrono::DateTime<chrono::Utc>,
) -> anyhow::Result<()> {
    for item in pooled::ready_before(pool, plan_ids, started).await? {
        let state = ClusterState::of(&item.details);
        let region = engine.region_of(None, &state);
        if !live.contains_key(&region) {
            let vms =
                vm::berth_vms_in_region(&engine.account.client(&region), &mut pass.describe_calls)
                    .await?
                    .into_iter()
                    .map(|v| v.id)
                    .collect();
            live.insert(region.clone(), vms);
        }
        let lost: Vec<&str> = state
            .members
            .iter()
            .filter(|m| !m.retiring)
            .filter(|m| m.vm_id.as_ref().is_none_or(|v| !live[&region].contains(v)))
            .map(|m| m.name.as_str())
            .collect();
        if lost.is_empty() {
            continue;
        }
        if pooled::remove(pool, &item.id).await? {
            warn!(pool_item = %item.id, members = ?lost, "a pooled cluster lost a member's VM while it waited; removing the item");
        }
    }
    Ok(())
}

/// One step of bringing a cluster back to N members, under its advisory lock.
async fn heal(
    engine: &HaEc2,
    pool: &PgPool,
    services: &Services,
    instance_id: &str,
) -> anyhow::Result<()> {
    let mut tx = pool.begin().await?;
    let Some(instance) = lock_idle_instance(&mut tx, HA_EC2_LOCKS, instance_id).await? else {
        return Ok(());
    };
    let mut state = ClusterState::of(&instance.details);
    let client = engine.account.client(&engine.region_of(None, &state));
    let params = Params::of(&instance.parameters).map_err(|e| anyhow::anyhow!("{e}"))?;
    let secrets = open_secrets(services, &instance).map_err(|e| anyhow::anyhow!("{e}"))?;
    let prefix = services.name_prefix();
    let tags = resource_tags(prefix, &instance, &params.tags);
    let owner = names::instance_owner_role(prefix, instance_id);
    let input = LaunchInput {
        client: &client,
        instance: &instance,
        params: &params,
        secrets: &secrets,
        tags: &tags,
        owner_role: &owner,
        record: Record::Instance(instance_id.to_string()),
    };
    // ensure_vms tells a VM that is gone from one a listing has not caught up with (it asks EC2 about that VM),
    // and launches a joining VM in each slot whose VM is gone (its generation goes up).
    let generations: HashMap<String, u32> = state
        .members
        .iter()
        .map(|m| (m.name.clone(), m.generation))
        .collect();
    let live = engine
        .ensure_vms(pool, &mut state, &input)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let replaced = replaced(&mut state, instance_id, &generations, &live);
    if replaced.is_empty() {
        state.save(pool, &input.record).await?;
        return Ok(tx.commit().await?);
    }
    let mut patch = json!({ "ha_ec2": state, "members": members_details(&state, None) });
    let recoveries = record_recovery(&mut patch, &instance.details, "recoveries", &replaced);
    instances::merge_details(&mut *tx, instance_id, &patch).await?;
    tx.commit().await?;
    info!(instance_id, replaced = ?replaced, recoveries, "the cluster's lost members run on new VMs");
    Ok(())
}

/// Marks the slots whose VM `ensure_vms` replaced (their generation went up since `generations`) as replacing,
/// and returns those whose replacement now runs (no longer replacing).
fn replaced(
    state: &mut ClusterState,
    instance_id: &str,
    generations: &HashMap<String, u32>,
    live: &HashMap<String, vm::Vm>,
) -> Vec<String> {
    for member in state.members.iter_mut() {
        if generations
            .get(&member.name)
            .is_some_and(|g| member.generation > *g)
        {
            warn!(instance_id, member = %member.name, zone = %member.zone, vm = ?member.vm_id, "a member's VM was gone; a replacement joins its peers");
            member.replacing = true;
        }
    }
    let mut replaced = Vec::new();
    for member in state.members.iter_mut().filter(|m| m.replacing) {
        if live.get(&member.name).is_some_and(|v| v.state == "running") {
            member.replacing = false;
            replaced.push(member.name.clone());
        }
    }
    replaced
}

/// Records the primary and the members' roles as Patroni reports them, when they changed.
async fn record_roles(
    engine: &HaEc2,
    pool: &PgPool,
    services: &Services,
    instance: &InstanceRow,
    state: &ClusterState,
) -> anyhow::Result<()> {
    let secrets = open_secrets(services, instance).map_err(|e| anyhow::anyhow!("{e}"))?;
    let view = engine
        .view(state, &secrets)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let members = members_details(state, Some(&view));
    let primary = view.leader().map(|l| l.name.as_str());
    let Some(patch) = roles_patch(&instance.details, members, primary) else {
        return Ok(());
    };
    if let Some(why) = not_ready(state, &view) {
        info!(instance_id = %instance.id, why, "the cluster is degraded");
    }
    instances::merge_details(pool, &instance.id, &patch).await?;
    Ok(())
}
