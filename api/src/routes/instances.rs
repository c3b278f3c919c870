//! `/v2/service_instances/{instance_id}`: provision (PUT), update (PATCH), deprovision (DELETE), fetch (GET)
//! and `last_operation`. Each accepted change writes the row and one task in one transaction, then answers 202.
//! Also the Akkeris action `PUT .../actions/credentials`: new credentials for every binding (asynchronous).

use axum::{
    Json, Router,
    extract::State,
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, put},
};
use broker::{
    catalog::{Catalog, PlanRef, SchemaFor, Service},
    db::{
        instances::{self, InstanceRow, NewInstance},
        tasks::{self, TaskRow},
    },
    model::{Operation, TaskState, UpdatePayload},
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sqlx::PgConnection;
use tokio::time::Instant;
use utoipa::ToSchema;

use super::{
    Accepted, Empty, MaintenanceInfoBody, Origin, OsbParams, accepted, check_id, check_maintenance,
    created_empty,
    exclusive::{self, Again, concurrency},
    gone,
    last_operation::{self, LastOperation, Polled},
    lookup_plan, lookup_service, object_or_empty, ok_empty,
    params::{AcceptsIncomplete, DeleteQuery, InstanceIdPath, PollQuery, WebhookQuery},
    synchronous::{self, Mode, Settled},
};
use crate::{
    AppState,
    error::{ApiError, ApiResult, ErrorBody},
    extract::{OsbJson, OsbPath, OsbQuery},
    identity::OriginatingIdentity,
    pool_claim::{self, Taken},
    snapshot_params::{self, At},
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

/// A provision request. The example is the shipped catalog's `postgres` service and its `shared` plan.
#[derive(Debug, Deserialize, ToSchema)]
#[schema(examples(json!({
    "service_id": "3bdd3b6c-801f-470b-a45f-bc1849fa2124",
    "plan_id": "707a3e6f-f8db-4339-88da-1533837a9810",
    "organization_guid": "org",
    "space_guid": "space",
})))]
pub(crate) struct ProvisionBody {
    /// A service of the catalog.
    service_id: String,
    /// A plan of that service.
    plan_id: String,
    /// Non-empty.
    organization_guid: String,
    /// Non-empty.
    space_guid: String,
    /// The platform's context object, stored with the instance.
    #[schema(value_type = Option<Object>)]
    context: Option<Value>,
    /// Checked against the plan's `schemas.service_instance.create` (published in the catalog); may carry a
    /// `webhook` object `{url, secret}`.
    #[schema(value_type = Option<Object>)]
    parameters: Option<Value>,
    maintenance_info: Option<MaintenanceInfoBody>,
}

impl ProvisionBody {
    fn check_guids(&self) -> ApiResult<()> {
        for (field, value) in [
            ("organization_guid", &self.organization_guid),
            ("space_guid", &self.space_guid),
        ] {
            if value.is_empty() {
                return Err(ApiError::bad_request(format!(
                    "`{field}` must be a non-empty string"
                )));
            }
        }
        Ok(())
    }
}

/// Provision an instance (OSB). The synchronous answers (200, 201, 500, 504) are for clients that do not send
/// `accepts_incomplete=true`, on plans the catalog marks synchronous.
#[utoipa::path(
    put,
    path = "/v2/service_instances/{instance_id}",
    tag = "service instances",
    operation_id = "provision",
    params(InstanceIdPath, AcceptsIncomplete, WebhookQuery),
    request_body = ProvisionBody,
    responses(
        (status = 200, description = "The same provision again, and it has succeeded", body = Empty),
        (status = 201, description = "Provisioned (synchronous request)", body = Empty),
        (status = 202, description = "Accepted: poll `last_operation` with this operation", body = Accepted),
        (status = 400, description = "A malformed request, an unknown service or plan, parameters the plan's schema refuses", body = ErrorBody),
        (status = 409, description = "The instance exists with different attributes", body = ErrorBody),
        (status = 422, description = "`AsyncRequired`, `ConcurrencyError` or `MaintenanceInfoConflict`", body = ErrorBody),
        (status = 500, description = "`OperationFailed`: a synchronous provision failed", body = ErrorBody),
        (status = 504, description = "`OperationTimedOut`: a synchronous provision did not finish in time; it goes on", body = ErrorBody),
    )
)]
pub(crate) async fn provision(
    State(state): State<AppState>,
    headers: HeaderMap,
    OsbPath(instance_id): OsbPath<String>,
    OsbQuery(query): OsbQuery<OsbParams>,
    OriginatingIdentity(identity): OriginatingIdentity,
    OsbJson(body): OsbJson<ProvisionBody>,
) -> ApiResult<Response> {
    let started = Instant::now();
    let mut mode = Mode::Async;
    let response = start_provision(
        &state,
        instance_id.clone(),
        query,
        identity,
        body,
        &mut mode,
    )
    .await?;
    let response = match synchronous::settle(&state, mode, response, started).await? {
        Settled::Answered(response) => response,
        Settled::Succeeded => created_empty(),
    };
    with_dashboard_url(&state, &headers, &instance_id, response).await
}

/// OSB: a provision's 200, 201 and 202 carry the instance's `dashboard_url` (a fresh signed link; see
/// docs/dashboard.md). Other answers stand as they are.
async fn with_dashboard_url(
    state: &AppState,
    headers: &HeaderMap,
    instance_id: &str,
    response: Response,
) -> ApiResult<Response> {
    if !matches!(response.status().as_u16(), 200..=202) {
        return Ok(response);
    }
    // The provision is recorded already: a failed read costs the link, not the answer.
    let row = match instances::get(&state.db, instance_id).await {
        Ok(Some(row)) => row,
        Ok(None) => return Ok(response),
        Err(e) => {
            tracing::warn!(instance_id, error = %e, "reading the instance for its dashboard_url failed");
            return Ok(response);
        }
    };
    let Some(url) = state.dashboard.url_for(&state.cipher, headers, &row) else {
        return Ok(response);
    };
    let (mut parts, body) = response.into_parts();
    // The bodies here are the small JSON objects this module wrote.
    let bytes = axum::body::to_bytes(body, 64 * 1024)
        .await
        .map_err(|e| anyhow::anyhow!("reading a provision answer: {e}"))?;
    let mut object: Value = serde_json::from_slice(&bytes)
        .map_err(|e| anyhow::anyhow!("a provision answer is not JSON: {e}"))?;
    object["dashboard_url"] = json!(url);
    let body = serde_json::to_vec(&object)
        .map_err(|e| anyhow::anyhow!("serializing a provision answer: {e}"))?;
    parts.headers.remove(axum::http::header::CONTENT_LENGTH);
    Ok(Response::from_parts(parts, axum::body::Body::from(body)))
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
    body.check_guids()?;
    let plan = lookup_plan(&state.catalog, &body.service_id, &body.plan_id)?;
    // A plan with a warm pool answers synchronously when an item is taken (checked below).
    let pooled = state.pool_targets.has_pool(&plan.plan.id);
    *mode = query.answer_mode(plan.synchronous() || pooled)?;
    let (parameters, hook) = checked_provision_parameters(state, &query, &plan, &body).await?;
    let origin = Origin { identity, hook };
    let context = object_or_empty(body.context.clone(), "context")?;
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

    if pooled {
        let wanted =
            pool_claim::wanted(state, &plan.plan.id, plan.plan.engine, &parameters).await?;
        match pool_claim::take(state, &new, &origin, wanted).await? {
            Taken::Item(response) => return Ok(response),
            Taken::Exists => {}
            Taken::Nothing => {
                // Only a pool hit is quick enough to answer a plan like this one synchronously.
                if *mode == Mode::Sync && !plan.synchronous() {
                    query.require_async()?;
                }
            }
        }
    }

    // Fast path, a new id: the row and its task in one statement, batched with concurrent provisions.
    let task = origin
        .clone()
        .task(Operation::Provision, &instance_id, None, json!({}));
    if let Some(operation) = state.provisions.insert(&new, task).await? {
        return Ok(accepted(operation));
    }

    let mut tx = state.db.begin().await?;
    // A concurrent request may insert the same id first (our insert then waits for it and does nothing), or
    // a deprovision may delete the row between our insert and our read: go round again.
    for _ in 0..3 {
        if instances::insert(&mut *tx, &new).await? {
            let task = origin.task(Operation::Provision, &instance_id, None, json!({}));
            return exclusive::start(tx, task).await;
        }
        let Some(row) = instances::get_for_update(&mut *tx, &instance_id).await? else {
            continue;
        };
        let outcome = provision_existing(&mut tx, &row, &new, origin).await?;
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

/// The provision's parameters, checked against the plan's schema (and what they name, such as a backup to
/// restore, against the database), with the webhook taken out of them.
async fn checked_provision_parameters(
    state: &AppState,
    query: &OsbParams,
    plan: &PlanRef<'_>,
    body: &ProvisionBody,
) -> ApiResult<(Value, Option<(String, Vec<u8>)>)> {
    let mut parameters = object_or_empty(body.parameters.clone(), "parameters")?;
    state
        .catalog
        .validate(&plan.plan.id, SchemaFor::Provision, &parameters)
        .map_err(|e| ApiError::BadRequest(e.0))?;
    let hook = query.take_webhook(state, &mut parameters)?;
    if snapshot_params::any(&parameters) {
        let mut conn = state.db.acquire().await?;
        snapshot_params::check(&mut conn, &parameters, At::Provision).await?;
    }
    Ok((parameters, hook))
}

/// A provision request for an id that exists: the same request again (answered from its task), or a conflict.
async fn provision_existing(
    tx: &mut PgConnection,
    row: &InstanceRow,
    new: &NewInstance<'_>,
    origin: Origin,
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
    let provision = |t: &TaskRow| t.operation == Some(Operation::Provision);
    let of_the_instance = |t: &TaskRow| t.binding_id.is_none();
    let again = Again::Newest(&provision);
    if let Some(task) = exclusive::check(&mut *tx, &row.id, again, of_the_instance).await? {
        return Ok(accepted(task));
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
            let task = origin.task(Operation::Provision, &row.id, None, json!({}));
            Ok(accepted(tasks::enqueue(&mut *tx, task).await?))
        }
    }
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

/// An update request.
#[derive(Debug, Deserialize, ToSchema)]
pub(crate) struct UpdateBody {
    /// The instance's service.
    service_id: String,
    /// A plan to move to (the instance's own when absent).
    plan_id: Option<String>,
    /// Merged over the stored parameters; checked against the target plan's `schemas.service_instance.update`.
    #[schema(value_type = Option<Object>)]
    parameters: Option<Value>,
    /// A new context object (alone, it is applied at once: 200).
    #[schema(value_type = Option<Object>)]
    context: Option<Value>,
    maintenance_info: Option<MaintenanceInfoBody>,
}

/// Update an instance (OSB): its plan, parameters, context or maintenance version.
#[utoipa::path(
    patch,
    path = "/v2/service_instances/{instance_id}",
    tag = "service instances",
    operation_id = "update",
    params(InstanceIdPath, AcceptsIncomplete, WebhookQuery),
    request_body = UpdateBody,
    responses(
        (status = 200, description = "Done: a context-only change, or a synchronous update that succeeded", body = Empty),
        (status = 202, description = "Accepted: poll `last_operation` with this operation", body = Accepted),
        (status = 400, description = "A malformed request, a plan of another service, parameters the plan's schema refuses", body = ErrorBody),
        (status = 404, description = "No such instance", body = ErrorBody),
        (status = 422, description = "`AsyncRequired`, `ConcurrencyError`, `MaintenanceInfoConflict`, a plan change the plan does not allow, or an instance whose provision failed", body = ErrorBody),
        (status = 500, description = "`OperationFailed`: a synchronous update failed", body = ErrorBody),
        (status = 504, description = "`OperationTimedOut`: a synchronous update did not finish in time; it goes on", body = ErrorBody),
    )
)]
pub(crate) async fn update(
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
    let service = lookup_service(catalog, &body.service_id)?;
    let request_parameters = optional_object(body.parameters.clone(), "parameters")?;
    let context = optional_object(body.context.clone(), "context")?;

    let mut tx = state.db.begin().await?;
    let row = provisioned_instance(&mut tx, &instance_id, true).await?;
    if row.service_id != body.service_id {
        return Err(ApiError::bad_request(format!(
            "service instance {instance_id} belongs to service {:?}, not {:?}",
            row.service_id, body.service_id
        )));
    }
    let (target, plan_changes) = target_plan(catalog, service, &row, body.plan_id.as_deref())?;
    let (parameters, hook) =
        checked_parameters(state, &mut tx, &query, &target, request_parameters).await?;
    let change = UpdateChange {
        row: &row,
        target: &target,
        plan_changes,
        parameters: &parameters,
        has_hook: hook.is_some(),
        requested_version: body
            .maintenance_info
            .as_ref()
            .and_then(|m| m.version.as_deref()),
        context: context.as_ref(),
    };
    check_maintenance(change.requested_version, &target)?;
    let (context_only, payload) = (change.context_only(), change.payload()?);
    // Synchronous only when both the current and the target plan are.
    let sync_allowed = target.synchronous()
        && (catalog.plan_by_id(&row.plan_id)).is_some_and(|current| current.synchronous());
    // OSB: a re-sent PATCH whose update has not completed yet is 202 with the same operation (a synchronous
    // client waits for it again).
    let resent = |t: &TaskRow| {
        !context_only
            && t.is_instance(Operation::Update)
            && t.payload == payload
            && (query.accepts_incomplete() || sync_allowed)
    };
    let again = Again::Newest(&resent);
    if let Some(task) = exclusive::check(&mut tx, &instance_id, again, exclusive::any).await? {
        *mode = query.answer_mode(sync_allowed)?;
        return Ok(accepted(task));
    }
    if context_only {
        // Nothing to do on the provider, so the context is applied now.
        if let Some(context) = &context {
            instances::set_context(&mut *tx, &instance_id, context).await?;
        }
        tx.commit().await?;
        return Ok(ok_empty());
    }
    *mode = query.answer_mode(sync_allowed)?;
    let task = Origin { identity, hook }.task(Operation::Update, &instance_id, None, payload);
    exclusive::start(tx, task).await
}

/// An optional JSON object from an update body: absent stays `None` (the update does not touch it).
fn optional_object(value: Option<Value>, field: &str) -> ApiResult<Option<Value>> {
    value.map(|v| object_or_empty(Some(v), field)).transpose()
}

/// The plan an update moves the instance to (its own when the request names none), and whether that is a change;
/// a change the current plan does not allow is refused now, not queued to fail.
fn target_plan<'c>(
    catalog: &'c Catalog,
    service: &Service,
    row: &InstanceRow,
    plan_id: Option<&str>,
) -> ApiResult<(PlanRef<'c>, bool)> {
    let target_plan_id = plan_id.unwrap_or(&row.plan_id);
    let target = catalog
        .plan(&row.service_id, target_plan_id)
        .ok_or_else(|| {
            let whose = if catalog.plan_by_id(target_plan_id).is_some() {
                "belongs to another service than"
            } else {
                "is not a plan of service"
            };
            ApiError::bad_request(format!(
                "plan_id {target_plan_id:?} {whose} {:?}",
                service.name
            ))
        })?;
    let plan_changes = target_plan_id != row.plan_id;
    if plan_changes {
        let current = catalog.plan_by_id(&row.plan_id);
        let updateable = current
            .as_ref()
            .map_or(service.plan_updateable, |p| p.plan_updateable());
        if !updateable {
            return Err(ApiError::Unprocessable(format!(
                "the plan of service instance {} cannot be changed (its plan is not plan_updateable)",
                row.id
            )));
        }
        // A change the engine cannot make (turning S3 versioning off).
        if let Some(why) = current.and_then(|current| current.cannot_change_to(target.plan)) {
            return Err(ApiError::Unprocessable(why));
        }
    }
    Ok((target, plan_changes))
}

/// The update's parameters, checked against the target plan (only those the request carries: an update without
/// any must not fail a schema's `required`), with the webhook taken out of them.
async fn checked_parameters(
    state: &AppState,
    tx: &mut PgConnection,
    query: &OsbParams,
    target: &PlanRef<'_>,
    request_parameters: Option<Value>,
) -> ApiResult<(Value, Option<(String, Vec<u8>)>)> {
    let parameters_given = request_parameters.is_some();
    let mut parameters = request_parameters.unwrap_or_else(|| json!({}));
    if parameters_given {
        state
            .catalog
            .validate(&target.plan.id, SchemaFor::Update, &parameters)
            .map_err(|e| ApiError::BadRequest(e.0))?;
        if snapshot_params::any(&parameters) {
            snapshot_params::check(tx, &parameters, At::Update).await?;
        }
    }
    let hook = query.take_webhook(state, &mut parameters)?;
    Ok((parameters, hook))
}

/// What a checked update request changes.
struct UpdateChange<'a> {
    row: &'a InstanceRow,
    target: &'a PlanRef<'a>,
    plan_changes: bool,
    /// The request's parameters (without the webhook).
    parameters: &'a Value,
    has_hook: bool,
    requested_version: Option<&'a str>,
    context: Option<&'a Value>,
}

impl UpdateChange<'_> {
    /// Only the context (or nothing) changes: nothing for the provider to do.
    fn context_only(&self) -> bool {
        let parameters_change =
            self.parameters.as_object().is_some_and(|m| !m.is_empty()) || self.has_hook;
        let maintenance_changes = self
            .requested_version
            .is_some_and(|v| Some(v) != self.row.maintenance_version.as_deref());
        !self.plan_changes && !parameters_change && !maintenance_changes
    }

    /// The update task's payload: the plan, the parameters merged over the stored ones, the context and the
    /// maintenance version the instance ends up with.
    fn payload(&self) -> ApiResult<Value> {
        let mut merged = self.row.parameters.as_object().cloned().unwrap_or_default();
        merged.extend(self.parameters.as_object().cloned().unwrap_or_default());
        merged.remove("webhook");
        let maintenance_version = match self.requested_version {
            Some(v) => Some(v.to_string()),
            None if self.plan_changes => self
                .target
                .plan
                .maintenance_info
                .as_ref()
                .map(|m| m.version.clone()),
            None => None,
        };
        let payload = UpdatePayload {
            plan_id: self.target.plan.id.clone(),
            parameters: Value::Object(merged),
            context: self.context.unwrap_or(&self.row.context).clone(),
            maintenance_version,
            select_preset: self.parameters.get("preset").is_some_and(|p| !p.is_null()),
        };
        Ok(serde_json::to_value(&payload)
            .map_err(|e| anyhow::Error::new(e).context("serializing an update"))?)
    }
}

/// Deprovision an instance (OSB).
#[utoipa::path(
    delete,
    path = "/v2/service_instances/{instance_id}",
    tag = "service instances",
    operation_id = "deprovision",
    params(InstanceIdPath, DeleteQuery, AcceptsIncomplete, WebhookQuery),
    responses(
        (status = 200, description = "Deprovisioned (synchronous request)", body = Empty),
        (status = 202, description = "Accepted: poll `last_operation` with this operation", body = Accepted),
        (status = 400, description = "`service_id` or `plan_id` missing, or a malformed request", body = ErrorBody),
        (status = 410, description = "No such instance", body = Empty),
        (status = 422, description = "`AsyncRequired` or `ConcurrencyError`", body = ErrorBody),
        (status = 500, description = "`OperationFailed`: a synchronous deprovision failed", body = ErrorBody),
        (status = 504, description = "`OperationTimedOut`: a synchronous deprovision did not finish in time; it goes on", body = ErrorBody),
    )
)]
pub(crate) async fn deprovision(
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
    let hook = query.webhook(state)?;

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
    let deprovision = |t: &TaskRow| t.is_instance(Operation::Deprovision);
    // A provision still in progress (the platform cleaning up after a provision that timed out) does not
    // block: the worker cancels it if it has not started, or runs the deprovision once it has ended.
    let in_the_way = |t: &TaskRow| t.operation != Some(Operation::Provision);
    let again = Again::Anywhere(&deprovision);
    if let Some(task) = exclusive::check(&mut tx, &instance_id, again, in_the_way).await? {
        return Ok(accepted(task));
    }
    let task =
        Origin { identity, hook }.task(Operation::Deprovision, &instance_id, None, json!({}));
    exclusive::start(tx, task).await
}

/// The Akkeris action `PUT /v2/service_instances/{id}/actions/credentials`: every binding of the instance gets
/// new credentials, stored sealed in place of the old ones, which are revoked once the new ones are stored.
/// Always asynchronous (202 + operation, polled on `last_operation` like an update); the same request while that
/// rotation runs gets its operation again. Refused, writing nothing: an unknown instance (404), one not
/// provisioned or with another operation in progress (422 `ConcurrencyError`; 422 after a failed provision), or a plan whose bindings have no credentials
/// of their own to rotate (422).
#[utoipa::path(
    put,
    path = "/v2/service_instances/{instance_id}/actions/credentials",
    tag = "service instances",
    operation_id = "rotate_credentials",
    params(InstanceIdPath, WebhookQuery),
    responses(
        (status = 202, description = "Accepted: poll the instance's `last_operation` with this operation", body = Accepted),
        (status = 400, description = "A malformed request", body = ErrorBody),
        (status = 404, description = "No such instance", body = ErrorBody),
        (status = 422, description = "`ConcurrencyError`, a failed provision, or a plan whose bindings have no credentials of their own", body = ErrorBody),
    )
)]
pub(crate) async fn rotate_credentials(
    State(state): State<AppState>,
    OsbPath(instance_id): OsbPath<String>,
    OsbQuery(query): OsbQuery<OsbParams>,
    OriginatingIdentity(identity): OriginatingIdentity,
) -> ApiResult<Response> {
    check_id("instance_id", &instance_id)?;
    let hook = query.webhook(&state)?;

    let mut tx = state.db.begin().await?;
    let row = provisioned_instance(&mut tx, &instance_id, true).await?;
    let rotation = |t: &TaskRow| t.is_instance(Operation::RotateCredentials);
    let again = Again::Anywhere(&rotation);
    if let Some(task) = exclusive::check(&mut tx, &instance_id, again, exclusive::any).await? {
        return Ok(accepted(task));
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
    exclusive::not_being_deleted(&mut tx, &instance_id).await?;
    let origin = Origin { identity, hook };
    let task = origin.task(Operation::RotateCredentials, &instance_id, None, json!({}));
    exclusive::start(tx, task).await
}

/// `GET /v2/service_instances/{instance_id}`.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct InstanceFetched {
    service_id: String,
    plan_id: String,
    /// The stored parameters (without the webhook).
    #[schema(value_type = Object)]
    parameters: Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    maintenance_info: Option<MaintenanceVersion>,
    /// A signed link to the instance's page (docs/dashboard.md).
    #[serde(skip_serializing_if = "Option::is_none")]
    dashboard_url: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct MaintenanceVersion {
    version: String,
}

/// Fetch an instance (OSB; the catalog marks every service `instances_retrievable`).
#[utoipa::path(
    get,
    path = "/v2/service_instances/{instance_id}",
    tag = "service instances",
    operation_id = "fetch_instance",
    params(InstanceIdPath),
    responses(
        (status = 200, description = "The instance", body = InstanceFetched),
        (status = 400, description = "A malformed request", body = ErrorBody),
        (status = 404, description = "No such instance, or its provision has not succeeded", body = ErrorBody),
        (status = 422, description = "`ConcurrencyError`: an update is in progress", body = ErrorBody),
    )
)]
pub(crate) async fn fetch(
    State(state): State<AppState>,
    headers: HeaderMap,
    OsbPath(instance_id): OsbPath<String>,
) -> ApiResult<Response> {
    let mut conn = state.db.acquire().await?;
    let row = visible_instance(&mut conn, &instance_id).await?;
    let active = tasks::active_operations(&mut *conn, &instance_id).await?;
    if let Some(task) = active.iter().find(|t| t.is_instance(Operation::Update)) {
        return Err(concurrency(&instance_id, task));
    }
    let dashboard_url = state.dashboard.url_for(&state.cipher, &headers, &row);
    let body = InstanceFetched {
        service_id: row.service_id,
        plan_id: row.plan_id,
        parameters: row.parameters,
        maintenance_info: row
            .maintenance_version
            .map(|version| MaintenanceVersion { version }),
        dashboard_url,
    };
    Ok((StatusCode::OK, Json(body)).into_response())
}

/// Poll an operation on an instance (OSB).
#[utoipa::path(
    get,
    path = "/v2/service_instances/{instance_id}/last_operation",
    tag = "service instances",
    operation_id = "instance_last_operation",
    params(InstanceIdPath, PollQuery),
    responses(
        (status = 200, description = "The operation's state; `Retry-After` while it is in progress", body = LastOperation,
            headers(("Retry-After" = Option<u32>, description = "Seconds until the next poll, while in progress"))),
        (status = 400, description = "An operation that is not one of this instance's", body = ErrorBody),
        (status = 404, description = "No such instance, or no operation on it", body = ErrorBody),
        (status = 410, description = "The instance's deprovision has succeeded", body = Empty),
    )
)]
pub(crate) async fn last_operation(
    State(state): State<AppState>,
    OsbPath(instance_id): OsbPath<String>,
    OsbQuery(query): OsbQuery<OsbParams>,
) -> ApiResult<Response> {
    let mut conn = state.db.acquire().await?;
    let polled = Polled::Instance {
        instance_id: &instance_id,
    };
    last_operation::answer(&mut conn, polled, query.operation.as_deref()).await
}
