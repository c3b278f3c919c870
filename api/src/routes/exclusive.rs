//! Operations that run one at a time on an instance: the rule every handler applies under the instance's row
//! lock, and the write that follows. The same request again gets the operation it got the first time (202);
//! another operation in progress is 422 `ConcurrencyError`; otherwise the task is written and committed (202).

use axum::response::Response;
use broker::{
    db::tasks::{self, NewTask, TaskRow},
    model::{Operation, TaskId},
};
use sqlx::{PgConnection, Postgres, Transaction};

use super::accepted;
use crate::error::{ApiError, ApiResult};

/// How a request recognises itself among the operations in progress.
#[derive(Clone, Copy)]
pub(crate) enum Again<'a> {
    /// It cannot: every operation in the way refuses it.
    Never,
    /// Any operation in progress that matches is this request again.
    Anywhere(&'a (dyn Fn(&TaskRow) -> bool + Sync)),
    /// Only the newest operation in the way can be this request again; any other refuses it.
    Newest(&'a (dyn Fn(&TaskRow) -> bool + Sync)),
}

/// Applies the rule to the instance's operations in progress (call with the instance row locked):
/// `Some(operation)` when the request is one of them again (answer 202 with it); 422 `ConcurrencyError`
/// naming the newest one `in_the_way`; `None` when nothing is.
pub(crate) async fn check(
    db: &mut PgConnection,
    instance_id: &str,
    again: Again<'_>,
    in_the_way: impl Fn(&TaskRow) -> bool,
) -> ApiResult<Option<TaskId>> {
    let active = tasks::active_operations(db, instance_id).await?;
    if let Again::Anywhere(same) = again
        && let Some(task) = active.iter().find(|t| same(t))
    {
        return Ok(Some(task.task_id()));
    }
    match active.iter().find(|t| in_the_way(t)) {
        Some(task) if matches!(again, Again::Newest(same) if same(task)) => {
            Ok(Some(task.task_id()))
        }
        Some(task) => Err(concurrency(instance_id, task)),
        None => Ok(None),
    }
}

/// Every operation in progress is in the way.
pub(crate) fn any(_: &TaskRow) -> bool {
    true
}

/// Writes the operation's task and commits: 202 with its operation.
pub(crate) async fn start(mut tx: Transaction<'_, Postgres>, task: NewTask) -> ApiResult<Response> {
    let operation = tasks::enqueue(&mut *tx, task).await?;
    tx.commit().await?;
    Ok(accepted(operation))
}

/// 422 `ConcurrencyError`: `task` is in progress on the instance (or one of its bindings).
pub(crate) fn concurrency(instance_id: &str, task: &TaskRow) -> ApiError {
    let operation = task.operation.map_or("an operation", Operation::as_str);
    let what = match &task.binding_id {
        Some(binding) => format!("binding {binding} of service instance {instance_id}"),
        None => format!("service instance {instance_id}"),
    };
    ApiError::Concurrency(format!(
        "{what} has a {operation} in progress (operation {}); try again when it has finished",
        task.id
    ))
}

/// 422 when the instance's last operation is a deprovision (which failed, or it would be gone): it may be half
/// deleted, and deprovisioning it again is the way forward.
pub(crate) async fn not_being_deleted(db: &mut PgConnection, instance_id: &str) -> ApiResult<()> {
    let latest = tasks::latest_instance_operation(db, instance_id).await?;
    if latest.is_some_and(|t| t.operation == Some(Operation::Deprovision)) {
        return Err(ApiError::Unprocessable(format!(
            "service instance {instance_id} is being deleted (its last deprovision failed); deprovision it again"
        )));
    }
    Ok(())
}
