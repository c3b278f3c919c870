//! Eviction recovery, in the worker's reconcile loop. One DescribeInstances per region and cycle (1,000 VMs a
//! page, every VM tagged `berth:instance`) tells which provisioned instances lost their VM; each of those gets a
//! new VM in its data volume's zone (the volume cannot move), launched by the same candidate loop as a provision,
//! with types that lived under five minutes moved to the end. Like a provision it is a step per cycle, so no
//! cycle waits for a VM to boot: launch → (next cycles) running → volume re-attached, Elastic IP re-associated,
//! addresses recorded, bindings' credentials pointed at the new host, the connection delivered again.

use std::collections::HashMap;

use anyhow::Context as _;
use aws_sdk_ec2::Client;
use broker::{
    db::{bindings, instances, instances::InstanceRow},
    names,
};
use serde_json::{Map, Value, json};
use sqlx::PgPool;
use tracing::{info, warn};

use super::{ENGINE, Ec2Postgres, Params, Secrets, State, provision::LaunchInput, resource_tags};
use crate::providers::{
    EC2_LOCKS,
    ec2_common::{available_zones, pooled, vm},
    lock_idle_instance,
};
use crate::{context::Services, records::Record, registry::TaskError};

/// A VM that vanished within this many seconds of its launch marks its type as short-lived.
const SHORT_LIFE_SECS: i64 = 300;
const PAGE: i64 = 1000;
/// What one reconcile pass did (the benchmark prints it).
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Cycle {
    pub instances: usize,
    pub describe_calls: u32,
    /// Time spent waiting for EC2's DescribeInstances answers.
    pub describe_ms: f64,
    pub recovering: usize,
}

/// Forgets the instance's VM; its type goes last when the VM lived under five minutes.
pub fn forget_vm(state: &mut State) {
    let now = chrono::Utc::now().timestamp();
    if let (Some(kind), Some(at)) = (&state.instance_type, state.launched_at)
        && now - at < SHORT_LIFE_SECS
        && !state.short_lived_types.contains(kind)
    {
        state.short_lived_types.push(kind.clone());
    }
    let late = state.short_lived_types.clone();
    let (kept, demoted): (Vec<_>, Vec<_>) = std::mem::take(&mut state.candidates)
        .into_iter()
        .partition(|c| !late.contains(&c.instance_type));
    state.candidates = kept.into_iter().chain(demoted).collect();
    state.candidate_index = 0;
    state.vm_id = None;
    state.launched_at = None;
    state.ip_private = None;
    state.ip_public = None;
}

/// The region's first available zone (for on-demand types, which have no per-zone price).
pub async fn first_zone(client: &Client) -> Result<String, TaskError> {
    Ok(available_zones(client).await?.swap_remove(0))
}

/// With the VM running: the data volume on it, the Elastic IP on it, its addresses recorded in `state`.
pub async fn settle(
    client: &Client,
    state: &mut State,
    running: &vm::Vm,
    volume: &vm::Volume,
) -> Result<(), TaskError> {
    match volume.attached_to.as_deref() {
        Some(vm) if vm == running.id => {}
        // The old VM still holds it (stopping, or terminating): it comes free when that VM is gone.
        Some(other) => {
            return Err(TaskError::retryable(format!(
                "the data volume is still attached to VM {other}; waiting"
            )));
        }
        None => vm::attach(client, &volume.id, &running.id).await?,
    }
    if let Some(allocation) = &state.allocation_id {
        vm::associate(client, allocation, &running.id).await?;
    }
    state.ip_private = running.private_ip.clone();
    state.ip_public = running.public_ip.clone();
    Ok(())
}

/// One pass over every provisioned `ec2` instance no operation is working on.
pub async fn reconcile(
    engine: &Ec2Postgres,
    pool: &PgPool,
    services: &Services,
) -> anyhow::Result<Cycle> {
    let mut cycle = Cycle::default();
    let plan_ids = services.plan_ids_of_engine(ENGINE);
    if plan_ids.is_empty() {
        return Ok(cycle);
    }
    let started = pooled::database_now(pool).await?;
    let mut live: HashMap<String, HashMap<String, vm::Vm>> = HashMap::new();
    let mut after = String::new();
    loop {
        let page = instances::list_ready_page(pool, &plan_ids, &after, PAGE)
            .await
            .context("listing ec2 instances")?;
        let Some(last) = page.last() else { break };
        after = last.id.clone();
        for instance in page {
            cycle.instances += 1;
            let state = State::of(&instance.details);
            let region = engine.region_of(None, &state);
            if !live.contains_key(&region) {
                let started = std::time::Instant::now();
                let vms: HashMap<String, vm::Vm> =
                    vm::berth_vms_in_region(&engine.client(&region), &mut cycle.describe_calls)
                        .await?
                        .into_iter()
                        .map(|v| (v.id.clone(), v))
                        .collect();
                cycle.describe_ms += started.elapsed().as_secs_f64() * 1e3;
                live.insert(region.clone(), vms);
            }
            let has_vm = state
                .vm_id
                .as_ref()
                .is_some_and(|id| live[&region].contains_key(id));
            if has_vm && !state.recovering {
                continue;
            }
            cycle.recovering += 1;
            if let Err(e) = recover(engine, pool, services, &instance.id).await {
                warn!(instance_id = %instance.id, error = %format!("{e:#}"), "replacing a vanished VM failed; will try again");
            }
        }
    }
    remove_pooled_without_vm(engine, pool, &plan_ids, &mut live, &mut cycle, started).await?;
    Ok(cycle)
}

/// Ready warm-pool items whose VM went while they waited (a spot interruption): nobody's instance yet, so no
/// recovery; the item is removed (its `pool.remove` tears down what is left by the item's tag) and the pool
/// check makes another. Only items ready before this pass began (the database's clock): their VMs ran before it
/// described any region.
async fn remove_pooled_without_vm(
    engine: &Ec2Postgres,
    pool: &PgPool,
    plan_ids: &[String],
    live: &mut HashMap<String, HashMap<String, vm::Vm>>,
    cycle: &mut Cycle,
    started: chrono::DateTime<chrono::Utc>,
) -> anyhow::Result<()> {
    for item in pooled::ready_before(pool, plan_ids, started).await? {
        let state = State::of(&item.details);
        let region = engine.region_of(None, &state);
        if !live.contains_key(&region) {
            let vms = vm::berth_vms_in_region(&engine.client(&region), &mut cycle.describe_calls)
                .await?
                .into_iter()
                .map(|v| (v.id.clone(), v))
                .collect();
            live.insert(region.clone(), vms);
        }
        if state
            .vm_id
            .as_ref()
            .is_some_and(|id| live[&region].contains_key(id))
        {
            continue;
        }
        if pooled::remove(pool, &item.id).await? {
            warn!(pool_item = %item.id, vm = ?state.vm_id, "a pooled VM is gone (interrupted while it waited); removing the item");
        }
    }
    Ok(())
}

/// One step of replacing an instance's VM, under its advisory lock (so two workers never launch two).
async fn recover(
    engine: &Ec2Postgres,
    pool: &PgPool,
    services: &Services,
    instance_id: &str,
) -> anyhow::Result<()> {
    let mut tx = pool.begin().await?;
    let Some(instance) = lock_idle_instance(&mut tx, EC2_LOCKS, instance_id).await? else {
        return Ok(());
    };
    let mut state = State::of(&instance.details);
    let region = engine.region_of(None, &state);
    let client = engine.client(&region);
    if !state.recovering {
        warn!(instance_id, vm = ?state.vm_id, "the instance's VM is gone; launching a replacement in {:?}", state.zone);
        // A VM that is merely stopped (or stopping) still holds the volume: it goes for good.
        // Best effort: one already terminated needs nothing (moto even refuses it).
        if let Some(old) = &state.vm_id
            && let Err(e) = vm::terminate(&client, std::slice::from_ref(old)).await
        {
            warn!(instance_id, vm = %old, error = %e, "terminating the old VM failed");
        }
        forget_vm(&mut state);
        state.recovering = true;
        state.generation += 1;
        state
            .save(pool, &Record::Instance(instance_id.to_string()))
            .await?;
    }
    let volume = vm::data_volume(&client, instance_id)
        .await?
        .ok_or_else(|| {
            anyhow::anyhow!(
                "the instance's data volume is gone; deprovision and provision it again"
            )
        })?;
    state.zone = Some(volume.zone.clone());
    let Some(vm_id) = state.vm_id.clone() else {
        launch_replacement(
            engine, pool, services, &instance, &mut state, &client, &volume,
        )
        .await?;
        return Ok(tx.commit().await?);
    };
    let running = match vm::vm(&client, &vm_id).await? {
        Some(found) if found.state == "running" => found,
        Some(found) if found.state == "pending" => return Ok(tx.commit().await?),
        // Evicted again before it ran: the next cycle launches another.
        _ => {
            forget_vm(&mut state);
            state
                .save(pool, &Record::Instance(instance_id.to_string()))
                .await?;
            return Ok(tx.commit().await?);
        }
    };
    super::recovery::settle(&client, &mut state, &running, &volume).await?;
    state.recovering = false;
    let host = state.host().unwrap_or_default().to_string();
    let recoveries = instance
        .details
        .get("recoveries")
        .and_then(Value::as_i64)
        .unwrap_or(0)
        + 1;
    instances::merge_details(
        &mut *tx,
        instance_id,
        &json!({ "ec2": state, "host": host, "recoveries": recoveries, "last_recovered_at": chrono::Utc::now() }),
    )
    .await?;
    point_bindings_at(&mut tx, services, instance_id, &host).await?;
    tx.commit().await?;
    info!(instance_id, vm = %running.id, host, recoveries, "the instance runs on a new VM");
    crate::delivery::after_creation(services, pool, instance_id).await;
    Ok(())
}

async fn launch_replacement(
    engine: &Ec2Postgres,
    pool: &PgPool,
    services: &Services,
    instance: &InstanceRow,
    state: &mut State,
    client: &Client,
    volume: &vm::Volume,
) -> anyhow::Result<()> {
    let spot = super::is_spot(services, &instance.plan_id);
    // The version the instance was made with (recorded), not what the plan's default may be by now.
    let version = instance
        .details
        .get("postgres_version")
        .and_then(Value::as_str)
        .map_or_else(
            || super::default_version(services, &instance.plan_id),
            str::to_string,
        );
    let params =
        Params::of(&instance.parameters, spot, &version).map_err(|e| anyhow::anyhow!("{e}"))?;
    let sealed = instance
        .secrets
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("the instance has no stored secrets"))?;
    let secrets: Secrets = services.cipher.open_json(sealed)?;
    let prefix = services.name_prefix();
    // The tuning profile an update applied since, else the one it was made with.
    let tuning_profile = instance
        .details
        .get("tuning_profile")
        .and_then(Value::as_str)
        .unwrap_or(&params.tuning_profile);
    let user_data = super::user_data(
        prefix,
        instance,
        &params,
        &secrets,
        &volume.id,
        tuning_profile,
    )?;
    let tags = resource_tags(prefix, &instance.id, &params.tags);
    let input = LaunchInput {
        client,
        spot,
        max_price: params.requirements.max_price,
        public_ip: params.public_ip,
        user_data: &user_data.0,
        tags: &tags,
        token: format!("{}-r{}", names::short_hash(&instance.id), state.generation),
    };
    if !engine
        .launch_next(pool, &Record::Instance(instance.id.clone()), state, &input)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?
    {
        anyhow::bail!(
            "no candidate instance type had capacity in {:?}; trying again next cycle",
            state.zone
        );
    }
    Ok(())
}

/// Rewrites the host in every binding's stored credentials (GET binding then returns the new one).
async fn point_bindings_at(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    services: &Services,
    instance_id: &str,
    host: &str,
) -> anyhow::Result<()> {
    for binding in bindings::list_for_instance(&mut **tx, instance_id).await? {
        let Some(sealed) = &binding.credentials else {
            continue;
        };
        let mut credentials: Map<String, Value> = services.cipher.open_json(sealed)?;
        for key in ["DATABASE_URL", "uri"] {
            if let Some(Value::String(text)) = credentials.get(key)
                && let Ok(mut url) = url::Url::parse(text)
                && url.set_host(Some(host)).is_ok()
            {
                credentials.insert(key.into(), Value::String(url.into()));
            }
        }
        if credentials.contains_key("PGHOST") {
            credentials.insert("PGHOST".into(), Value::String(host.into()));
        }
        let mut details = binding.details.clone();
        if let Some(endpoints) = details.get_mut("endpoints").and_then(Value::as_array_mut) {
            for endpoint in endpoints {
                endpoint["host"] = Value::String(host.into());
            }
        }
        bindings::set_credentials(
            &mut **tx,
            &binding.id,
            &details,
            Some(&services.cipher.seal_json(&credentials)),
        )
        .await?;
    }
    Ok(())
}
