//! `instance.restore`: resets the instance's database to a snapshot: a preset version (db-p's `select`) or a
//! backup. The database is replaced only by a complete, checked restore; a failure leaves it as it was.

use anyhow::Context as _;
use async_trait::async_trait;
use broker::{db::instances, model::kinds};

use super::ready;
use crate::{
    context::TaskContext,
    registry::{Step, TaskError, TaskHandler},
    snapshots::steps,
};

pub struct Restore;

#[async_trait]
impl TaskHandler for Restore {
    fn kind(&self) -> &'static str {
        kinds::RESTORE
    }

    async fn run(&self, ctx: &TaskContext<'_>) -> Result<Step, TaskError> {
        let snapshot = steps::snapshot_of_payload(ctx).await?;
        let instance = instances::get(ctx.pool, ctx.instance_id()?)
            .await
            .context("reading the instance")?
            .ok_or_else(|| TaskError::fatal("the instance was deleted before the restore ran"))?;
        Ok(
            match ready(steps::put_into(ctx, &instance, &snapshot).await?) {
                Ok(()) => Step::Done,
                Err(wait) => wait,
            },
        )
    }
}
