//! `instance.rotate_credentials` (the Akkeris action `PUT .../actions/credentials`): for each binding with
//! credentials, the provider makes new ones (working before it returns), they are sealed and stored in place of
//! the old, and only then does the provider revoke the old. A binding's stored credentials work at every moment;
//! after a crash the rerun rotates again from the stored ones and revokes what the first try left.

use anyhow::Context as _;
use async_trait::async_trait;
use broker::{
    db::{bindings, instances},
    model::kinds,
};
use serde_json::{Map, Value};

use super::ready;
use crate::{
    context::TaskContext,
    registry::{Step, TaskError, TaskHandler},
};

pub struct RotateCredentials;

#[async_trait]
impl TaskHandler for RotateCredentials {
    fn kind(&self) -> &'static str {
        kinds::ROTATE_CREDENTIALS
    }

    async fn run(&self, ctx: &TaskContext<'_>) -> Result<Step, TaskError> {
        let instance_id = ctx.instance_id()?;
        let instance = instances::get(ctx.pool, instance_id)
            .await
            .context("reading the instance")?
            .ok_or_else(|| {
                TaskError::fatal("the instance was deleted before its credentials were rotated")
            })?;
        let provider = ctx.services.provider_for_plan(&instance.plan_id)?;
        let all = bindings::list_for_instance(ctx.pool, instance_id)
            .await
            .context("reading the instance's bindings")?;
        // Only bindings whose bind succeeded have credentials; one still binding gets fresh ones anyway. An
        // expired binding gets none: its credentials are being (or were) revoked.
        let now = chrono::Utc::now();
        let bound: Vec<_> = all
            .into_iter()
            .filter(|b| b.credentials.is_some() && !b.expired(now))
            .collect();
        for (done, binding) in bound.iter().enumerate() {
            ctx.progress(&format!(
                "rotating the credentials of binding {} of {}",
                done + 1,
                bound.len()
            ))
            .await
            .context("recording progress")?;
            let sealed = binding
                .credentials
                .as_deref()
                .expect("filtered on credentials");
            let current: Map<String, Value> =
                ctx.services.cipher.open_json(sealed).map_err(|e| {
                    TaskError::fatal(format!(
                        "binding {}: its stored credentials cannot be opened: {e:#}",
                        binding.id
                    ))
                })?;
            let new = match ready(
                provider
                    .rotate_binding(ctx, &instance, binding, &current)
                    .await?,
            ) {
                Ok(new) => new,
                Err(wait) => return Ok(wait),
            };
            let sealed = ctx.services.cipher.seal_json(&new.credentials);
            bindings::set_credentials(ctx.pool, &binding.id, &new.details, Some(&sealed))
                .await
                .context("storing the binding's new credentials")?;
            if let Err(wait) = ready(
                provider
                    .revoke_other_credentials(ctx, &instance, binding, &new.credentials)
                    .await?,
            ) {
                return Ok(wait);
            }
        }
        Ok(Step::Done)
    }
}
