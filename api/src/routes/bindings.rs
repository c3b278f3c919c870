//! `/v2/service_instances/{instance_id}/service_bindings/{binding_id}`: bind (PUT), unbind (DELETE), fetch (GET)
//! and `last_operation`. The worker writes the sealed credentials; a client that does not send
//! `accepts_incomplete=true` gets its answer once the task has finished (see `synchronous`).
//!
//! A bind on an instance that does not exist is a 404; while its provision runs, 422 `ConcurrencyError`; after
//! its provision failed, 422 (see `instances::provisioned_instance`).

use axum::{
    Json, Router,
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::get,
};
use broker::{
    catalog::{EXPIRES_IN, PlanRef, SchemaFor},
    crypto::Cipher,
    db::{
        bindings::{self, BindingRow, NewBinding},
        instances,
        tasks::{self, TaskRow},
    },
    model::{Operation, TaskState},
};
use chrono::{DateTime, SubsecRound, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sqlx::{PgConnection, Postgres, Transaction};
use tokio::time::Instant;
use utoipa::ToSchema;

use super::{
    Accepted, Empty, Origin, OsbParams, accepted, check_id,
    exclusive::{self, Again},
    gone,
    instances::provisioned_instance,
    is_active,
    last_operation::{self, LastOperation, Polled},
    lookup_plan, object_or_empty, ok_empty,
    params::{AcceptsIncomplete, BindingIdPath, DeleteQuery, PollQuery, WebhookQuery},
    synchronous::{self, Settled},
};
use crate::{
    AppState,
    error::{ApiError, ApiResult, ErrorBody},
    extract::{OsbJson, OsbPath, OsbQuery},
    identity::OriginatingIdentity,
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

/// A bind request. The example is the shipped catalog's `postgres` service and its `shared` plan.
#[derive(Debug, Deserialize, ToSchema)]
#[schema(examples(json!({
    "service_id": "3bdd3b6c-801f-470b-a45f-bc1849fa2124",
    "plan_id": "707a3e6f-f8db-4339-88da-1533837a9810",
    "parameters": {"access": "read-only"},
})))]
pub(crate) struct BindBody {
    /// The instance's service.
    service_id: String,
    /// The instance's plan.
    plan_id: String,
    /// The platform's context object.
    #[schema(value_type = Option<Object>)]
    context: Option<Value>,
    /// Deprecated by OSB in favour of `bind_resource.app_guid`; non-empty when present.
    app_guid: Option<String>,
    /// OSB's `bind_resource` object (`app_guid`, `route`, ...).
    #[schema(value_type = Option<Object>)]
    bind_resource: Option<Value>,
    /// Checked against the plan's `schemas.service_binding.create`: `access` (`read-only`), `expires_in` where
    /// the plan has expiring bindings, a `webhook` object `{url, secret}`.
    #[schema(value_type = Option<Object>)]
    parameters: Option<Value>,
    /// OSB binding rotation: the binding this one replaces. Both stay valid until the old one is deleted.
    predecessor_binding_id: Option<String>,
}

/// Create a binding (OSB): credentials of its own for the instance. A client that does not send
/// `accepts_incomplete=true` gets its answer once the bind is done, on every plan.
#[utoipa::path(
    put,
    path = "/v2/service_instances/{instance_id}/service_bindings/{binding_id}",
    tag = "service bindings",
    operation_id = "bind",
    params(BindingIdPath, AcceptsIncomplete, WebhookQuery),
    request_body = BindBody,
    responses(
        (status = 200, description = "The same bind again, and it has succeeded", body = Binding),
        (status = 201, description = "Bound (synchronous request)", body = Binding),
        (status = 202, description = "Accepted: poll the binding's `last_operation` with this operation", body = Accepted),
        (status = 400, description = "A malformed request, a plan that is not the instance's or not bindable, parameters the plan's schema refuses", body = ErrorBody),
        (status = 404, description = "No such instance", body = ErrorBody),
        (status = 409, description = "The binding exists with different attributes, or for another instance", body = ErrorBody),
        (status = 422, description = "`ConcurrencyError`, or an instance whose provision failed", body = ErrorBody),
        (status = 500, description = "`OperationFailed`: a synchronous bind failed", body = ErrorBody),
        (status = 504, description = "`OperationTimedOut`: a synchronous bind did not finish in time; it goes on", body = ErrorBody),
    )
)]
pub(crate) async fn bind(
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
    let request = checked_bind_request(state, &plan, &instance_id, &query, &body).await?;
    let context = object_or_empty(body.context.clone(), "context")?;
    let bind_resource = object_or_empty(body.bind_resource.clone(), "bind_resource")?;
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
        parameters: &request.parameters,
        expires_at: request.expiry.map(|e| e.expires_at),
        renew_before: request.expiry.map(|e| e.renew_before),
    };

    let mut tx = state.db.begin().await?;
    // Lock order everywhere: instance row, then binding row.
    let instance = provisioned_instance(&mut tx, &instance_id, true).await?;
    if instance.service_id != body.service_id || instance.plan_id != body.plan_id {
        return Err(ApiError::bad_request(format!(
            "service instance {instance_id} is of service_id {:?} and plan_id {:?}, not those in the request",
            instance.service_id, instance.plan_id
        )));
    }
    let of_the_instance = |t: &TaskRow| t.binding_id.is_none();
    exclusive::check(&mut tx, &instance_id, Again::Never, of_the_instance).await?;
    if let Some(expiry) = &request.expiry {
        check_room_for_expiring(&mut tx, &plan, &new, expiry).await?;
    }
    let origin = Origin {
        identity,
        hook: request.hook,
    };
    insert_binding(tx, state, &new, origin).await
}

/// A bind request's parameters, checked: against the plan's schema, inherited from the predecessor when a
/// rotation brings none, with the expiry they ask for, and the webhook taken out of them.
struct BindRequest {
    parameters: Value,
    expiry: Option<Expiry>,
    hook: Option<(String, Vec<u8>)>,
}

async fn checked_bind_request(
    state: &AppState,
    plan: &PlanRef<'_>,
    instance_id: &str,
    query: &OsbParams,
    body: &BindBody,
) -> ApiResult<BindRequest> {
    if !plan.bindable() {
        return Err(ApiError::bad_request(format!(
            "plan {:?} is not bindable",
            plan.plan.name
        )));
    }
    if body.app_guid.as_deref() == Some("") {
        return Err(ApiError::bad_request(
            "`app_guid` must be a non-empty string when present",
        ));
    }
    let parameters_given = body.parameters.is_some();
    let mut parameters = object_or_empty(body.parameters.clone(), "parameters")?;
    state
        .catalog
        .validate(&plan.plan.id, SchemaFor::Bind, &parameters)
        .map_err(|e| ApiError::BadRequest(e.0))?;
    if let Some(predecessor) = &body.predecessor_binding_id {
        let inherited = rotation_parameters(state, plan, instance_id, predecessor).await?;
        if !parameters_given {
            parameters = inherited;
        }
    }
    let expiry = expiry_of(plan, &parameters)?;
    let hook = query.take_webhook(state, &mut parameters)?;
    Ok(BindRequest {
        parameters,
        expiry,
        hook,
    })
}

/// 400 when the instance already has as many unexpired expiring bindings as its plan allows. Called under the
/// instance row's lock, so two binds cannot both take the last place.
async fn check_room_for_expiring(
    tx: &mut PgConnection,
    plan: &PlanRef<'_>,
    new: &NewBinding<'_>,
    expiry: &Expiry,
) -> ApiResult<()> {
    let Some(limits) = plan.plan.binding_expiry else {
        return Ok(());
    };
    let unexpired = bindings::count_unexpired_expiring(&mut *tx, new.instance_id, new.id).await?;
    if unexpired >= i64::from(limits.max_per_instance) {
        return Err(ApiError::bad_request(format!(
            "parameters.{EXPIRES_IN}: service instance {} already has {unexpired} unexpired \
             expiring bindings, the most plan {:?} allows; unbind one or bind without {EXPIRES_IN} \
             (asked: {} s)",
            new.instance_id, plan.plan.name, expiry.seconds
        )));
    }
    Ok(())
}

/// Inserts the binding row and its bind task, or answers for a binding id that exists already (see
/// [`bind_existing`]).
async fn insert_binding(
    mut tx: Transaction<'_, Postgres>,
    state: &AppState,
    new: &NewBinding<'_>,
    origin: Origin,
) -> ApiResult<Response> {
    for _ in 0..3 {
        if bindings::insert(&mut *tx, new).await? {
            let task = origin.task(Operation::Bind, new.instance_id, Some(new.id), json!({}));
            return exclusive::start(tx, task).await;
        }
        let Some(row) = bindings::get_for_update(&mut *tx, new.id).await? else {
            continue;
        };
        let outcome = bind_existing(&mut tx, &state.cipher, &row, new, origin).await?;
        if outcome.status() == StatusCode::ACCEPTED {
            tx.commit().await?;
        }
        return Ok(outcome);
    }
    Err(anyhow::anyhow!(
        "binding {} was created and deleted repeatedly while binding it",
        new.id
    )
    .into())
}

/// Checks a rotation (the plan allows it, the predecessor is a binding of this instance) and returns the
/// predecessor's parameters, which the new binding takes when the request brings none.
async fn rotation_parameters(
    state: &AppState,
    plan: &PlanRef<'_>,
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
        Some(row) if row.instance_id == instance_id && row.expired(Utc::now()) => {
            Err(ApiError::bad_request(format!(
                "predecessor_binding_id {predecessor:?} expired at {}: a successor needs a binding that has \
                 not expired",
                osb_time(row.expires_at.unwrap_or_default())
            )))
        }
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
    origin: Origin,
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
    match latest.as_ref().map(|t| (t.operation, t.state, t)) {
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
        // A failed bind is not made again once the binding expired: its credentials would outlive it.
        _ if row.expired(Utc::now()) => Err(ApiError::bad_request(format!(
            "binding {} expired at {}; unbind it and bind anew",
            row.id,
            osb_time(row.expires_at.unwrap_or_default())
        ))),
        // The bind failed (or, which should not happen, has no task): binding is idempotent, try again.
        _ => {
            let task = origin.task(Operation::Bind, &row.instance_id, Some(&row.id), json!({}));
            Ok(accepted(tasks::enqueue(&mut *tx, task).await?))
        }
    }
}

fn binding_concurrency(row: &BindingRow, task: &TaskRow) -> ApiError {
    ApiError::Concurrency(format!(
        "binding {} has a {} in progress (operation {}); try again when it has finished",
        row.id,
        task.operation.map_or("operation", Operation::as_str),
        task.id
    ))
}

/// When an expiring binding being created stops working, and when its platform should make a successor.
#[derive(Debug, Clone, Copy)]
struct Expiry {
    seconds: u32,
    expires_at: DateTime<Utc>,
    renew_before: DateTime<Utc>,
}

/// The expiry `parameters` ask for (`expires_in`), checked against the plan's bounds. The schema check has
/// done this for parameters the request brought; this covers ones inherited from a predecessor too.
fn expiry_of(plan: &PlanRef<'_>, parameters: &Value) -> ApiResult<Option<Expiry>> {
    let Some(asked) = parameters.get(EXPIRES_IN) else {
        return Ok(None);
    };
    let Some(limits) = plan.plan.binding_expiry else {
        return Err(ApiError::bad_request(format!(
            "parameters.{EXPIRES_IN}: bindings of plan {:?} cannot expire",
            plan.plan.name
        )));
    };
    let seconds = asked
        .as_u64()
        .filter(|s| (u64::from(limits.min_seconds)..=u64::from(limits.max_seconds)).contains(s))
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "parameters.{EXPIRES_IN}: must be whole seconds from {} to {} for plan {:?}, not {asked}",
                limits.min_seconds, limits.max_seconds, plan.plan.name
            ))
        })? as u32;
    // Whole seconds, as the spec's yyyy-mm-ddThh:mm:ss.sZ shows them.
    let now = Utc::now().trunc_subsecs(0);
    let expires_at = now + chrono::Duration::seconds(i64::from(seconds));
    // The last fifth of the lifetime is left for making a successor and switching over to it.
    let renew_before = expires_at - chrono::Duration::seconds(i64::from(seconds / 5));
    Ok(Some(Expiry {
        seconds,
        expires_at,
        renew_before,
    }))
}

/// A moment in the spec's `yyyy-mm-ddThh:mm:ss.sZ` form (tenths of a second).
fn osb_time(at: DateTime<Utc>) -> String {
    format!(
        "{}.{}Z",
        at.format("%Y-%m-%dT%H:%M:%S"),
        at.timestamp_subsec_millis() / 100
    )
}

/// A binding whose bind succeeded: the body of every answer that carries one.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Binding {
    /// Only for an expiring binding.
    #[serde(skip_serializing_if = "Option::is_none")]
    metadata: Option<BindingMetadata>,
    /// What the app connects with (`DATABASE_URL`, `S3_*`, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Object)]
    credentials: Option<Value>,
    /// The hosts and ports the credentials reach, where the engine names them.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Vec<Object>)]
    endpoints: Option<Value>,
    /// The binding's parameters (a fetch only).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Object)]
    parameters: Option<Value>,
}

/// When an expiring binding stops working, and when its platform should make a successor (OSB's
/// `yyyy-mm-ddThh:mm:ss.sZ`).
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct BindingMetadata {
    #[schema(example = "2026-12-07T10:00:00.0Z")]
    expires_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    renew_before: Option<String>,
}

/// The [`Binding`] body (with `parameters` for a fetch) of a binding whose bind succeeded.
fn credentials_body(
    cipher: &Cipher,
    row: &BindingRow,
    with_parameters: bool,
) -> ApiResult<Binding> {
    let metadata = row.expires_at.map(|expires_at| BindingMetadata {
        expires_at: osb_time(expires_at),
        renew_before: row.renew_before.map(osb_time),
    });
    let credentials =
        match &row.credentials {
            Some(sealed) => Some(cipher.open_json(sealed).map_err(|e| {
                e.context(format!("opening the credentials of binding {}", row.id))
            })?),
            None => None,
        };
    Ok(Binding {
        metadata,
        credentials,
        endpoints: row
            .details
            .get("endpoints")
            .filter(|e| !e.is_null())
            .cloned(),
        parameters: with_parameters.then(|| row.parameters.clone()),
    })
}

/// Delete a binding (OSB): its credentials stop working.
#[utoipa::path(
    delete,
    path = "/v2/service_instances/{instance_id}/service_bindings/{binding_id}",
    tag = "service bindings",
    operation_id = "unbind",
    params(BindingIdPath, DeleteQuery, AcceptsIncomplete, WebhookQuery),
    responses(
        (status = 200, description = "Unbound (synchronous request)", body = Empty),
        (status = 202, description = "Accepted: poll the binding's `last_operation` with this operation", body = Accepted),
        (status = 400, description = "`service_id` or `plan_id` missing, or a malformed request", body = ErrorBody),
        (status = 410, description = "No such binding (or instance)", body = Empty),
        (status = 422, description = "`ConcurrencyError`", body = ErrorBody),
        (status = 500, description = "`OperationFailed`: a synchronous unbind failed", body = ErrorBody),
        (status = 504, description = "`OperationTimedOut`: a synchronous unbind did not finish in time; it goes on", body = ErrorBody),
    )
)]
pub(crate) async fn unbind(
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
    let hook = query.webhook(state)?;

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
        match task.operation {
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
        .find(|t| t.operation == Some(Operation::RotateCredentials))
    {
        return Err(ApiError::Concurrency(format!(
            "service instance {instance_id} has a credentials rotation in progress (operation {}); try again \
             when it has finished",
            task.id
        )));
    }
    let task = Origin { identity, hook }.task(
        Operation::Unbind,
        &instance_id,
        Some(&binding_id),
        json!({}),
    );
    exclusive::start(tx, task).await
}

/// Fetch a binding (OSB; the catalog marks every service `bindings_retrievable`).
#[utoipa::path(
    get,
    path = "/v2/service_instances/{instance_id}/service_bindings/{binding_id}",
    tag = "service bindings",
    operation_id = "fetch_binding",
    params(BindingIdPath),
    responses(
        (status = 200, description = "The binding", body = Binding),
        (status = 400, description = "A malformed request", body = ErrorBody),
        (status = 404, description = "No such binding, or its bind has not succeeded", body = ErrorBody),
    )
)]
pub(crate) async fn fetch(
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
        Operation::Bind,
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

/// Poll an operation on a binding (OSB).
#[utoipa::path(
    get,
    path = "/v2/service_instances/{instance_id}/service_bindings/{binding_id}/last_operation",
    tag = "service bindings",
    operation_id = "binding_last_operation",
    params(BindingIdPath, PollQuery),
    responses(
        (status = 200, description = "The operation's state; `Retry-After` while it is in progress", body = LastOperation,
            headers(("Retry-After" = Option<u32>, description = "Seconds until the next poll, while in progress"))),
        (status = 400, description = "An operation that is not one of this binding's", body = ErrorBody),
        (status = 404, description = "No such binding, or no operation on it", body = ErrorBody),
        (status = 410, description = "The binding's unbind has succeeded", body = Empty),
    )
)]
pub(crate) async fn last_operation(
    State(state): State<AppState>,
    OsbPath((instance_id, binding_id)): OsbPath<(String, String)>,
    OsbQuery(query): OsbQuery<OsbParams>,
) -> ApiResult<Response> {
    let mut conn = state.db.acquire().await?;
    let polled = Polled::Binding {
        instance_id: &instance_id,
        binding_id: &binding_id,
    };
    last_operation::answer(&mut conn, polled, query.operation.as_deref()).await
}
