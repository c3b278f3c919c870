//! `instance.deprovision`: the provider removes whatever exists of the instance, then the row goes (its
//! bindings cascade). An instance row that is already gone means a previous run finished.

use anyhow::Context as _;
use async_trait::async_trait;
use broker::{
    db::{bindings, instances},
    model::{Operation, kinds},
    snapshots::{BackupPolicy, OnDelete},
};

use super::{await_creation, ready};
use crate::{
    context::TaskContext,
    registry::{Step, TaskError, TaskHandler},
    snapshots::steps,
};

pub struct Deprovision;

#[async_trait]
impl TaskHandler for Deprovision {
    fn kind(&self) -> &'static str {
        kinds::DEPROVISION
    }

    async fn run(&self, ctx: &TaskContext<'_>) -> Result<Step, TaskError> {
        let instance_id = ctx.instance_id()?;
        if let Some(wait) = await_creation(ctx, Operation::Provision).await? {
            return Ok(wait);
        }
        let Some(instance) = instances::get(ctx.pool, instance_id)
            .await
            .context("reading the instance")?
        else {
            return Ok(Step::Done);
        };
        let bindings = bindings::list_for_instance(ctx.pool, instance_id)
            .await
            .context("listing the instance's bindings")?;
        let provider = ctx.services.provider_for_plan(&instance.plan_id)?;
        if let Err(wait) = ready(provider.deprovision(ctx, &instance, &bindings).await?) {
            return Ok(wait);
        }
        // Backups stay restorable after the instance is gone unless it asked otherwise.
        if let Ok(Some(policy)) = BackupPolicy::of(&instance.parameters)
            && policy.on_delete == OnDelete::Delete
        {
            steps::delete_all_backups(ctx, instance_id).await?;
        }
        instances::delete(ctx.pool, instance_id)
            .await
            .context("deleting the instance row")?;
        Ok(Step::Done)
    }
}
