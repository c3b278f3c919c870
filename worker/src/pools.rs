//! Warm pools on the worker side (docs/pools.md). Every `POOL_CHECK_MS` one worker at a time (an advisory lock)
//! looks at the pools: it recycles ready items older than `POOL_MAX_AGE_SECS`, drains plans whose target fell
//! (or that lost it), removes what a fill that failed for good left, and, when no user task is due, starts fills
//! up to each plan's target. Fills and removals are tasks (`pool.fill`, `pool.remove`) with the queue's leases,
//! so a worker killed while filling leaves the task to another, which finishes the item with the same
//! idempotent provision steps. A pool of a preset's clones follows the preset: clones of a version it no longer
//! clones (a newer one is ready, or the version is gone) are recycled and the pool refilled with the current one.

use std::{
    collections::{HashMap, hash_map::Entry},
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use broker::{
    db::{instances::InstanceRow, pools, presets, snapshots},
    pools::{PoolKey, PresetPin},
};
use chrono::Utc;
use serde_json::json;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use uuid::Uuid;

use crate::context::Services;

/// A fill is due this long after it is enqueued: user tasks enqueued meanwhile are claimed before it (claims
/// go in `run_at` order), so filling a pool never delays a provision that is waiting.
pub const FILL_DELAY_MS: i64 = 200;

/// Runs until `stop` is cancelled.
pub async fn run(pool: PgPool, services: Arc<Services>, stop: CancellationToken) {
    let every = Duration::from_millis(services.settings.pool_check_ms.max(50));
    loop {
        if let Err(e) = check(&pool, &services).await {
            warn!(error = %format!("{e:#}"), "checking the warm pools failed; trying again next tick");
        }
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = services.pool_check_now.notified() => {}
            () = stop.cancelled() => return,
        }
    }
}

/// What one check did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Checked {
    pub fills: usize,
    pub removals: usize,
}

/// One pass over the pools (see the module's comment). Another worker's pass under way: nothing.
pub async fn check(pool: &PgPool, services: &Services) -> anyhow::Result<Checked> {
    let mut tx = pool.begin().await.context("starting the pool check")?;
    let locked: bool =
        sqlx::query_scalar("SELECT pg_try_advisory_xact_lock(hashtext('berth.pools'))")
            .fetch_one(&mut *tx)
            .await
            .context("taking the pools lock")?;
    if !locked {
        return Ok(Checked::default());
    }
    let targets = &services.pool_targets;
    let max_age = chrono::Duration::seconds(
        i64::try_from(services.settings.pool_max_age_secs).unwrap_or(i64::MAX / 1000),
    );
    let served_here = |plan_id: &str| services.provider_for_plan(plan_id).is_ok();
    let mut done = Checked::default();

    let items = pools::list(&mut *tx).await.context("listing pool items")?;
    // The version each preset pool clones now (`None`: no such preset or no ready version): clones of
    // another version are recycled, so a new version replaces the pooled clones of the old one.
    let mut versions: HashMap<String, Option<Uuid>> = HashMap::new();
    let labels = targets
        .iter()
        .filter_map(|(key, _)| key.preset.as_ref().map(PresetPin::label))
        .chain(items.iter().filter_map(|i| i.preset_target.clone()));
    for label in labels {
        if let Entry::Vacant(slot) = versions.entry(label) {
            let version = current_version(&mut tx, slot.key()).await?;
            slot.insert(version);
        }
    }
    let key_of = |item: &pools::PoolItem| PoolKey {
        plan_id: item.plan_id.clone(),
        preset: item
            .preset_target
            .as_deref()
            .and_then(|t| PresetPin::parse(t).ok()),
    };
    // A clone of a version its pool no longer clones.
    let outdated = |item: &pools::PoolItem| {
        item.preset_target
            .as_ref()
            .is_some_and(|label| versions.get(label).copied().flatten() != item.preset_snapshot_id)
    };
    let target = |key: &PoolKey| targets.target_of(&key.plan_id, key.preset.as_ref());
    let mut live: HashMap<PoolKey, u32> = HashMap::new();
    let mut ready_by_pool: HashMap<PoolKey, Vec<&pools::PoolItem>> = HashMap::new();
    for item in &items {
        if !served_here(&item.plan_id) {
            continue;
        }
        let key = key_of(item);
        match item.state.as_str() {
            pools::READY => {
                let old = item.ready_at.is_some_and(|at| Utc::now() - at > max_age);
                if old || outdated(item) || target(&key) == 0 {
                    // Recycled (too old, or a clone of an older version) or drained (no pool any more).
                    pools::start_remove(&mut tx, &item.id).await?;
                    done.removals += 1;
                    continue;
                }
                ready_by_pool.entry(key.clone()).or_default().push(item);
                *live.entry(key).or_default() += 1;
            }
            // A clone of an older version still filling does not count: it goes once it is ready.
            pools::FILLING if !outdated(item) => *live.entry(key).or_default() += 1,
            _ => {}
        }
    }
    // A target that fell: the oldest ready items go first (a filling one becomes ready and goes next time).
    for (key, ready) in &ready_by_pool {
        let have = live.get(key).copied().unwrap_or(0);
        let excess = have.saturating_sub(target(key)) as usize;
        for item in ready.iter().take(excess) {
            pools::start_remove(&mut tx, &item.id).await?;
            done.removals += 1;
            let n = live.entry(key.clone()).or_default();
            *n = n.saturating_sub(1);
        }
    }
    for id in pools::abandoned_fills(&mut *tx).await? {
        let Some(item) = items.iter().find(|i| i.id == id) else {
            continue;
        };
        if served_here(&item.plan_id) && pools::start_remove(&mut tx, &id).await? {
            done.removals += 1;
            let n = live.entry(key_of(item)).or_default();
            *n = n.saturating_sub(1);
        }
    }
    for id in pools::stalled_removals(&mut *tx).await? {
        let plan = items
            .iter()
            .find(|i| i.id == id)
            .map(|i| i.plan_id.as_str());
        if plan.is_some_and(&served_here) {
            pools::enqueue_remove(&mut tx, &id).await?;
            done.removals += 1;
        }
    }
    if !user_work_due(&mut tx).await? {
        for (key, target) in targets.iter() {
            if !served_here(&key.plan_id) {
                continue;
            }
            let label = key.preset.as_ref().map(PresetPin::label);
            let clone = match &label {
                None => None,
                // A preset with no ready version (yet): nothing to clone.
                Some(label) => match versions.get(label).copied().flatten() {
                    Some(snapshot_id) => Some(pools::CloneOf {
                        target: label,
                        snapshot_id,
                    }),
                    None => continue,
                },
            };
            let have = live.get(key).copied().unwrap_or(0);
            for _ in have..target {
                pools::start_fill(
                    &mut tx,
                    &key.plan_id,
                    &broker::pools::new_item_id(),
                    clone,
                    FILL_DELAY_MS,
                )
                .await?;
                done.fills += 1;
            }
        }
    }
    tx.commit().await.context("committing the pool check")?;
    if done != Checked::default() {
        info!(
            fills = done.fills,
            removals = done.removals,
            "warm pools adjusted"
        );
    }
    Ok(done)
}

/// The snapshot of the version a preset pool (`name` or `name@version`, default namespace) clones now.
async fn current_version(db: &mut sqlx::PgConnection, label: &str) -> anyhow::Result<Option<Uuid>> {
    let Ok(pin) = PresetPin::parse(label) else {
        return Ok(None);
    };
    let Some(preset) = presets::get(&mut *db, "", &pin.name)
        .await
        .context("reading a pooled preset")?
    else {
        return Ok(None);
    };
    let version = snapshots::ready_version(&mut *db, preset.id, pin.version)
        .await
        .context("reading a pooled preset's versions")?;
    Ok(version.map(|v| v.id))
}

/// Whether a task other than the pools' own is due: fills wait for the queue to be clear of user work.
async fn user_work_due(db: &mut sqlx::PgConnection) -> sqlx::Result<bool> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM tasks
                        WHERE state = 'pending' AND run_at <= now() AND kind NOT LIKE 'pool.%')",
    )
    .fetch_one(db)
    .await
}

/// A pool item as the instance its provider makes or removes: the item's id (its names derive from it), the
/// plan's defaults for parameters, and the item's details.
pub fn item_as_instance(services: &Services, item: &pools::PoolItem) -> InstanceRow {
    let service_id = services
        .catalog
        .plan_by_id(&item.plan_id)
        .map(|p| p.service.id.clone())
        .unwrap_or_default();
    InstanceRow {
        id: item.id.clone(),
        service_id,
        plan_id: item.plan_id.clone(),
        organization_guid: String::new(),
        space_guid: String::new(),
        context: json!({}),
        parameters: json!({}),
        maintenance_version: None,
        details: item.details.clone(),
        secrets: item.secrets.clone(),
        created_at: item.created_at,
        updated_at: item.created_at,
    }
}
