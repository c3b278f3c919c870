//! `binding.delete`: the provider removes the binding's access, then the row goes. A row that is already
//! gone means a previous run finished.

use anyhow::Context as _;
use async_trait::async_trait;
use broker::{
    db::{bindings, instances},
    model::{Operation, kinds},
};

use super::{await_creation, ready};
use crate::{
    context::TaskContext,
    registry::{Step, TaskError, TaskHandler},
};

pub struct DeleteBinding;

#[async_trait]
impl TaskHandler for DeleteBinding {
    fn kind(&self) -> &'static str {
        kinds::UNBIND
    }

    async fn run(&self, ctx: &TaskContext<'_>) -> Result<Step, TaskError> {
        let binding_id = ctx.binding_id()?;
        if let Some(wait) = await_creation(ctx, Operation::Bind).await? {
            return Ok(wait);
        }
        let Some(binding) = bindings::get(ctx.pool, binding_id)
            .await
            .context("reading the binding")?
        else {
            return Ok(Step::Done);
        };
        // The binding row cascades with its instance, so the instance exists while the binding does.
        let Some(instance) = instances::get(ctx.pool, &binding.instance_id)
            .await
            .context("reading the binding's instance")?
        else {
            return Ok(Step::Done);
        };
        let provider = ctx.services.provider_for_plan(&instance.plan_id)?;
        if let Err(wait) = ready(provider.unbind(ctx, &instance, &binding).await?) {
            return Ok(wait);
        }
        bindings::delete(ctx.pool, binding_id)
            .await
            .context("deleting the binding row")?;
        Ok(Step::Done)
    }
}
