//! `last_operation` for instances and bindings: which task a poll is about (the one `?operation=` names, or the
//! newest), 410 once the deletion it reports on has succeeded, and the body OSB wants for the task.

use axum::{
    Json,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use broker::{
    db::{
        bindings, instances,
        tasks::{self, TaskRow},
    },
    model::{Operation, TaskState},
};
use serde::Serialize;
use sqlx::PgConnection;
use utoipa::ToSchema;

use super::{gone, parse_operation};
use crate::error::{ApiError, ApiResult};

/// What a `last_operation` poll is about.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Polled<'a> {
    Instance {
        instance_id: &'a str,
    },
    Binding {
        instance_id: &'a str,
        binding_id: &'a str,
    },
}

impl Polled<'_> {
    /// Whether `task` is one of this resource's operations.
    fn owns(&self, task: &TaskRow) -> bool {
        match *self {
            Self::Instance { instance_id } => {
                task.instance_id.as_deref() == Some(instance_id) && task.binding_id.is_none()
            }
            Self::Binding {
                instance_id,
                binding_id,
            } => {
                task.binding_id.as_deref() == Some(binding_id)
                    && task.instance_id.as_deref() == Some(instance_id)
            }
        }
    }

    fn name(&self) -> String {
        match self {
            Self::Instance { instance_id } => format!("service instance {instance_id}"),
            Self::Binding { binding_id, .. } => format!("binding {binding_id}"),
        }
    }

    /// The operation whose success deletes the resource.
    fn deletion(&self) -> Operation {
        match self {
            Self::Instance { .. } => Operation::Deprovision,
            Self::Binding { .. } => Operation::Unbind,
        }
    }

    /// Whether the resource's row exists (a binding: under this instance).
    async fn exists(&self, conn: &mut PgConnection) -> sqlx::Result<bool> {
        Ok(match *self {
            Self::Instance { instance_id } => instances::get(conn, instance_id).await?.is_some(),
            Self::Binding {
                instance_id,
                binding_id,
            } => bindings::get(conn, binding_id)
                .await?
                .is_some_and(|row| row.instance_id == instance_id),
        })
    }

    async fn latest(&self, conn: &mut PgConnection) -> sqlx::Result<Option<TaskRow>> {
        let latest = match self {
            Self::Instance { instance_id } => {
                tasks::latest_instance_operation(conn, instance_id).await?
            }
            Self::Binding { binding_id, .. } => {
                tasks::latest_binding_operation(conn, binding_id).await?
            }
        };
        Ok(latest.filter(|task| self.owns(task)))
    }
}

/// Answers a poll of `polled` for the operation the query names (or the newest).
pub(crate) async fn answer(
    conn: &mut PgConnection,
    polled: Polled<'_>,
    operation: Option<&str>,
) -> ApiResult<Response> {
    // The task is read before the row: a deletion removes the row before its task succeeds, so a succeeded
    // deletion read here has no row left below. Read the other way round, a deletion finishing between the two
    // reads showed a row that was still there and a task that had succeeded: 200 for a resource already gone.
    let named = match operation.filter(|o| !o.is_empty()) {
        Some(operation) => Some((
            operation,
            tasks::get(&mut *conn, parse_operation(operation)?).await?,
        )),
        None => None,
    };
    let latest = match named {
        Some(_) => None,
        None => polled.latest(&mut *conn).await?,
    };
    let exists = polled.exists(&mut *conn).await?;
    let task = match named {
        Some((operation, named)) => match named {
            Some(task) if polled.owns(&task) => Some(task),
            None if !exists => None,
            _ => {
                return Err(ApiError::bad_request(format!(
                    "operation {operation} is not an operation on {}",
                    polled.name()
                )));
            }
        },
        None => latest,
    };
    let Some(task) = task else {
        return Err(ApiError::NotFound(format!(
            "{} does not exist",
            polled.name()
        )));
    };
    if !exists && task.operation == Some(polled.deletion()) && task.state == TaskState::Succeeded {
        return Ok(gone());
    }
    let instance_flags = matches!(polled, Polled::Instance { .. });
    Ok(body_for(&task, instance_flags))
}

/// The state of an operation, as OSB names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
pub(crate) enum OperationState {
    #[serde(rename = "in progress")]
    InProgress,
    #[serde(rename = "succeeded")]
    Succeeded,
    #[serde(rename = "failed")]
    Failed,
}

/// A `last_operation` answer.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct LastOperation {
    state: OperationState,
    /// The worker's progress while in progress; the error when failed.
    description: String,
    /// After a failed update or deprovision: whether the instance still works as before.
    #[serde(skip_serializing_if = "Option::is_none")]
    instance_usable: Option<bool>,
    /// After a failed update or deprovision: whether the update may be repeated.
    #[serde(skip_serializing_if = "Option::is_none")]
    update_repeatable: Option<bool>,
}

/// The `last_operation` body for a task. `instance_flags` adds `instance_usable`/`update_repeatable` to a failed
/// update or deprovision.
fn body_for(task: &TaskRow, instance_flags: bool) -> Response {
    let operation = task.operation.map_or("operation", Operation::as_str);
    let state = task.state;
    let (osb_state, description) = match state {
        TaskState::Pending | TaskState::Running => (
            OperationState::InProgress,
            task.progress
                .clone()
                .filter(|p| !p.trim().is_empty())
                .unwrap_or_else(|| format!("{operation} in progress")),
        ),
        TaskState::Succeeded => (OperationState::Succeeded, format!("{operation} succeeded")),
        TaskState::Failed => (
            OperationState::Failed,
            match task
                .last_error
                .as_deref()
                .map(str::trim)
                .filter(|e| !e.is_empty())
            {
                Some(error) => format!("The {operation} failed: {error}"),
                None => format!("The {operation} failed."),
            },
        ),
    };
    let mut body = LastOperation {
        state: osb_state,
        description,
        instance_usable: None,
        update_repeatable: None,
    };
    if instance_flags && state == TaskState::Failed {
        match task.operation {
            // An update is applied to the row only once it has succeeded: the instance runs as before. A
            // rotation replaces each binding's credentials only once the new ones work: every stored set works.
            // A switchover or failover that failed leaves the cluster with a primary (Patroni's own checks); a
            // restore swaps the database in only once it is complete.
            Some(
                Operation::Update
                | Operation::RotateCredentials
                | Operation::Restore
                | Operation::Switchover
                | Operation::Failover,
            ) => {
                body.instance_usable = Some(true);
                body.update_repeatable = Some(true);
            }
            // A deprovision may have dropped part of the instance already: it is not safe to use or update;
            // repeating the deprovision is the way forward.
            Some(Operation::Deprovision) => {
                body.instance_usable = Some(false);
                body.update_repeatable = Some(false);
            }
            _ => {}
        }
    }
    let mut response = (StatusCode::OK, Json(body)).into_response();
    if !state.is_finished() {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("2"));
    }
    response
}
