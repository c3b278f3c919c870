//! `instance.change_primary`: a switchover or failover of an HA cluster (the task's `operation` says which),
//! from `POST /berth/v1/instances/{id}/switchover|failover`. The provider asks the cluster's own manager.

use anyhow::Context as _;
use async_trait::async_trait;
use broker::{
    db::instances,
    model::{ChangePrimaryPayload, Operation, kinds},
};

use super::ready;
use crate::{
    context::TaskContext,
    registry::{Step, TaskError, TaskHandler},
};

pub struct ChangePrimary;

#[async_trait]
impl TaskHandler for ChangePrimary {
    fn kind(&self) -> &'static str {
        kinds::CHANGE_PRIMARY
    }

    async fn run(&self, ctx: &TaskContext<'_>) -> Result<Step, TaskError> {
        let payload: ChangePrimaryPayload = ctx.payload()?;
        let operation = match ctx.task.operation {
            Some(op @ (Operation::Switchover | Operation::Failover)) => op,
            other => {
                return Err(TaskError::fatal(format!(
                    "a change of primary cannot run as operation {other:?}"
                )));
            }
        };
        let instance_id = ctx.instance_id()?;
        let instance = instances::get(ctx.pool, instance_id)
            .await
            .context("reading the instance")?
            .ok_or_else(|| {
                TaskError::fatal("the instance was deleted before its primary changed")
            })?;
        let provider = ctx.services.provider_for_plan(&instance.plan_id)?;
        if let Err(wait) = ready(
            provider
                .change_primary(ctx, &instance, operation, payload.candidate.as_deref())
                .await?,
        ) {
            return Ok(wait);
        }
        Ok(Step::Done)
    }
}
