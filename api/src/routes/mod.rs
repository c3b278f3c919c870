//! One module per resource, each with its `router()`; the answers they share live here.

pub mod backups;
pub mod bindings;
pub mod catalog;
pub mod cluster;
pub mod health;
pub mod instances;
pub mod metrics;
pub mod presets;
pub mod price_check;
pub(crate) mod synchronous;

use axum::{
    Json,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use broker::{
    catalog::{Catalog, PlanRef},
    db::tasks::{NewTask, TaskRow},
    model::{Operation, TaskId, TaskState},
};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::error::{ApiError, ApiResult};

/// The query parameters OSB and berth use on instance and binding routes. Unknown keys are ignored.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct OsbParams {
    pub accepts_incomplete: Option<String>,
    pub service_id: Option<String>,
    pub plan_id: Option<String>,
    pub operation: Option<String>,
    /// Akkeris-style webhook: `?webhook=URL&secret=S`.
    pub webhook: Option<String>,
    pub secret: Option<String>,
}

impl OsbParams {
    pub fn accepts_incomplete(&self) -> bool {
        self.accepts_incomplete
            .as_deref()
            .is_some_and(|v| v.eq_ignore_ascii_case("true"))
    }

    /// 422 `AsyncRequired` unless the client accepts an asynchronous answer.
    pub fn require_async(&self) -> ApiResult<()> {
        if self.accepts_incomplete() {
            Ok(())
        } else {
            Err(ApiError::AsyncRequired)
        }
    }

    /// `service_id` and `plan_id`, which OSB requires on DELETE.
    pub fn require_service_and_plan(&self) -> ApiResult<()> {
        for (name, value) in [("service_id", &self.service_id), ("plan_id", &self.plan_id)] {
            if value.as_deref().is_none_or(str::is_empty) {
                return Err(ApiError::bad_request(format!(
                    "the query parameter `{name}` is required"
                )));
            }
        }
        Ok(())
    }
}

/// `maintenance_info` in a request body.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct MaintenanceInfoBody {
    pub version: Option<String>,
}

/// 400 unless an id chosen by the platform is usable.
pub(crate) fn check_id(what: &str, id: &str) -> ApiResult<()> {
    if id.is_empty() || id.len() > 255 || id.chars().any(char::is_control) {
        return Err(ApiError::bad_request(format!(
            "{what} must be 1 to 255 printable characters"
        )));
    }
    Ok(())
}

/// The published plan `plan_id` of service `service_id`, or a 400 saying which is unknown.
pub(crate) fn lookup_plan<'c>(
    catalog: &'c Catalog,
    service_id: &str,
    plan_id: &str,
) -> ApiResult<PlanRef<'c>> {
    let service = catalog.service(service_id).ok_or_else(|| {
        ApiError::bad_request(format!(
            "service_id {service_id:?} is not a service in the catalog"
        ))
    })?;
    catalog.plan(service_id, plan_id).ok_or_else(|| {
        ApiError::bad_request(format!(
            "plan_id {plan_id:?} is not a plan of service {:?}",
            service.name
        ))
    })
}

/// An optional JSON object from a request body (absent or `null` → `{}`), or a 400.
pub(crate) fn object_or_empty(value: Option<Value>, field: &str) -> ApiResult<Value> {
    match value {
        None | Some(Value::Null) => Ok(Value::Object(Map::new())),
        Some(v @ Value::Object(_)) => Ok(v),
        Some(_) => Err(ApiError::bad_request(format!(
            "`{field}` must be a JSON object"
        ))),
    }
}

/// 422 `MaintenanceInfoConflict` when the request names a maintenance version the plan is not at.
pub(crate) fn check_maintenance(requested: Option<&str>, plan: &PlanRef<'_>) -> ApiResult<()> {
    let Some(requested) = requested else {
        return Ok(());
    };
    let current = plan
        .plan
        .maintenance_info
        .as_ref()
        .map(|m| m.version.as_str());
    if current == Some(requested) {
        return Ok(());
    }
    Err(ApiError::MaintenanceInfoConflict(match current {
        Some(current) => format!(
            "maintenance_info.version {requested:?} does not match plan {:?}, which is at {current:?}; fetch the catalog again",
            plan.plan.name
        ),
        None => format!(
            "plan {:?} has no maintenance_info, but the request names version {requested:?}; fetch the catalog again",
            plan.plan.name
        ),
    }))
}

/// A task for an OSB operation on an instance (and binding).
pub(crate) fn operation_task(
    operation: Operation,
    instance_id: &str,
    binding_id: Option<&str>,
    payload: Value,
    originating_identity: Option<Value>,
    webhook: Option<(String, Vec<u8>)>,
) -> NewTask {
    let mut task = NewTask::new(operation.task_kind(), payload);
    task.operation = Some(operation);
    task.instance_id = Some(instance_id.to_string());
    task.binding_id = binding_id.map(str::to_string);
    task.originating_identity = originating_identity;
    task.webhook = webhook;
    task
}

pub(crate) fn is_active(task: &TaskRow) -> bool {
    !task.state.is_finished()
}

/// 202 `{"operation": "<task id>"}`. The task id also rides along as an extension, for
/// [`synchronous::settle`].
pub(crate) fn accepted(operation: TaskId) -> Response {
    let mut response = (
        StatusCode::ACCEPTED,
        Json(json!({ "operation": operation.to_string() })),
    )
        .into_response();
    response.extensions_mut().insert(operation);
    response
}

/// 200 `{}`.
pub(crate) fn ok_empty() -> Response {
    (StatusCode::OK, Json(json!({}))).into_response()
}

/// 410 `{}`.
pub(crate) fn gone() -> Response {
    (StatusCode::GONE, Json(json!({}))).into_response()
}

/// The `last_operation` body for a task. `instance_flags` adds `instance_usable`/`update_repeatable` to a failed
/// update or deprovision.
pub(crate) fn last_operation_response(task: &TaskRow, instance_flags: bool) -> Response {
    let operation = task.operation.map_or("operation", Operation::as_str);
    let state = task.state;
    let mut body = match state {
        TaskState::Pending | TaskState::Running => json!({
            "state": "in progress",
            "description": task.progress.clone().filter(|p| !p.trim().is_empty())
                .unwrap_or_else(|| format!("{operation} in progress")),
        }),
        TaskState::Succeeded => {
            json!({ "state": "succeeded", "description": format!("{operation} succeeded") })
        }
        TaskState::Failed => json!({
            "state": "failed",
            "description": match task.last_error.as_deref().map(str::trim).filter(|e| !e.is_empty()) {
                Some(error) => format!("The {operation} failed: {error}"),
                None => format!("The {operation} failed."),
            },
        }),
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
                body["instance_usable"] = json!(true);
                body["update_repeatable"] = json!(true);
            }
            // A deprovision may have dropped part of the instance already: it is not safe to use or update;
            // repeating the deprovision is the way forward.
            Some(Operation::Deprovision) => {
                body["instance_usable"] = json!(false);
                body["update_repeatable"] = json!(false);
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

/// Parses `?operation=` as a task id, or a 400.
pub(crate) fn parse_operation(operation: &str) -> ApiResult<TaskId> {
    uuid::Uuid::parse_str(operation).map(TaskId).map_err(|_| {
        ApiError::bad_request(format!(
            "operation {operation:?} is not an operation this broker issued"
        ))
    })
}
