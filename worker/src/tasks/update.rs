//! `instance.update`: the provider applies the change, then the accepted plan/parameters/context become the
//! instance's own (idempotent: a retry writes the same values).

use anyhow::Context as _;
use async_trait::async_trait;
use broker::{
    db::instances,
    model::{UpdatePayload, kinds},
};

use super::ready;
use crate::{
    context::TaskContext,
    registry::{Step, TaskError, TaskHandler},
    snapshots::steps,
};

pub struct Update;

#[async_trait]
impl TaskHandler for Update {
    fn kind(&self) -> &'static str {
        kinds::UPDATE
    }

    async fn run(&self, ctx: &TaskContext<'_>) -> Result<Step, TaskError> {
        let update: UpdatePayload = ctx.payload()?;
        let instance_id = ctx.instance_id()?;
        let instance = instances::get(ctx.pool, instance_id)
            .await
            .context("reading the instance")?
            .ok_or_else(|| TaskError::fatal("the instance was deleted before the update ran"))?;
        let provider = ctx.services.provider_for_plan(&update.plan_id)?;
        if let Err(wait) = ready(provider.update(ctx, &instance, &update).await?) {
            return Ok(wait);
        }
        // A `preset` in the update request re-selects it (db-p's select).
        if update.select_preset
            && let Some(snapshot) = steps::requested_snapshot(ctx.pool, &update.parameters).await?
            && let Err(wait) = ready(steps::put_into(ctx, &instance, &snapshot).await?)
        {
            return Ok(wait);
        }
        steps::sync_schedule(ctx.pool, instance_id, &update.parameters).await?;
        instances::apply_update(
            ctx.pool,
            instance_id,
            &update.plan_id,
            &update.parameters,
            &update.context,
            update.maintenance_version.as_deref(),
        )
        .await
        .context("recording the applied update")?;
        Ok(Step::Done)
    }
}
