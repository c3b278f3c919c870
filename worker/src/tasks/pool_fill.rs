//! `pool.fill`: makes one warm-pool item with the plan's provider, exactly as a provision with no parameters
//! would (the same idempotent steps, names derived from the item's id), then, for a pool of a preset's clones,
//! puts the item's preset version in as a provision naming it would, and offers it. A run lost with its
//! worker is run again by another and finishes the same item; a fill that fails for good leaves the item
//! `filling`, and the pool check removes what it made.

use anyhow::Context as _;
use async_trait::async_trait;
use broker::{
    db::{pools, snapshots},
    model::kinds,
};
use serde::Deserialize;
use serde_json::json;

use super::ready;
use crate::{
    context::TaskContext,
    pools::item_as_instance,
    registry::{Step, TaskError, TaskHandler},
    snapshots::steps,
};

pub struct PoolFill;

#[derive(Debug, Deserialize)]
pub(crate) struct ItemPayload {
    pub item: String,
}

#[async_trait]
impl TaskHandler for PoolFill {
    fn kind(&self) -> &'static str {
        kinds::POOL_FILL
    }

    async fn run(&self, ctx: &TaskContext<'_>) -> Result<Step, TaskError> {
        let payload: ItemPayload = ctx.payload()?;
        let Some(mut item) = pools::get(ctx.pool, &payload.item)
            .await
            .context("reading the pool item")?
        else {
            return Ok(Step::Done);
        };
        if item.state != pools::FILLING {
            return Ok(Step::Done);
        }
        // The host first, before anything exists: engines with local processes hand a retry elsewhere back.
        if item.details.get("engine_host").is_none() {
            item.details = json!({ "engine_host": ctx.services.settings.local_host() });
            pools::set_filling_details(ctx.pool, &item.id, &item.details)
                .await
                .context("recording the pool item's host")?;
        }
        let provider = ctx.services.provider_for_plan(&item.plan_id)?;
        let instance = item_as_instance(ctx.services, &item);
        let made = match ready(provider.provision(ctx, &instance).await?) {
            Ok(made) => made,
            Err(wait) => return Ok(wait),
        };
        let secrets = made
            .secrets
            .as_ref()
            .map(|s| ctx.services.cipher.seal_json(s));
        // A preset clone: the version goes in as in a provision naming it (a template clone swapped in).
        if let Some(snapshot_id) = item.preset_snapshot_id {
            let snapshot = snapshots::get(ctx.pool, snapshot_id)
                .await
                .context("reading the pooled preset version")?
                .ok_or_else(|| TaskError::fatal("the pooled preset version was deleted"))?;
            let mut made_item = instance.clone();
            made_item.details = made.details.clone();
            made_item.secrets = secrets.clone();
            if let Err(wait) = ready(steps::put_into(ctx, &made_item, &snapshot).await?) {
                return Ok(wait);
            }
        }
        let offered = pools::mark_ready(ctx.pool, &item.id, &made.details, secrets.as_deref())
            .await
            .context("offering the pool item")?;
        if !offered {
            // Marked for removal meanwhile: its pool.remove task takes apart what this run made.
            tracing::info!(item = %item.id, "pool item removed while it was filled");
        }
        Ok(Step::Done)
    }
}
