//! `GET /berth/v1/instances[?limit=N&after=ID]`: every instance, a page at a time in id order, with its plan,
//! parameters and latest operation (OSB has no list of instances; `berth list` reads this). The answer's
//! `next_after` is the `after` of the next page, `null` on the last one. `GET /berth/v1/instances/{id}`: one
//! instance in the same shape, at any point of its life (`berth status`). Same basic auth as `/v2`.

use axum::{
    Json, Router,
    extract::State,
    response::{IntoResponse, Response},
    routing::get,
};
use broker::db::instances;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use super::{
    check_id,
    params::{InstanceIdPath, InstancePageQuery},
};
use crate::{
    AppState,
    error::{ApiError, ApiResult, ErrorBody},
    extract::{OsbPath, OsbQuery},
};

/// A page's size when the request names none, and the most one may ask for.
const DEFAULT_LIMIT: i64 = 100;
const MAX_LIMIT: i64 = 1000;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/berth/v1/instances", get(list))
        .route("/berth/v1/instances/{instance_id}", get(show))
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct ListQuery {
    limit: Option<String>,
    after: Option<String>,
}

/// `limit` as a page size from 1 to [`MAX_LIMIT`], or a 400.
fn page_size(limit: Option<&str>) -> ApiResult<i64> {
    match limit {
        None => Ok(DEFAULT_LIMIT),
        Some(text) => text
            .parse::<i64>()
            .ok()
            .filter(|n| (1..=MAX_LIMIT).contains(n))
            .ok_or_else(|| {
                ApiError::bad_request(format!(
                    "limit must be a whole number from 1 to {MAX_LIMIT}"
                ))
            }),
    }
}

/// An instance as `berth list` and `berth status` show it.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ListedInstance {
    id: String,
    /// The service's and plan's names; absent when the catalog no longer has the plan.
    service: Option<String>,
    plan: Option<String>,
    service_id: String,
    plan_id: String,
    #[schema(value_type = Object)]
    parameters: Value,
    created_at: DateTime<Utc>,
    last_operation: Option<ListedOperation>,
}

/// An instance's latest operation.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ListedOperation {
    /// `provision`, `update`, `deprovision`, ...
    #[serde(rename = "type")]
    kind: String,
    state: Option<String>,
    /// Its progress, or its error when it failed.
    description: Option<String>,
}

/// A page of instances.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct InstancePage {
    instances: Vec<ListedInstance>,
    /// The `after` of the next page; `null` on the last one.
    next_after: Option<String>,
}

/// Every instance, a page at a time in id order, with its plan and latest operation.
#[utoipa::path(
    get,
    path = "/berth/v1/instances",
    tag = "service instances",
    operation_id = "list_instances",
    params(InstancePageQuery),
    responses(
        (status = 200, description = "A page of instances", body = InstancePage),
        (status = 400, description = "A malformed `limit`", body = ErrorBody),
    )
)]
pub(crate) async fn list(
    State(state): State<AppState>,
    OsbQuery(query): OsbQuery<ListQuery>,
) -> ApiResult<Response> {
    let limit = page_size(query.limit.as_deref())?;
    let after = query.after.unwrap_or_default();
    // One more than the page tells whether another page follows.
    let mut rows = instances::list_page_with_operation(&state.db, &after, limit + 1, None).await?;
    let more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    let listed: Vec<ListedInstance> = rows.iter().map(|row| listed(&state, row)).collect();
    let next_after = if more {
        rows.last().map(|r| r.id.clone())
    } else {
        None
    };
    Ok(Json(InstancePage {
        instances: listed,
        next_after,
    })
    .into_response())
}

/// One instance, at any point of its life, in the shape of the list.
#[utoipa::path(
    get,
    path = "/berth/v1/instances/{instance_id}",
    tag = "service instances",
    operation_id = "show_instance",
    params(InstanceIdPath),
    responses(
        (status = 200, description = "The instance", body = ListedInstance),
        (status = 400, description = "A malformed id", body = ErrorBody),
        (status = 404, description = "No such instance", body = ErrorBody),
    )
)]
pub(crate) async fn show(
    State(state): State<AppState>,
    OsbPath(instance_id): OsbPath<String>,
) -> ApiResult<Response> {
    check_id("instance_id", &instance_id)?;
    let row = instances::list_page_with_operation(&state.db, "", 1, Some(&instance_id))
        .await?
        .pop()
        .ok_or_else(|| {
            ApiError::NotFound(format!("service instance {instance_id} does not exist"))
        })?;
    Ok(Json(listed(&state, &row)).into_response())
}

fn listed(state: &AppState, row: &instances::ListedInstance) -> ListedInstance {
    let plan = state.catalog.plan_by_id(&row.plan_id);
    ListedInstance {
        id: row.id.clone(),
        service: plan.as_ref().map(|p| p.service.name.clone()),
        plan: plan.as_ref().map(|p| p.plan.name.clone()),
        service_id: row.service_id.clone(),
        plan_id: row.plan_id.clone(),
        parameters: row.parameters.clone(),
        created_at: row.created_at,
        last_operation: row.operation.as_ref().map(|operation| ListedOperation {
            kind: operation.clone(),
            state: row.operation_state.clone(),
            description: row.last_error.clone().or_else(|| row.progress.clone()),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_size_defaults_and_bounds() {
        assert_eq!(page_size(None).unwrap(), DEFAULT_LIMIT);
        assert_eq!(page_size(Some("1")).unwrap(), 1);
        assert_eq!(page_size(Some("1000")).unwrap(), 1000);
        for bad in ["0", "1001", "-3", "ten", ""] {
            assert!(page_size(Some(bad)).is_err(), "{bad}");
        }
    }
}
