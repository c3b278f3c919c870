//! Requests without `accepts_incomplete=true`: bind and unbind on every plan, provision, update and deprovision on
//! the plans the catalog marks `synchronous`. The request records its task as an asynchronous one would, then
//! waits (see [`crate::task_waits`]) for the task to finish, at most `SYNC_WAIT_SECS`, and answers with the result:
//! 200/201 on success, 500 `OperationFailed` when the task failed, 504 `OperationTimedOut` when it did not finish
//! in time. Both are 5xx so that a platform runs its orphan mitigation after a provision or bind (OSB: none after
//! a 408); the task goes on, and the unbind or deprovision that follows is accepted while it runs (the worker
//! holds it back until the creation has ended).

use axum::{http::StatusCode, response::Response};
use broker::model::{Operation, TaskId, TaskState};
use tokio::time::Instant;

use super::OsbParams;
use crate::{
    AppState,
    error::{ApiError, ApiResult},
    task_waits::Waited,
};

/// How a request is answered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) enum Mode {
    /// 202 with an operation to poll (the client sent `accepts_incomplete=true`).
    #[default]
    Async,
    /// Once the task has finished.
    Sync,
}

impl OsbParams {
    /// `Async` when the client accepts incomplete answers; otherwise `Sync` when the operation may be answered
    /// synchronously, or 422 `AsyncRequired`.
    pub fn answer_mode(&self, sync_allowed: bool) -> ApiResult<Mode> {
        if sync_allowed && !self.accepts_incomplete() {
            return Ok(Mode::Sync);
        }
        self.require_async().map(|()| Mode::Async)
    }
}

/// What [`settle`] made of a handler's answer.
#[derive(Debug)]
pub(crate) enum Settled {
    /// The answer stands as it is (asynchronous, or not a 202).
    Answered(Response),
    /// A synchronous request's task succeeded: the handler answers with the result.
    Succeeded,
}

/// In `Sync` mode turns a 202 into the task's outcome (waiting for it until `SYNC_WAIT_SECS` after `started`, when
/// the handler began, so the answer comes before the request timeout's 408); anything else stands.
pub(crate) async fn settle(
    state: &AppState,
    mode: Mode,
    response: Response,
    started: Instant,
) -> ApiResult<Settled> {
    if mode == Mode::Async || response.status() != StatusCode::ACCEPTED {
        return Ok(Settled::Answered(response));
    }
    let Some(&operation) = response.extensions().get::<TaskId>() else {
        return Ok(Settled::Answered(response));
    };
    match state
        .task_waits
        .until_finished(operation, state.sync_wait.saturating_sub(started.elapsed()))
        .await?
    {
        Waited::Finished(task) if task.state == TaskState::Succeeded => Ok(Settled::Succeeded),
        Waited::Finished(task) => {
            let what = task.operation.map_or("operation", Operation::as_str);
            Err(ApiError::OperationFailed(
                match task
                    .last_error
                    .as_deref()
                    .map(str::trim)
                    .filter(|e| !e.is_empty())
                {
                    Some(error) => format!("The {what} failed: {error} (operation {operation})"),
                    None => format!("The {what} failed (operation {operation})."),
                },
            ))
        }
        Waited::TimedOut => Err(ApiError::OperationTimedOut(format!(
            "the operation did not finish within {} s and goes on in the background (operation {operation}); \
             repeat the request to wait for it again, or delete the resource to clean up",
            state.sync_wait.as_secs_f64()
        ))),
    }
}
