//! berth's extension routes for HA clusters: `POST /berth/v1/instances/{id}/switchover` (planned: the primary
//! hands over to a named or any healthy replica) and `/failover` (forced: also when the primary is unhealthy).
//! Both are asynchronous like an update: 202 with an `operation`, polled on the instance's `last_operation`.
//! Body (optional): `{"candidate": "<member name>"}`.

use axum::{Router, body::Bytes, extract::State, response::Response, routing::post};
use broker::model::{ChangePrimaryPayload, Operation};
use serde::Deserialize;
use serde_json::Value;
use utoipa::ToSchema;

use super::{
    Accepted, Origin, OsbParams, accepted, check_id,
    exclusive::{self, Again},
    instances::provisioned_instance,
    params::{InstanceIdPath, WebhookQuery},
};
use crate::{
    AppState,
    error::{ApiError, ApiResult, ErrorBody},
    extract::{OsbPath, OsbQuery, parse_json},
    identity::OriginatingIdentity,
};

pub fn router() -> Router<AppState> {
    Router::new()
        .route(
            "/berth/v1/instances/{instance_id}/switchover",
            post(switchover),
        )
        .route("/berth/v1/instances/{instance_id}/failover", post(failover))
}

/// The body of a switchover or failover (optional: an empty body lets Patroni choose).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ChangePrimaryBody {
    /// The member to become the primary (any healthy replica when absent).
    candidate: Option<String>,
}

/// Planned: the primary hands over to a healthy replica.
#[utoipa::path(
    post,
    path = "/berth/v1/instances/{instance_id}/switchover",
    tag = "ha clusters",
    operation_id = "switchover",
    params(InstanceIdPath, WebhookQuery),
    request_body(content = Option<ChangePrimaryBody>, description = "Optional"),
    responses(
        (status = 202, description = "Accepted: poll the instance's `last_operation` with this operation", body = Accepted),
        (status = 400, description = "A malformed request", body = ErrorBody),
        (status = 404, description = "No such instance", body = ErrorBody),
        (status = 422, description = "`ConcurrencyError`, not an HA cluster, a candidate that is not a member, or a failed provision", body = ErrorBody),
    )
)]
pub(crate) async fn switchover(
    state: State<AppState>,
    path: OsbPath<String>,
    query: OsbQuery<OsbParams>,
    identity: OriginatingIdentity,
    body: Bytes,
) -> ApiResult<Response> {
    change_primary(Operation::Switchover, state, path, query, identity, body).await
}

/// Forced: a replica becomes the primary, also when the primary is unhealthy.
#[utoipa::path(
    post,
    path = "/berth/v1/instances/{instance_id}/failover",
    tag = "ha clusters",
    operation_id = "failover",
    params(InstanceIdPath, WebhookQuery),
    request_body(content = Option<ChangePrimaryBody>, description = "Optional"),
    responses(
        (status = 202, description = "Accepted: poll the instance's `last_operation` with this operation", body = Accepted),
        (status = 400, description = "A malformed request", body = ErrorBody),
        (status = 404, description = "No such instance", body = ErrorBody),
        (status = 422, description = "`ConcurrencyError`, not an HA cluster, a candidate that is not a member, or a failed provision", body = ErrorBody),
    )
)]
pub(crate) async fn failover(
    state: State<AppState>,
    path: OsbPath<String>,
    query: OsbQuery<OsbParams>,
    identity: OriginatingIdentity,
    body: Bytes,
) -> ApiResult<Response> {
    change_primary(Operation::Failover, state, path, query, identity, body).await
}

/// Validates, then writes the task in one transaction. Refused, writing nothing: an unknown instance (404), one
/// not provisioned (422; see `provisioned_instance`), a plan without a cluster (422), a candidate that is not a
/// member (422), another operation in progress (422 `ConcurrencyError`; the same request again gets its
/// operation).
async fn change_primary(
    operation: Operation,
    State(state): State<AppState>,
    OsbPath(instance_id): OsbPath<String>,
    OsbQuery(query): OsbQuery<OsbParams>,
    OriginatingIdentity(identity): OriginatingIdentity,
    body: Bytes,
) -> ApiResult<Response> {
    check_id("instance_id", &instance_id)?;
    let body: ChangePrimaryBody = if body.iter().all(u8::is_ascii_whitespace) {
        ChangePrimaryBody::default()
    } else {
        parse_json(&body)?
    };
    let hook = query.webhook(&state)?;

    let mut tx = state.db.begin().await?;
    let row = provisioned_instance(&mut tx, &instance_id, true).await?;
    let plan = state.catalog.plan_by_id(&row.plan_id);
    if !plan.as_ref().is_some_and(|p| p.has_feature("ha-cluster")) {
        return Err(ApiError::Unprocessable(format!(
            "service instance {instance_id} is not an HA cluster: only the `ha` plan has a primary to change"
        )));
    }
    if let Some(candidate) = &body.candidate {
        let members = row.details.get("members").and_then(Value::as_array);
        let known = members.is_some_and(|m| m.iter().any(|m| m["name"] == candidate.as_str()));
        if !known {
            return Err(ApiError::Unprocessable(format!(
                "{candidate:?} is not a member of the cluster of service instance {instance_id}"
            )));
        }
    }
    let payload = ChangePrimaryPayload {
        candidate: body.candidate,
    };
    let payload = serde_json::to_value(&payload)
        .map_err(|e| anyhow::Error::new(e).context("serializing a switchover"))?;
    let same = |t: &broker::db::tasks::TaskRow| t.is_instance(operation) && t.payload == payload;
    if let Some(task) =
        exclusive::check(&mut tx, &instance_id, Again::Newest(&same), exclusive::any).await?
    {
        return Ok(accepted(task));
    }
    let task = Origin { identity, hook }.task(operation, &instance_id, None, payload);
    exclusive::start(tx, task).await
}
