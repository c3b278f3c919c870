//! `GET /berth/v1/instances/{id}/events?limit=N&before=ID` (broker credentials): the instance's audit trail,
//! newest first: who asked for what, when, from which request, and how it ended. Kept after the instance is
//! gone for `EVENT_RETENTION_DAYS`. Answers `{"events": [...], "next": ID}`; `next` (absent on the last page) is
//! the `before` of the following page.

use axum::{
    Json, Router,
    extract::State,
    response::{IntoResponse, Response},
    routing::get,
};
use broker::db::{events, instances};
use serde::Deserialize;
use serde_json::json;

use super::check_id;
use crate::{
    AppState,
    error::{ApiError, ApiResult},
    extract::{OsbPath, OsbQuery},
};

/// Events per page unless `limit` says otherwise, and the most one page holds.
pub const DEFAULT_LIMIT: i64 = 50;
pub const MAX_LIMIT: i64 = 500;

pub fn router() -> Router<AppState> {
    Router::new().route("/berth/v1/instances/{instance_id}/events", get(list))
}

#[derive(Debug, Default, Deserialize)]
struct Page {
    limit: Option<i64>,
    before: Option<i64>,
}

async fn list(
    State(state): State<AppState>,
    OsbPath(instance_id): OsbPath<String>,
    OsbQuery(page): OsbQuery<Page>,
) -> ApiResult<Response> {
    check_id("instance_id", &instance_id)?;
    let limit = page.limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(ApiError::bad_request(format!(
            "limit must be 1 to {MAX_LIMIT}"
        )));
    }
    let mut conn = state.db.acquire().await?;
    // One more than asked for tells whether a next page exists.
    let mut rows = events::for_instance(&mut *conn, &instance_id, page.before, limit + 1).await?;
    if rows.is_empty()
        && page.before.is_none()
        && instances::get(&mut *conn, &instance_id).await?.is_none()
    {
        return Err(ApiError::NotFound(format!(
            "service instance {instance_id} does not exist and has no events"
        )));
    }
    let more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    let mut body = json!({ "events": rows });
    if more && let Some(last) = rows.last() {
        body["next"] = json!(last.id);
    }
    Ok(Json(body).into_response())
}
