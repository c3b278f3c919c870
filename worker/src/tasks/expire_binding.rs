//! `binding.expire`: revokes an expired binding's credentials with the provider's own unbind (the login role
//! is locked out, its sessions ended and the role dropped; the IAM user and key are deleted), then records
//! `revoked_at`. The row stays until the platform unbinds, which then finds nothing left to remove. Run again
//! after a crash, every step finds its work done.

use anyhow::Context as _;
use async_trait::async_trait;
use broker::{
    db::{bindings, instances},
    model::kinds,
};
use chrono::Utc;

use super::ready;
use crate::{
    context::TaskContext,
    registry::{Step, TaskError, TaskHandler},
};

pub struct ExpireBinding;

#[async_trait]
impl TaskHandler for ExpireBinding {
    fn kind(&self) -> &'static str {
        kinds::EXPIRE_BINDING
    }

    async fn run(&self, ctx: &TaskContext<'_>) -> Result<Step, TaskError> {
        let binding_id = ctx.binding_id()?;
        // Unbound meanwhile: the unbind removed everything.
        let Some(binding) = bindings::get(ctx.pool, binding_id)
            .await
            .context("reading the binding")?
        else {
            return Ok(Step::Done);
        };
        if binding.revoked_at.is_some() {
            return Ok(Step::Done);
        }
        if !binding.expired(Utc::now()) {
            return Err(TaskError::fatal(format!(
                "binding {binding_id} has not expired; nothing revoked"
            )));
        }
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
        bindings::mark_revoked(ctx.pool, binding_id)
            .await
            .context("recording the revocation")?;
        tracing::info!(binding_id, instance_id = %instance.id, "the binding expired; its credentials are revoked");
        Ok(Step::Done)
    }
}
