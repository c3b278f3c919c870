//! `noop`: does nothing, or sleeps `sleep_ms`. The queue's benchmark and crash tests use it.

use std::time::Duration;

use async_trait::async_trait;
use broker::model::kinds;
use serde::Deserialize;

use crate::{
    context::TaskContext,
    registry::{Step, TaskError, TaskHandler},
};

pub struct Noop;

#[derive(Debug, Default, Deserialize)]
struct Payload {
    #[serde(default)]
    sleep_ms: Option<u64>,
}

#[async_trait]
impl TaskHandler for Noop {
    fn kind(&self) -> &'static str {
        kinds::NOOP
    }

    async fn run(&self, ctx: &TaskContext<'_>) -> Result<Step, TaskError> {
        let payload: Payload = ctx.payload()?;
        if let Some(ms) = payload.sleep_ms.filter(|ms| *ms > 0) {
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(ms)) => {}
                () = ctx.cancel.cancelled() => return Err(TaskError::retryable("stopped while sleeping")),
            }
        }
        Ok(Step::Done)
    }
}
