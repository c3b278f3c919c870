//! `/v2/service_instances/{instance_id}/service_bindings/{binding_id}`: bind (PUT), unbind (DELETE), fetch (GET)
//! and `last_operation`. The worker writes the sealed credentials; a client that does not send
//! `accepts_incomplete=true` gets its answer once the task has finished (see `synchronous`).
//!
//! A bind on an instance that does not exist or whose provision has not succeeded is a 404 (the spec leaves
//! this open; 404 tells the platform the instance is not there to bind to).

use axum::{
    Json, Router,
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::get,
};
use broker::{
    catalog::SchemaFor,
    crypto::Cipher,
    db::{
        bindings::{self, BindingRow, NewBinding},
        instances,
        tasks::{self, TaskRow},
    },
    model::{Operation, TaskState},
};
use serde::Deserialize;
use serde_json::{Value, json};
use sqlx::PgConnection;
use tokio::time::Instant;

use super::{
    OsbParams, accepted, check_id, gone, is_active, last_operation_response, lookup_plan,
    object_or_empty, ok_empty, operation_of, operation_task, parse_operation,
    synchronous::{self, Settled},
};
use crate::{
    AppState,
    error::{ApiError, ApiResult},
    extract::{OsbJson, OsbPath, OsbQuery},
    identity::OriginatingIdentity,
    webhook,
};

const BINDING_PATH: &str = "/v2/service_instances/{instance_id}/service_bindings/{binding_id}";

pub fn router() -> Router<AppState> {
    Router::new()
        .route(BINDING_PATH, get(fetch).put(bind).delete(unbind))
        .route(
            &format!("{BINDING_PATH}/last_operation"),
            get(last_operation),
        )
}

#[derive(Debug, Deserialize)]
struct BindBody {
    service_id: String,
    plan_id: String,
    context: Option<Value>,
    app_guid: Option<String>,
    bind_resource: Option<Value>,
    parameters: Option<Value>,
    /// OSB binding rotation: the binding this one replaces. Both stay valid until the old one is deleted.
    predecessor_binding_id: Option<String>,
}

async fn bind(
    State(state): State<AppState>,
    OsbPath((instance_id, binding_id)): OsbPath<(String, String)>,
    OsbQuery(query): OsbQuery<OsbParams>,
    OriginatingIdentity(identity): OriginatingIdentity,
    OsbJson(body): OsbJson<BindBody>,
) -> ApiResult<Response> {
    // Every plan binds synchronously for a client that does not accept asynchronous answers.
    let started = Instant::now();
    let mode = query.answer_mode(true)?;
    let response = start_bind(
        &state,
        instance_id,
        binding_id.clone(),
        query,
        identity,
        body,
    )
    .await?;
    match synchronous::settle(&state, mode, response, started).await? {
        Settled::Answered(response) => Ok(response),
        Settled::Succeeded => {
            let row = bindings::get(&state.db, &binding_id)
                .await?
                .ok_or_else(|| {
                    ApiError::OperationFailed(format!(
                        "binding {binding_id} was deleted while it was being created"
                    ))
                })?;
            Ok((
                StatusCode::CREATED,
                Json(credentials_body(&state.cipher, &row, false)?),
            )
                .into_response())
        }
    }
}

/// Validates and records a bind; answers 202 (or the answer to a repeated request).
async fn start_bind(
    state: &AppState,
    instance_id: String,
    binding_id: String,
    query: OsbParams,
    identity: Option<Value>,
    body: BindBody,
) -> ApiResult<Response> {
    check_id("instance_id", &instance_id)?;
    check_id("binding_id", &binding_id)?;
    let plan = lookup_plan(&state.catalog, &body.service_id, &body.plan_id)?;
    if !plan.bindable() {
        return Err(ApiError::bad_request(format!(
            "plan {:?} is not bindable",
            plan.plan.name
        )));
    }
    let parameters_given = body.parameters.is_some();
    let mut parameters = object_or_empty(body.parameters, "parameters")?;
    state
        .catalog
        .validate(&plan.plan.id, SchemaFor::Bind, &parameters)
        .map_err(|e| ApiError::BadRequest(e.0))?;
    if let Some(predecessor) = &body.predecessor_binding_id {
        let inherited = rotation_parameters(state, &plan, &instance_id, predecessor).await?;
        if !parameters_given {
            parameters = inherited;
        }
    }
    let hook = webhook::take(
        &mut parameters,
        query.webhook.as_deref(),
        query.secret.as_deref(),
        &state.cipher,
    )?;
    let context = object_or_empty(body.context, "context")?;
    let bind_resource = object_or_empty(body.bind_resource, "bind_resource")?;
    // `app_guid` is deprecated in favour of `bind_resource.app_guid`; keep whichever the platform sent.
    let app_guid = body
        .app_guid
        .clone()
        .or_else(|| bind_resource["app_guid"].as_str().map(str::to_string));
    let new = NewBinding {
        id: &binding_id,
        instance_id: &instance_id,
        service_id: &body.service_id,
        plan_id: &body.plan_id,
        app_guid: app_guid.as_deref(),
        bind_resource: &bind_resource,
        context: &context,
        parameters: &parameters,
    };

    let mut tx = state.db.begin().await?;
    // Lock order everywhere: instance row, then binding row.
    let instance = instances::get_for_update(&mut *tx, &instance_id).await?;
    let not_found = || {
        ApiError::NotFound(format!(
            "service instance {instance_id} does not exist or is still being provisioned"
        ))
    };
    let instance = instance.ok_or_else(not_found)?;
    let provisioned = tasks::has_succeeded_since(
        &mut *tx,
        &instance_id,
        None,
        Operation::Provision.as_str(),
        instance.created_at,
    )
    .await?;
    if !provisioned {
        return Err(not_found());
    }
    if instance.service_id != body.service_id || instance.plan_id != body.plan_id {
        return Err(ApiError::bad_request(format!(
            "service instance {instance_id} is of service_id {:?} and plan_id {:?}, not those in the request",
            instance.service_id, instance.plan_id
        )));
    }
    let active = tasks::active_operations(&mut *tx, &instance_id).await?;
    if let Some(task) = active.iter().find(|t| t.binding_id.is_none()) {
        return Err(ApiError::Concurrency(format!(
            "service instance {instance_id} has a {} in progress (operation {}); try again when it has finished",
            task.operation.as_deref().unwrap_or("operation"),
            task.id
        )));
    }

    for _ in 0..3 {
        if bindings::insert(&mut *tx, &new).await? {
            let task = operation_task(
                Operation::Bind,
                &instance_id,
                Some(&binding_id),
                json!({}),
                identity,
                hook,
            );
            let operation = tasks::enqueue(&mut *tx, task).await?;
            tx.commit().await?;
            return Ok(accepted(operation));
        }
        let Some(row) = bindings::get_for_update(&mut *tx, &binding_id).await? else {
            continue;
        };
        let outcome = bind_existing(&mut tx, &state.cipher, &row, &new, identity, hook).await?;
        if outcome.status() == StatusCode::ACCEPTED {
            tx.commit().await?;
        }
        return Ok(outcome);
    }
    Err(
        anyhow::anyhow!("binding {binding_id} was created and deleted repeatedly while binding it")
            .into(),
    )
}

/// Checks a rotation (the plan allows it, the predecessor is a binding of this instance) and returns the
/// predecessor's parameters, which the new binding takes when the request brings none.
async fn rotation_parameters(
    state: &AppState,
    plan: &broker::catalog::PlanRef<'_>,
    instance_id: &str,
    predecessor: &str,
) -> ApiResult<Value> {
    if plan.plan.binding_rotatable != Some(true) {
        return Err(ApiError::bad_request(format!(
            "plan {:?} does not support binding rotation (it is not binding_rotatable)",
            plan.plan.name
        )));
    }
    match bindings::get(&state.db, predecessor).await? {
        Some(row) if row.instance_id == instance_id => {
            let mut parameters = row.parameters;
            if let Some(map) = parameters.as_object_mut() {
                map.remove("webhook");
            }
            Ok(parameters)
        }
        _ => Err(ApiError::bad_request(format!(
            "predecessor_binding_id {predecessor:?} is not a binding of service instance {instance_id}"
        ))),
    }
}

/// A bind request for a binding id that exists: the same request again (answered from its task), or a conflict.
async fn bind_existing(
    tx: &mut PgConnection,
    cipher: &Cipher,
    row: &BindingRow,
    new: &NewBinding<'_>,
    identity: Option<Value>,
    hook: Option<(String, Vec<u8>)>,
) -> ApiResult<Response> {
    if row.instance_id != new.instance_id {
        return Err(ApiError::Conflict(format!(
            "binding id {} is already used by another service instance",
            row.id
        )));
    }
    let identical = row.service_id == new.service_id
        && row.plan_id == new.plan_id
        && row.app_guid.as_deref() == new.app_guid
        && row.bind_resource == *new.bind_resource
        && row.parameters == *new.parameters;
    if !identical {
        return Err(ApiError::Conflict(format!(
            "binding {} already exists with different attributes",
            row.id
        )));
    }
    let latest = tasks::latest_binding_operation(&mut *tx, &row.id).await?;
    match latest.as_ref().map(|t| (operation_of(t), t.state(), t)) {
        Some((Some(Operation::Bind), TaskState::Pending | TaskState::Running, task)) => {
            Ok(accepted(task.task_id()))
        }
        Some((Some(Operation::Bind), TaskState::Succeeded, _)) => {
            Ok((StatusCode::OK, Json(credentials_body(cipher, row, false)?)).into_response())
        }
        Some((Some(Operation::Unbind), state, task)) => Err(if state.is_finished() {
            ApiError::Conflict(format!(
                "binding {} is being deleted (its last unbind failed); unbind it again",
                row.id
            ))
        } else {
            binding_concurrency(row, task)
        }),
        // The bind failed (or, which should not happen, has no task): binding is idempotent, try again.
        _ => {
            let task = operation_task(
                Operation::Bind,
                &row.instance_id,
                Some(&row.id),
                json!({}),
                identity,
                hook,
            );
            Ok(accepted(tasks::enqueue(&mut *tx, task).await?))
        }
    }
}

fn binding_concurrency(row: &BindingRow, task: &TaskRow) -> ApiError {
    ApiError::Concurrency(format!(
        "binding {} has a {} in progress (operation {}); try again when it has finished",
        row.id,
        task.operation.as_deref().unwrap_or("operation"),
        task.id
    ))
}

/// `{credentials, endpoints?}` (and `parameters` for a fetch) of a binding whose bind succeeded.
fn credentials_body(cipher: &Cipher, row: &BindingRow, with_parameters: bool) -> ApiResult<Value> {
    let mut body = json!({});
    if let Some(sealed) = &row.credentials {
        let credentials: Value = cipher
            .open_json(sealed)
            .map_err(|e| e.context(format!("opening the credentials of binding {}", row.id)))?;
        body["credentials"] = credentials;
    }
    if let Some(endpoints) = row.details.get("endpoints").filter(|e| !e.is_null()) {
        body["endpoints"] = endpoints.clone();
    }
    if with_parameters {
        body["parameters"] = row.parameters.clone();
    }
    Ok(body)
}

async fn unbind(
    State(state): State<AppState>,
    OsbPath((instance_id, binding_id)): OsbPath<(String, String)>,
    OsbQuery(query): OsbQuery<OsbParams>,
    OriginatingIdentity(identity): OriginatingIdentity,
) -> ApiResult<Response> {
    let started = Instant::now();
    let mode = query.answer_mode(true)?;
    let response = start_unbind(&state, instance_id, binding_id, query, identity).await?;
    match synchronous::settle(&state, mode, response, started).await? {
        Settled::Answered(response) => Ok(response),
        Settled::Succeeded => Ok(ok_empty()),
    }
}

/// Records an unbind; answers 202 (or 410).
async fn start_unbind(
    state: &AppState,
    instance_id: String,
    binding_id: String,
    query: OsbParams,
    identity: Option<Value>,
) -> ApiResult<Response> {
    check_id("instance_id", &instance_id)?;
    check_id("binding_id", &binding_id)?;
    query.require_service_and_plan()?;
    let hook = webhook::take(
        &mut json!({}),
        query.webhook.as_deref(),
        query.secret.as_deref(),
        &state.cipher,
    )?;

    let mut tx = state.db.begin().await?;
    // Lock order everywhere: instance row, then binding row.
    if instances::get_for_update(&mut *tx, &instance_id)
        .await?
        .is_none()
    {
        return Ok(gone());
    }
    let row = match bindings::get_for_update(&mut *tx, &binding_id).await? {
        Some(row) if row.instance_id == instance_id => row,
        _ => return Ok(gone()),
    };
    if let Some(task) = tasks::latest_binding_operation(&mut *tx, &binding_id)
        .await?
        .filter(is_active)
    {
        match operation_of(&task) {
            Some(Operation::Unbind) => return Ok(accepted(task.task_id())),
            // A bind still in progress (the platform cleaning up after a bind that timed out) does not block:
            // the worker cancels it if it has not started, or runs the unbind once it has ended.
            Some(Operation::Bind) => {}
            _ => return Err(binding_concurrency(&row, &task)),
        }
    }
    // A credentials rotation is giving this binding a new key: unbinding under it would leave the rotation a
    // user to rotate that is being deleted.
    if let Some(task) = tasks::active_operations(&mut *tx, &instance_id)
        .await?
        .into_iter()
        .find(|t| operation_of(t) == Some(Operation::RotateCredentials))
    {
        return Err(ApiError::Concurrency(format!(
            "service instance {instance_id} has a credentials rotation in progress (operation {}); try again \
             when it has finished",
            task.id
        )));
    }
    let task = operation_task(
        Operation::Unbind,
        &instance_id,
        Some(&binding_id),
        json!({}),
        identity,
        hook,
    );
    let operation = tasks::enqueue(&mut *tx, task).await?;
    tx.commit().await?;
    Ok(accepted(operation))
}

async fn fetch(
    State(state): State<AppState>,
    OsbPath((instance_id, binding_id)): OsbPath<(String, String)>,
) -> ApiResult<Response> {
    let mut conn = state.db.acquire().await?;
    let not_found = || {
        ApiError::NotFound(format!(
            "binding {binding_id} does not exist or is still being created"
        ))
    };
    let row = match bindings::get(&mut *conn, &binding_id).await? {
        Some(row) if row.instance_id == instance_id => row,
        _ => return Err(not_found()),
    };
    let bound = tasks::has_succeeded_since(
        &mut *conn,
        &instance_id,
        Some(&binding_id),
        Operation::Bind.as_str(),
        row.created_at,
    )
    .await?;
    if !bound {
        return Err(not_found());
    }
    Ok((
        StatusCode::OK,
        Json(credentials_body(&state.cipher, &row, true)?),
    )
        .into_response())
}

async fn last_operation(
    State(state): State<AppState>,
    OsbPath((instance_id, binding_id)): OsbPath<(String, String)>,
    OsbQuery(query): OsbQuery<OsbParams>,
) -> ApiResult<Response> {
    let mut conn = state.db.acquire().await?;
    let row = bindings::get(&mut *conn, &binding_id)
        .await?
        .filter(|r| r.instance_id == instance_id);
    let belongs = |task: &TaskRow| {
        task.binding_id.as_deref() == Some(&binding_id)
            && task.instance_id.as_deref() == Some(&instance_id)
    };
    let task = match query.operation.as_deref().filter(|o| !o.is_empty()) {
        Some(operation) => {
            let id = parse_operation(operation)?;
            match tasks::get(&mut *conn, id).await? {
                Some(task) if belongs(&task) => Some(task),
                None if row.is_none() => None,
                _ => {
                    return Err(ApiError::bad_request(format!(
                        "operation {operation} is not an operation on binding {binding_id}"
                    )));
                }
            }
        }
        None => tasks::latest_binding_operation(&mut *conn, &binding_id)
            .await?
            .filter(belongs),
    };
    let Some(task) = task else {
        return Err(ApiError::NotFound(format!(
            "binding {binding_id} does not exist"
        )));
    };
    if row.is_none()
        && operation_of(&task) == Some(Operation::Unbind)
        && task.state() == TaskState::Succeeded
    {
        return Ok(gone());
    }
    Ok(last_operation_response(&task, false))
}
