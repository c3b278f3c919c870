//! `instance.backup`: snapshots the instance's database as a backup (scheduled or asked for), then deletes
//! the backups beyond the instance's retention. The backup row was written with the task; a backup cut short
//! stays `pending` with no object and never counts.

use anyhow::Context as _;
use async_trait::async_trait;
use broker::{
    db::{instances, snapshots},
    model::kinds,
    snapshots::BackupPolicy,
};

use super::ready;
use crate::{
    context::TaskContext,
    registry::{Step, TaskError, TaskHandler},
    snapshots::steps,
};

pub struct Backup;

#[async_trait]
impl TaskHandler for Backup {
    fn kind(&self) -> &'static str {
        kinds::BACKUP
    }

    async fn run(&self, ctx: &TaskContext<'_>) -> Result<Step, TaskError> {
        let snapshot = steps::snapshot_of_payload(ctx).await?;
        let instance = match instances::get(ctx.pool, ctx.instance_id()?)
            .await
            .context("reading the instance")?
        {
            Some(instance) => instance,
            None => {
                snapshots::mark_failed(ctx.pool, snapshot.id)
                    .await
                    .context("recording the failed backup")?;
                return Err(TaskError::fatal(
                    "the instance was deleted before it was backed up",
                ));
            }
        };
        match steps::take(ctx, &instance, &snapshot).await {
            Ok(progress) => {
                if let Err(wait) = ready(progress) {
                    return Ok(wait);
                }
            }
            Err(e) => {
                if e.is_fatal() {
                    snapshots::mark_failed(ctx.pool, snapshot.id)
                        .await
                        .context("recording the failed backup")?;
                }
                return Err(e);
            }
        }
        if let Ok(Some(policy)) = BackupPolicy::of(&instance.parameters) {
            let pruned = steps::prune(ctx, &instance.id, i64::from(policy.retention)).await?;
            if pruned > 0 {
                tracing::info!(instance_id = %instance.id, pruned, "old backups deleted (retention)");
            }
        }
        Ok(Step::Done)
    }
}
