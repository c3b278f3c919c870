//! `preset.push`: snapshots the source instance's database as a new preset version (push-new and push). The
//! version row was written with the task; it turns `ready` only once the object is complete in the store.

use anyhow::Context as _;
use async_trait::async_trait;
use broker::{
    db::{instances, presets, snapshots},
    model::kinds,
};

use super::ready;
use crate::{
    context::TaskContext,
    registry::{Step, TaskError, TaskHandler},
    snapshots::steps,
};

pub struct PushPreset;

#[async_trait]
impl TaskHandler for PushPreset {
    fn kind(&self) -> &'static str {
        kinds::PUSH_PRESET
    }

    async fn run(&self, ctx: &TaskContext<'_>) -> Result<Step, TaskError> {
        let snapshot = steps::snapshot_of_payload(ctx).await?;
        let result = async {
            let instance = instances::get(ctx.pool, ctx.instance_id()?)
                .await
                .context("reading the source instance")?
                .ok_or_else(|| {
                    TaskError::fatal(
                        "the source instance was deleted before its snapshot was taken",
                    )
                })?;
            steps::take(ctx, &instance, &snapshot).await
        }
        .await;
        match result {
            Ok(progress) => Ok(match ready(progress) {
                Ok(()) => Step::Done,
                Err(wait) => wait,
            }),
            Err(e) if e.is_fatal() => {
                snapshots::mark_failed(ctx.pool, snapshot.id)
                    .await
                    .context("recording the failed push")?;
                // A push-new that never produced a version frees the name again.
                if let Some(preset_id) = snapshot.preset_id {
                    presets::delete_if_empty(ctx.pool, preset_id)
                        .await
                        .context("releasing the preset name")?;
                }
                Err(e)
            }
            Err(e) => Err(e),
        }
    }
}
