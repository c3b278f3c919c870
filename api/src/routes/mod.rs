//! One module per resource, each with its `router()`; the answers they share live here.

pub mod backups;
pub mod bindings;
pub mod catalog;
pub mod cluster;
pub mod dashboard;
pub mod events;
pub(crate) mod exclusive;
pub mod health;
pub mod instance_list;
pub mod instances;
pub(crate) mod last_operation;
pub mod metrics;
pub(crate) mod params;
pub mod presets;
pub mod price_check;
pub(crate) mod snapshot_common;
pub(crate) mod synchronous;

use axum::{
    Json,
    http::StatusCode,
    response::{IntoResponse, Response},
};
use broker::{
    catalog::{Catalog, PlanRef, Service},
    db::tasks::{NewTask, TaskRow},
    model::{Operation, TaskId},
};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use utoipa::ToSchema;

use crate::{
    AppState,
    error::{ApiError, ApiResult},
    webhook,
};

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

    /// The request's webhook, taken out of `parameters` (or from the query form), its secret sealed.
    pub fn take_webhook(
        &self,
        state: &AppState,
        parameters: &mut Value,
    ) -> ApiResult<Option<(String, Vec<u8>)>> {
        webhook::take(
            parameters,
            self.webhook.as_deref(),
            self.secret.as_deref(),
            &state.cipher,
            &state.webhook_targets,
        )
    }

    /// The webhook of a request without parameters: the query form only.
    pub fn webhook(&self, state: &AppState) -> ApiResult<Option<(String, Vec<u8>)>> {
        self.take_webhook(state, &mut json!({}))
    }
}

/// `maintenance_info` in a request body.
#[derive(Debug, Default, Deserialize, ToSchema)]
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

/// The published service `service_id`, or a 400.
pub(crate) fn lookup_service<'c>(catalog: &'c Catalog, service_id: &str) -> ApiResult<&'c Service> {
    catalog.service(service_id).ok_or_else(|| {
        ApiError::bad_request(format!(
            "service_id {service_id:?} is not a service in the catalog"
        ))
    })
}

/// The published plan `plan_id` of service `service_id`, or a 400 saying which is unknown.
pub(crate) fn lookup_plan<'c>(
    catalog: &'c Catalog,
    service_id: &str,
    plan_id: &str,
) -> ApiResult<PlanRef<'c>> {
    let service = lookup_service(catalog, service_id)?;
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

/// Who asked for an operation and whom to tell when it ends: what every task a request writes carries.
#[derive(Debug, Clone, Default)]
pub(crate) struct Origin {
    /// The `X-Broker-API-Originating-Identity` header, decoded.
    pub identity: Option<Value>,
    /// The webhook's URL and sealed secret.
    pub hook: Option<(String, Vec<u8>)>,
}

impl Origin {
    /// The task for an OSB `operation` on the instance (and binding).
    pub fn task(
        self,
        operation: Operation,
        instance_id: &str,
        binding_id: Option<&str>,
        payload: Value,
    ) -> NewTask {
        let mut task = NewTask::new(operation.task_kind(), payload);
        task.operation = Some(operation);
        task.instance_id = Some(instance_id.to_string());
        task.binding_id = binding_id.map(str::to_string);
        task.originating_identity = self.identity;
        task.webhook = self.hook;
        task
    }
}

pub(crate) fn is_active(task: &TaskRow) -> bool {
    !task.state.is_finished()
}

/// The body of a 202: the operation to poll (`last_operation?operation=`, or `/berth/v1/tasks/{operation}`).
#[derive(Debug, Serialize, ToSchema)]
pub struct Accepted {
    /// The task's id.
    #[schema(format = Uuid)]
    pub operation: String,
}

/// `{}`: the body of an answer that has nothing more to say.
#[derive(Debug, Default, Serialize, ToSchema)]
pub struct Empty {}

/// 202 `{"operation": "<task id>"}`. The task id also rides along as an extension, for
/// [`synchronous::settle`].
pub(crate) fn accepted(operation: TaskId) -> Response {
    let body = Accepted {
        operation: operation.to_string(),
    };
    let mut response = (StatusCode::ACCEPTED, Json(body)).into_response();
    response.extensions_mut().insert(operation);
    response
}

/// 202 with `body`, for berth's own routes that answer more than the operation.
pub(crate) fn accepted_with(body: impl Serialize) -> Response {
    (StatusCode::ACCEPTED, Json(body)).into_response()
}

/// 200 `{}`.
pub(crate) fn ok_empty() -> Response {
    (StatusCode::OK, Json(Empty {})).into_response()
}

/// 201 `{}`.
pub(crate) fn created_empty() -> Response {
    (StatusCode::CREATED, Json(Empty {})).into_response()
}

/// 410 `{}`.
pub(crate) fn gone() -> Response {
    (StatusCode::GONE, Json(Empty {})).into_response()
}

/// Parses `?operation=` as a task id, or a 400.
pub(crate) fn parse_operation(operation: &str) -> ApiResult<TaskId> {
    uuid::Uuid::parse_str(operation).map(TaskId).map_err(|_| {
        ApiError::bad_request(format!(
            "operation {operation:?} is not an operation this broker issued"
        ))
    })
}
