//! The task kinds, one struct per file, and the one list that registers them.

mod backup;
mod bind;
mod change_primary;
mod delete_snapshots;
mod deliver_webhook;
mod deprovision;
mod expire_binding;
mod noop;
mod pool_fill;
mod pool_remove;
mod provision;
mod push_preset;
mod restore;
mod rotate_credentials;
mod unbind;
mod update;

pub use backup::Backup;
pub use bind::CreateBinding;
pub use change_primary::ChangePrimary;
pub use delete_snapshots::DeleteSnapshots;
pub use deliver_webhook::DeliverWebhook;
pub use deprovision::Deprovision;
pub use expire_binding::ExpireBinding;
pub use noop::Noop;
pub use pool_fill::PoolFill;
pub use pool_remove::PoolRemove;
pub use provision::Provision;
pub use push_preset::PushPreset;
pub use restore::Restore;
pub use rotate_credentials::RotateCredentials;
pub use unbind::DeleteBinding;
pub use update::Update;

use std::time::Duration;

use anyhow::Context as _;
use broker::model::Operation;

use crate::{
    context::TaskContext,
    providers::Progress,
    registry::{Registry, Step, TaskError},
};

/// Every kind this worker runs.
pub fn registry() -> Registry {
    Registry::new()
        .with(Provision)
        .with(Update)
        .with(Deprovision)
        .with(CreateBinding)
        .with(DeleteBinding)
        .with(ExpireBinding)
        .with(RotateCredentials)
        .with(PushPreset)
        .with(Backup)
        .with(Restore)
        .with(ChangePrimary)
        .with(DeleteSnapshots)
        .with(DeliverWebhook)
        .with(Noop)
        .with(PoolFill)
        .with(PoolRemove)
}

/// How soon an unbind or deprovision looks again whether the creation it undoes has ended.
const CREATION_WAIT: Duration = Duration::from_millis(500);

/// For an unbind or deprovision: cancels the `creation` (bind, provision) if it has not started, or a Wait while
/// it runs (see [`crate::queue::cancel_or_await_creation`]).
async fn await_creation(
    ctx: &TaskContext<'_>,
    creation: Operation,
) -> Result<Option<Step>, TaskError> {
    let running = crate::queue::cancel_or_await_creation(ctx.pool, ctx.task, creation)
        .await
        .with_context(|| format!("checking for a {} in progress", creation.as_str()))?;
    Ok(running.then(|| {
        wait(
            CREATION_WAIT,
            format!("waiting for the {} in progress to end", creation.as_str()),
        )
    }))
}

/// A provider asked to wait: turn that into the queue's Wait.
fn wait(after: Duration, progress: String) -> Step {
    Step::Wait { after, progress }
}

/// Splits a provider result into "go on with T" or "return this Wait".
fn ready<T>(progress: Progress<T>) -> Result<T, Step> {
    match progress {
        Progress::Done(value) => Ok(value),
        Progress::Wait { after, progress } => Err(wait(after, progress)),
    }
}
