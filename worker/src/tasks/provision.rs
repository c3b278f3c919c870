//! `instance.provision`: the provider makes the instance and we record what it made; a `preset` or
//! `restore_from` parameter then fills its database, and a `backups` parameter schedules backups. A dedicated
//! server's connection is then delivered where the operator asked (`crate::delivery`). A failed provision leaves
//! the row; the deprovision that follows cleans up (orphan mitigation). An instance that took a warm-pool item
//! (details `pool_item`) has its item finished by the provider's `adopt` instead of a provision; a pooled
//! clone of a preset version (details `preset`, set by the claim) holds the preset already. The details
//! record the preset version an instance starts from (`preset`: namespace, name, version, snapshot_id).

use anyhow::Context as _;
use async_trait::async_trait;
use broker::{
    db::{instances, snapshots::SnapshotRow},
    model::kinds,
    snapshots::PresetRef,
};
use serde_json::{Value, json};

use super::ready;
use crate::{
    context::TaskContext,
    registry::{Step, TaskError, TaskHandler},
    snapshots::steps,
};

pub struct Provision;

#[async_trait]
impl TaskHandler for Provision {
    fn kind(&self) -> &'static str {
        kinds::PROVISION
    }

    async fn run(&self, ctx: &TaskContext<'_>) -> Result<Step, TaskError> {
        let instance_id = ctx.instance_id()?;
        let instance = instances::get(ctx.pool, instance_id)
            .await
            .context("reading the instance")?
            .ok_or_else(|| {
                TaskError::fatal("the instance was deleted before it was provisioned")
            })?;
        let provider = ctx.services.provider_for_plan(&instance.plan_id)?;
        // Taken from a warm pool (docs/pools.md): the item exists; finish it as this instance.
        let pooled = instance.details.get("pool_item").and_then(|v| v.as_str());
        let progress = match pooled {
            Some(item) => provider.adopt(ctx, &instance, item).await?,
            None => provider.provision(ctx, &instance).await?,
        };
        let mut made = match ready(progress) {
            Ok(made) => made,
            Err(wait) => return Ok(wait),
        };
        // A pooled clone of a preset version holds it already (its details say which, from the claim).
        let cloned = pooled
            .and(instance.details.get("preset"))
            .filter(|p| p.get("snapshot_id").is_some())
            .cloned();
        let snapshot = match &cloned {
            Some(_) => None,
            None => steps::requested_snapshot(ctx.pool, &instance.parameters).await?,
        };
        // The preset version the instance starts from, recorded the same way from a pool or not.
        let record = cloned.or_else(|| {
            let snapshot = snapshot.as_ref()?;
            preset_record(&instance.parameters, snapshot)
        });
        if let Some(record) = record {
            made.details["preset"] = record;
        }
        let secrets = made
            .secrets
            .as_ref()
            .map(|s| ctx.services.cipher.seal_json(s));
        instances::set_details(ctx.pool, instance_id, &made.details, secrets.as_deref())
            .await
            .context("recording what was provisioned")?;
        // Started from a preset or another instance's backup: put it in before the instance is handed over.
        if let Some(snapshot) = snapshot {
            let instance = instances::get(ctx.pool, instance_id)
                .await
                .context("reading the instance")?
                .ok_or_else(|| {
                    TaskError::fatal("the instance was deleted while it was provisioned")
                })?;
            if let Err(wait) = ready(steps::put_into(ctx, &instance, &snapshot).await?) {
                return Ok(wait);
            }
        }
        steps::sync_schedule(ctx.pool, instance_id, &instance.parameters).await?;
        // Dedicated servers: the connection JSON to the configured bucket and the setup-finished callback.
        crate::delivery::after_creation(ctx.services, ctx.pool, instance_id).await;
        if pooled.is_some() {
            // Refill now rather than at the next check, without making this task wait for it.
            ctx.services.pool_check_now.notify_one();
        }
        Ok(Step::Done)
    }
}

/// What an instance's details record of the preset version it was made from (`None`: a backup); a pool's
/// claim records a clone's version the same way (api/src/pool_claim.rs).
fn preset_record(parameters: &Value, snapshot: &SnapshotRow) -> Option<Value> {
    snapshot.preset_id?;
    let preset = PresetRef::of(parameters).ok()??;
    Some(json!({
        "namespace": preset.namespace, "name": preset.name,
        "version": snapshot.version, "snapshot_id": snapshot.id,
    }))
}
