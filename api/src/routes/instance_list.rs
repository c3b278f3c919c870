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
use serde::Deserialize;
use serde_json::{Value, json};

use super::check_id;
use crate::{
    AppState,
    error::{ApiError, ApiResult},
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
struct ListQuery {
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

async fn list(
    State(state): State<AppState>,
    OsbQuery(query): OsbQuery<ListQuery>,
) -> ApiResult<Response> {
    let limit = page_size(query.limit.as_deref())?;
    let after = query.after.unwrap_or_default();
    // One more than the page tells whether another page follows.
    let mut rows = instances::list_page_with_operation(&state.db, &after, limit + 1, None).await?;
    let more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    let listed: Vec<Value> = rows.iter().map(|row| instance_json(&state, row)).collect();
    let next_after = if more {
        rows.last().map(|r| r.id.clone())
    } else {
        None
    };
    Ok(Json(json!({ "instances": listed, "next_after": next_after })).into_response())
}

async fn show(
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
    Ok(Json(instance_json(&state, &row)).into_response())
}

fn instance_json(state: &AppState, row: &instances::ListedInstance) -> Value {
    let plan = state.catalog.plan_by_id(&row.plan_id);
    json!({
        "id": row.id,
        "service": plan.as_ref().map(|p| p.service.name.as_str()),
        "plan": plan.as_ref().map(|p| p.plan.name.as_str()),
        "service_id": row.service_id,
        "plan_id": row.plan_id,
        "parameters": row.parameters,
        "created_at": row.created_at,
        "last_operation": row.operation.as_ref().map(|operation| json!({
            "type": operation,
            "state": row.operation_state,
            "description": row.last_error.as_ref().or(row.progress.as_ref()),
        })),
    })
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
