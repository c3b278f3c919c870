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
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{check_id, params::EventsQuery, params::InstanceIdPath};
use crate::{
    AppState,
    error::{ApiError, ApiResult, ErrorBody},
    extract::{OsbPath, OsbQuery},
};

/// Events per page unless `limit` says otherwise, and the most one page holds.
pub const DEFAULT_LIMIT: i64 = 50;
pub const MAX_LIMIT: i64 = 500;

pub fn router() -> Router<AppState> {
    Router::new().route("/berth/v1/instances/{instance_id}/events", get(list))
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct Page {
    limit: Option<i64>,
    before: Option<i64>,
}

/// A page of an instance's audit trail.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct EventsPage {
    events: Vec<events::Event>,
    /// The `before` of the next page; absent on the last one.
    #[serde(skip_serializing_if = "Option::is_none")]
    next: Option<i64>,
}

/// An instance's audit trail, newest first: who asked for what, when, from which request, and how it ended.
#[utoipa::path(
    get,
    path = "/berth/v1/instances/{instance_id}/events",
    tag = "audit trail",
    operation_id = "list_instance_events",
    params(InstanceIdPath, EventsQuery),
    responses(
        (status = 200, description = "A page of events", body = EventsPage),
        (status = 400, description = "A malformed id, `limit` or `before`", body = ErrorBody),
        (status = 404, description = "No such instance, and no events left of one", body = ErrorBody),
    )
)]
pub(crate) async fn list(
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
    let next = if more {
        rows.last().map(|last| last.id)
    } else {
        None
    };
    Ok(Json(EventsPage { events: rows, next }).into_response())
}
