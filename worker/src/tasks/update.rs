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
