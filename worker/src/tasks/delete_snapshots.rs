//! `snapshot.delete`: the second half of deleting a preset, a preset version or a backup. The API forgot the rows
//! and queued their objects in one transaction; this task deletes the queued objects from the store and drops the
//! deleted preset versions' template databases (payload `{"template_snapshot_ids": [...]}`). Retried like any task,
//! so an object is deleted even when the worker dies halfway.

use async_trait::async_trait;
use broker::model::kinds;
use serde::Deserialize;
use uuid::Uuid;

use crate::{
    context::TaskContext,
    registry::{Step, TaskError, TaskHandler},
    snapshots::deletion,
};

pub struct DeleteSnapshots;

#[derive(Debug, Default, Deserialize)]
struct Payload {
    #[serde(default)]
    template_snapshot_ids: Vec<Uuid>,
}

#[async_trait]
impl TaskHandler for DeleteSnapshots {
    fn kind(&self) -> &'static str {
        kinds::DELETE_SNAPSHOTS
    }

    async fn run(&self, ctx: &TaskContext<'_>) -> Result<Step, TaskError> {
        let payload: Payload = ctx.payload()?;
        let snapshots = ctx.services.snapshots()?;
        ctx.progress("deleting the snapshot objects").await?;
        let objects = deletion::delete_queued_objects(ctx.pool, snapshots).await?;
        ctx.progress("dropping the preset versions' cached templates")
            .await?;
        let templates = deletion::drop_templates(ctx, &payload.template_snapshot_ids).await?;
        tracing::info!(objects, templates, "deleted snapshot objects and templates");
        Ok(Step::Done)
    }
}
