//! `binding.create`: the provider makes the binding's access; the credentials are sealed before they are
//! stored and never logged.

use anyhow::Context as _;
use async_trait::async_trait;
use broker::{
    db::{bindings, instances},
    model::kinds,
};

use super::ready;
use crate::{
    context::TaskContext,
    registry::{Step, TaskError, TaskHandler},
};

pub struct CreateBinding;

#[async_trait]
impl TaskHandler for CreateBinding {
    fn kind(&self) -> &'static str {
        kinds::BIND
    }

    async fn run(&self, ctx: &TaskContext<'_>) -> Result<Step, TaskError> {
        let binding_id = ctx.binding_id()?;
        let binding = bindings::get(ctx.pool, binding_id)
            .await
            .context("reading the binding")?
            .ok_or_else(|| TaskError::fatal("the binding was deleted before it was created"))?;
        if binding.expired(chrono::Utc::now()) {
            return Err(TaskError::fatal(
                "the binding expired before it was created",
            ));
        }
        let instance = instances::get(ctx.pool, &binding.instance_id)
            .await
            .context("reading the binding's instance")?
            .ok_or_else(|| TaskError::fatal("the binding's instance is gone"))?;
        let provider = ctx.services.provider_for_plan(&instance.plan_id)?;
        let bound = match ready(provider.bind(ctx, &instance, &binding).await?) {
            Ok(bound) => bound,
            Err(wait) => return Ok(wait),
        };
        let sealed = ctx.services.cipher.seal_json(&bound.credentials);
        bindings::set_credentials(ctx.pool, binding_id, &bound.details, Some(&sealed))
            .await
            .context("storing the binding's credentials")?;
        Ok(Step::Done)
    }
}
