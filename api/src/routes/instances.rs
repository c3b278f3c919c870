//! `/v2/service_instances/{instance_id}`: provision (PUT), update (PATCH), deprovision (DELETE), fetch (GET)
//! and `last_operation`. Each accepted change writes the row and one task in one transaction, then answers 202.
//! Also the Akkeris action `PUT .../actions/credentials`: new credentials for every binding (asynchronous).

use axum::{
    Json, Router,
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{get, put},
};
use broker::{
    catalog::SchemaFor,
    db::{
        instances::{self, InstanceRow, NewInstance},
        tasks::{self, TaskRow},
    },
    model::{Operation, TaskState, UpdatePayload},
};
use serde::Deserialize;
use serde_json::{Value, json};
use sqlx::PgConnection;
use tokio::time::Instant;

use super::{
    MaintenanceInfoBody, OsbParams, accepted, check_id, check_maintenance, gone,
    last_operation_response, lookup_plan, object_or_empty, ok_empty, operation_task,
    parse_operation,
    synchronous::{self, Mode, Settled},
};
use crate::{
    AppState,
    error::{ApiError, ApiResult},
    extract::{OsbJson, OsbPath, OsbQuery},
    identity::OriginatingIdentity,
    snapshot_params::{self, At},
    webhook,
};

pub fn router() -> Router<AppState> {
    Router::new()
        .route(
            "/v2/service_instances/{instance_id}",
            get(fetch).put(provision).patch(update).delete(deprovision),
        )
        .route(
            "/v2/service_instances/{instance_id}/last_operation",
            get(last_operation),
        )
        .route(
            "/v2/service_instances/{instance_id}/actions/credentials",
            put(rotate_credentials),
        )
}

#[derive(Debug, Deserialize)]
struct ProvisionBody {
    service_id: String,
    plan_id: String,
    organization_guid: String,
    space_guid: String,
    context: Option<Value>,
    parameters: Option<Value>,
    maintenance_info: Option<MaintenanceInfoBody>,
}

async fn provision(
    State(state): State<AppState>,
    OsbPath(instance_id): OsbPath<String>,
    OsbQuery(query): OsbQuery<OsbParams>,
    OriginatingIdentity(identity): OriginatingIdentity,
    OsbJson(body): OsbJson<ProvisionBody>,
) -> ApiResult<Response> {
    let started = Instant::now();
    let mut mode = Mode::Async;
    let response = start_provision(&state, instance_id, query, identity, body, &mut mode).await?;
    match synchronous::settle(&state, mode, response, started).await? {
        Settled::Answered(response) => Ok(response),
        Settled::Succeeded => Ok((StatusCode::CREATED, Json(json!({}))).into_response()),
    }
}

/// Validates and records a provision; answers 202 (or the answer to a repeated request). Sets `mode`.
async fn start_provision(
    state: &AppState,
    instance_id: String,
    query: OsbParams,
    identity: Option<Value>,
    body: ProvisionBody,
    mode: &mut Mode,
) -> ApiResult<Response> {
    check_id("instance_id", &instance_id)?;
    for (field, value) in [
        ("organization_guid", &body.organization_guid),
        ("space_guid", &body.space_guid),
    ] {
        if value.is_empty() {
            return Err(ApiError::bad_request(format!(
                "`{field}` must be a non-empty string"
            )));
        }
    }
    let plan = lookup_plan(&state.catalog, &body.service_id, &body.plan_id)?;
    *mode = query.answer_mode(plan.synchronous())?;
    let mut parameters = object_or_empty(body.parameters, "parameters")?;
    state
        .catalog
        .validate(&plan.plan.id, SchemaFor::Provision, &parameters)
        .map_err(|e| ApiError::BadRequest(e.0))?;
    let hook = webhook::take(
        &mut parameters,
        query.webhook.as_deref(),
        query.secret.as_deref(),
        &state.cipher,
        &state.webhook_targets,
    )?;
    if snapshot_params::any(&parameters) {
        let mut conn = state.db.acquire().await?;
        snapshot_params::check(&mut conn, &parameters, At::Provision).await?;
    }
    let context = object_or_empty(body.context, "context")?;
    check_maintenance(
        body.maintenance_info
            .as_ref()
            .and_then(|m| m.version.as_deref()),
        &plan,
    )?;
    // The instance starts at its plan's maintenance version (a request may only name that same version).
    let maintenance_version = plan
        .plan
        .maintenance_info
        .as_ref()
        .map(|m| m.version.as_str());
    let new = NewInstance {
        id: &instance_id,
        service_id: &body.service_id,
        plan_id: &body.plan_id,
        organization_guid: &body.organization_guid,
        space_guid: &body.space_guid,
        context: &context,
        parameters: &parameters,
        maintenance_version,
    };

    // Fast path, a new id: the row and its task in one statement, batched with concurrent provisions.
    let task = operation_task(
        Operation::Provision,
        &instance_id,
        None,
        json!({}),
        identity.clone(),
        hook.clone(),
    );
    if let Some(operation) = state.provisions.insert(&new, task).await? {
        return Ok(accepted(operation));
    }

    let mut tx = state.db.begin().await?;
    // A concurrent request may insert the same id first (our insert then waits for it and does nothing), or
    // a deprovision may delete the row between our insert and our read: go round again.
    for _ in 0..3 {
        if instances::insert(&mut *tx, &new).await? {
            let task = operation_task(
                Operation::Provision,
                &instance_id,
                None,
                json!({}),
                identity,
                hook,
            );
            let operation = tasks::enqueue(&mut *tx, task).await?;
            tx.commit().await?;
            return Ok(accepted(operation));
        }
        let Some(row) = instances::get_for_update(&mut *tx, &instance_id).await? else {
            continue;
        };
        let outcome = provision_existing(&mut tx, &row, &new, identity, hook).await?;
        if outcome.status() == StatusCode::ACCEPTED {
            tx.commit().await?;
        }
        return Ok(outcome);
    }
    Err(anyhow::anyhow!(
        "instance {instance_id} was created and deleted repeatedly while provisioning it"
    )
    .into())
}

/// A provision request for an id that exists: the same request again (answered from its task), or a conflict.
async fn provision_existing(
    tx: &mut PgConnection,
    row: &InstanceRow,
    new: &NewInstance<'_>,
    identity: Option<Value>,
    hook: Option<(String, Vec<u8>)>,
) -> ApiResult<Response> {
    let identical = row.service_id == new.service_id
        && row.plan_id == new.plan_id
        && row.organization_guid == new.organization_guid
        && row.space_guid == new.space_guid
        && row.parameters == *new.parameters
        && row.maintenance_version.as_deref() == new.maintenance_version;
    if !identical {
        return Err(ApiError::Conflict(format!(
            "service instance {} already exists with different attributes",
            row.id
        )));
    }
    let active = tasks::active_operations(&mut *tx, &row.id).await?;
    if let Some(task) = active.iter().find(|t| t.binding_id.is_none()) {
        return match task.operation {
            Some(Operation::Provision) => Ok(accepted(task.task_id())),
            _ => Err(concurrency(&row.id, task)),
        };
    }
    let latest = tasks::latest_instance_operation(&mut *tx, &row.id).await?;
    match latest.as_ref().map(|t| (t.operation, t.state)) {
        Some((Some(Operation::Provision), TaskState::Succeeded))
        | Some((
            Some(
                Operation::Update
                | Operation::RotateCredentials
                | Operation::Switchover
                | Operation::Failover,
            ),
            _,
        )) => Ok(ok_empty()),
        Some((Some(Operation::Deprovision), _)) => Err(ApiError::Conflict(format!(
            "service instance {} is being deleted (its last deprovision failed); deprovision it again",
            row.id
        ))),
        // The provision failed (or, which should not happen, has no task): provisioning is idempotent, try again.
        _ => {
            let task = operation_task(
                Operation::Provision,
                &row.id,
                None,
                json!({}),
                identity,
                hook,
            );
            Ok(accepted(tasks::enqueue(&mut *tx, task).await?))
        }
    }
}

pub(crate) fn concurrency(instance_id: &str, task: &broker::db::tasks::TaskRow) -> ApiError {
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

/// The instance, if it exists and its provision has succeeded; otherwise, for an operation on it: 404 when there
/// is no such instance, 422 `ConcurrencyError` while its provision (or another operation) runs, and 422 when its
/// provision failed (the platform deprovisions it, or provisions it again).
pub(crate) async fn provisioned_instance(
    db: &mut PgConnection,
    instance_id: &str,
    lock: bool,
) -> ApiResult<InstanceRow> {
    match instance_state(db, instance_id, lock).await? {
        InstanceState::Provisioned(row) => Ok(row),
        InstanceState::Missing => Err(ApiError::NotFound(format!(
            "service instance {instance_id} does not exist"
        ))),
        InstanceState::Busy(task) => Err(concurrency(instance_id, &task)),
        InstanceState::ProvisionFailed => Err(ApiError::Unprocessable(format!(
            "the provision of service instance {instance_id} failed; deprovision it, or provision it again"
        ))),
    }
}

/// The instance for a read (GET): 404 unless it exists and its provision has succeeded, as OSB says.
pub(crate) async fn visible_instance(
    db: &mut PgConnection,
    instance_id: &str,
) -> ApiResult<InstanceRow> {
    match instance_state(db, instance_id, false).await? {
        InstanceState::Provisioned(row) => Ok(row),
        _ => Err(ApiError::NotFound(format!(
            "service instance {instance_id} does not exist or is still being provisioned"
        ))),
    }
}

pub(crate) enum InstanceState {
    Missing,
    Provisioned(InstanceRow),
    /// Not provisioned yet: its provision (or a deprovision after a failed one) is running.
    Busy(TaskRow),
    ProvisionFailed,
}

pub(crate) async fn instance_state(
    db: &mut PgConnection,
    instance_id: &str,
    lock: bool,
) -> ApiResult<InstanceState> {
    let row = if lock {
        instances::get_for_update(&mut *db, instance_id).await?
    } else {
        instances::get(&mut *db, instance_id).await?
    };
    let Some(row) = row else {
        return Ok(InstanceState::Missing);
    };
    let provisioned = tasks::has_succeeded_since(
        &mut *db,
        instance_id,
        None,
        Operation::Provision,
        row.created_at,
    )
    .await?;
    if provisioned {
        return Ok(InstanceState::Provisioned(row));
    }
    let active = tasks::active_operations(&mut *db, instance_id).await?;
    Ok(match active.into_iter().find(|t| t.binding_id.is_none()) {
        Some(task) => InstanceState::Busy(task),
        None => InstanceState::ProvisionFailed,
    })
}

#[derive(Debug, Deserialize)]
struct UpdateBody {
    service_id: String,
    plan_id: Option<String>,
    parameters: Option<Value>,
    context: Option<Value>,
    maintenance_info: Option<MaintenanceInfoBody>,
}

async fn update(
    State(state): State<AppState>,
    OsbPath(instance_id): OsbPath<String>,
    OsbQuery(query): OsbQuery<OsbParams>,
    OriginatingIdentity(identity): OriginatingIdentity,
    OsbJson(body): OsbJson<UpdateBody>,
) -> ApiResult<Response> {
    let started = Instant::now();
    let mut mode = Mode::Async;
    let response = start_update(&state, instance_id, query, identity, body, &mut mode).await?;
    match synchronous::settle(&state, mode, response, started).await? {
        Settled::Answered(response) => Ok(response),
        Settled::Succeeded => Ok(ok_empty()),
    }
}

/// Validates and records an update; answers 202 (or 200 for a context-only change). Sets `mode`.
async fn start_update(
    state: &AppState,
    instance_id: String,
    query: OsbParams,
    identity: Option<Value>,
    body: UpdateBody,
    mode: &mut Mode,
) -> ApiResult<Response> {
    check_id("instance_id", &instance_id)?;
    let catalog = &state.catalog;
    let service = catalog.service(&body.service_id).ok_or_else(|| {
        ApiError::bad_request(format!(
            "service_id {:?} is not a service in the catalog",
            body.service_id
        ))
    })?;
    let request_parameters = body
        .parameters
        .map(|p| object_or_empty(Some(p), "parameters"))
        .transpose()?;
    let parameters_given = request_parameters.is_some();
    let context = body
        .context
        .map(|c| object_or_empty(Some(c), "context"))
        .transpose()?;

    let mut tx = state.db.begin().await?;
    let row = provisioned_instance(&mut tx, &instance_id, true).await?;
    if row.service_id != body.service_id {
        return Err(ApiError::bad_request(format!(
            "service instance {instance_id} belongs to service {:?}, not {:?}",
            row.service_id, body.service_id
        )));
    }
    let target_plan_id = body.plan_id.clone().unwrap_or_else(|| row.plan_id.clone());
    let plan_changes = target_plan_id != row.plan_id;
    let target = catalog
        .plan(&row.service_id, &target_plan_id)
        .ok_or_else(|| {
            if catalog.plan_by_id(&target_plan_id).is_some() {
                ApiError::bad_request(format!(
                    "plan_id {target_plan_id:?} belongs to another service than {:?}",
                    service.name
                ))
            } else {
                ApiError::bad_request(format!(
                    "plan_id {target_plan_id:?} is not a plan of service {:?}",
                    service.name
                ))
            }
        })?;
    if plan_changes {
        let updateable = catalog
            .plan_by_id(&row.plan_id)
            .map_or(service.plan_updateable, |p| p.plan_updateable());
        if !updateable {
            return Err(ApiError::Unprocessable(format!(
                "the plan of service instance {instance_id} cannot be changed (its plan is not plan_updateable)"
            )));
        }
        // A change the engine cannot make (turning S3 versioning off) is refused now, not queued to fail.
        if let Some(why) = catalog
            .plan_by_id(&row.plan_id)
            .and_then(|current| current.cannot_change_to(target.plan))
        {
            return Err(ApiError::Unprocessable(why));
        }
    }
    // Only parameters the request carries are checked: an update without any (a plan or context change)
    // must not fail a schema's `required`.
    let mut parameters = request_parameters.unwrap_or_else(|| json!({}));
    if parameters_given {
        catalog
            .validate(&target.plan.id, SchemaFor::Update, &parameters)
            .map_err(|e| ApiError::BadRequest(e.0))?;
        if snapshot_params::any(&parameters) {
            snapshot_params::check(&mut tx, &parameters, At::Update).await?;
        }
    }
    let hook = webhook::take(
        &mut parameters,
        query.webhook.as_deref(),
        query.secret.as_deref(),
        &state.cipher,
        &state.webhook_targets,
    )?;
    let requested_version = body
        .maintenance_info
        .as_ref()
        .and_then(|m| m.version.as_deref());
    check_maintenance(requested_version, &target)?;

    let parameters_change = parameters.as_object().is_some_and(|m| !m.is_empty()) || hook.is_some();
    let maintenance_changes =
        requested_version.is_some_and(|v| Some(v) != row.maintenance_version.as_deref());
    let context_only = !plan_changes && !parameters_change && !maintenance_changes;

    let mut merged = row.parameters.as_object().cloned().unwrap_or_default();
    merged.extend(parameters.as_object().cloned().unwrap_or_default());
    merged.remove("webhook");
    let maintenance_version = match requested_version {
        Some(v) => Some(v.to_string()),
        None if plan_changes => target
            .plan
            .maintenance_info
            .as_ref()
            .map(|m| m.version.clone()),
        None => None,
    };
    let select_preset = parameters.get("preset").is_some_and(|p| !p.is_null());
    let payload = UpdatePayload {
        plan_id: target_plan_id,
        parameters: Value::Object(merged),
        context: context.clone().unwrap_or_else(|| row.context.clone()),
        maintenance_version,
        select_preset,
    };
    let payload = serde_json::to_value(&payload)
        .map_err(|e| anyhow::Error::new(e).context("serializing an update"))?;

    // Synchronous only when both the current and the target plan are.
    let sync_allowed = target.synchronous()
        && catalog
            .plan_by_id(&row.plan_id)
            .is_some_and(|current| current.synchronous());
    let active = tasks::active_operations(&mut *tx, &instance_id).await?;
    if let Some(task) = active.first() {
        // OSB: a re-sent PATCH whose update has not completed yet is 202 with the same operation (a synchronous
        // client waits for it again).
        let resent = !context_only
            && task.binding_id.is_none()
            && task.operation == Some(Operation::Update)
            && task.payload == payload;
        if resent && (query.accepts_incomplete() || sync_allowed) {
            *mode = query.answer_mode(sync_allowed)?;
            return Ok(accepted(task.task_id()));
        }
        return Err(concurrency(&instance_id, task));
    }

    if context_only {
        // Only the context (or nothing) changes: nothing to do on the provider, so apply it now.
        if let Some(context) = &context {
            instances::set_context(&mut *tx, &instance_id, context).await?;
        }
        tx.commit().await?;
        return Ok(ok_empty());
    }
    *mode = query.answer_mode(sync_allowed)?;

    let task = operation_task(
        Operation::Update,
        &instance_id,
        None,
        payload,
        identity,
        hook,
    );
    let operation = tasks::enqueue(&mut *tx, task).await?;
    tx.commit().await?;
    Ok(accepted(operation))
}

async fn deprovision(
    State(state): State<AppState>,
    OsbPath(instance_id): OsbPath<String>,
    OsbQuery(query): OsbQuery<OsbParams>,
    OriginatingIdentity(identity): OriginatingIdentity,
) -> ApiResult<Response> {
    let started = Instant::now();
    let mut mode = Mode::Async;
    let response = start_deprovision(&state, instance_id, query, identity, &mut mode).await?;
    match synchronous::settle(&state, mode, response, started).await? {
        Settled::Answered(response) => Ok(response),
        Settled::Succeeded => Ok(ok_empty()),
    }
}

/// Records a deprovision; answers 202 (or 410). Sets `mode`.
async fn start_deprovision(
    state: &AppState,
    instance_id: String,
    query: OsbParams,
    identity: Option<Value>,
    mode: &mut Mode,
) -> ApiResult<Response> {
    check_id("instance_id", &instance_id)?;
    query.require_service_and_plan()?;
    let hook = webhook::take(
        &mut json!({}),
        query.webhook.as_deref(),
        query.secret.as_deref(),
        &state.cipher,
        &state.webhook_targets,
    )?;

    let mut tx = state.db.begin().await?;
    let Some(row) = instances::get_for_update(&mut *tx, &instance_id).await? else {
        return Ok(gone());
    };
    // The instance's plan (not the query's) says whether it may be deleted synchronously.
    let sync_allowed = state
        .catalog
        .plan_by_id(&row.plan_id)
        .is_some_and(|plan| plan.synchronous());
    *mode = query.answer_mode(sync_allowed)?;
    let active = tasks::active_operations(&mut *tx, &instance_id).await?;
    if let Some(task) = active
        .iter()
        .find(|t| t.binding_id.is_none() && t.operation == Some(Operation::Deprovision))
    {
        return Ok(accepted(task.task_id()));
    }
    // A provision still in progress (the platform cleaning up after a provision that timed out) does not
    // block: the worker cancels it if it has not started, or runs the deprovision once it has ended.
    if let Some(task) = active
        .iter()
        .find(|t| t.operation != Some(Operation::Provision))
    {
        return Err(concurrency(&instance_id, task));
    }
    let task = operation_task(
        Operation::Deprovision,
        &instance_id,
        None,
        json!({}),
        identity,
        hook,
    );
    let operation = tasks::enqueue(&mut *tx, task).await?;
    tx.commit().await?;
    Ok(accepted(operation))
}

/// The Akkeris action `PUT /v2/service_instances/{id}/actions/credentials`: every binding of the instance gets
/// new credentials, stored sealed in place of the old ones, which are revoked once the new ones are stored.
/// Always asynchronous (202 + operation, polled on `last_operation` like an update); the same request while that
/// rotation runs gets its operation again. Refused, writing nothing: an unknown instance (404), one not
/// provisioned or with another operation in progress (422 `ConcurrencyError`; 422 after a failed provision), or a plan whose bindings have no credentials
/// of their own to rotate (422).
async fn rotate_credentials(
    State(state): State<AppState>,
    OsbPath(instance_id): OsbPath<String>,
    OsbQuery(query): OsbQuery<OsbParams>,
    OriginatingIdentity(identity): OriginatingIdentity,
) -> ApiResult<Response> {
    check_id("instance_id", &instance_id)?;
    let hook = webhook::take(
        &mut json!({}),
        query.webhook.as_deref(),
        query.secret.as_deref(),
        &state.cipher,
        &state.webhook_targets,
    )?;

    let mut tx = state.db.begin().await?;
    let row = provisioned_instance(&mut tx, &instance_id, true).await?;
    let active = tasks::active_operations(&mut *tx, &instance_id).await?;
    if let Some(task) = active
        .iter()
        .find(|t| t.binding_id.is_none() && t.operation == Some(Operation::RotateCredentials))
    {
        return Ok(accepted(task.task_id()));
    }
    if let Some(task) = active.first() {
        return Err(concurrency(&instance_id, task));
    }
    let plan = state.catalog.plan_by_id(&row.plan_id).ok_or_else(|| {
        ApiError::Unprocessable(format!(
            "service instance {instance_id} is on plan {:?}, which is no longer in the catalog",
            row.plan_id
        ))
    })?;
    if !plan.can_rotate_credentials() {
        return Err(ApiError::Unprocessable(format!(
            "plan {:?} cannot rotate credentials: its bindings have no credentials of their own (bind anew, or \
             use OSB binding rotation where the plan is binding_rotatable)",
            plan.plan.name
        )));
    }
    let latest = tasks::latest_instance_operation(&mut *tx, &instance_id).await?;
    if latest.as_ref().and_then(|t| t.operation) == Some(Operation::Deprovision) {
        return Err(ApiError::Unprocessable(format!(
            "service instance {instance_id} is being deleted (its last deprovision failed); deprovision it again"
        )));
    }
    let task = operation_task(
        Operation::RotateCredentials,
        &instance_id,
        None,
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
    OsbPath(instance_id): OsbPath<String>,
) -> ApiResult<Response> {
    let mut conn = state.db.acquire().await?;
    let row = visible_instance(&mut conn, &instance_id).await?;
    let active = tasks::active_operations(&mut *conn, &instance_id).await?;
    if let Some(task) = active
        .iter()
        .find(|t| t.binding_id.is_none() && t.operation == Some(Operation::Update))
    {
        return Err(concurrency(&instance_id, task));
    }
    let mut body = json!({
        "service_id": row.service_id,
        "plan_id": row.plan_id,
        "parameters": row.parameters,
    });
    if let Some(version) = row.maintenance_version {
        body["maintenance_info"] = json!({ "version": version });
    }
    Ok((StatusCode::OK, Json(body)).into_response())
}

async fn last_operation(
    State(state): State<AppState>,
    OsbPath(instance_id): OsbPath<String>,
    OsbQuery(query): OsbQuery<OsbParams>,
) -> ApiResult<Response> {
    let mut conn = state.db.acquire().await?;
    let row = instances::get(&mut *conn, &instance_id).await?;
    let task = match query.operation.as_deref().filter(|o| !o.is_empty()) {
        Some(operation) => {
            let id = parse_operation(operation)?;
            match tasks::get(&mut *conn, id).await? {
                Some(task)
                    if task.instance_id.as_deref() == Some(&instance_id)
                        && task.binding_id.is_none() =>
                {
                    Some(task)
                }
                None if row.is_none() => None,
                _ => {
                    return Err(ApiError::bad_request(format!(
                        "operation {operation} is not an operation on service instance {instance_id}"
                    )));
                }
            }
        }
        None => tasks::latest_instance_operation(&mut *conn, &instance_id).await?,
    };
    let Some(task) = task else {
        return Err(ApiError::NotFound(format!(
            "service instance {instance_id} does not exist"
        )));
    };
    if row.is_none()
        && task.operation == Some(Operation::Deprovision)
        && task.state == TaskState::Succeeded
    {
        return Ok(gone());
    }
    Ok(last_operation_response(&task, true))
}
