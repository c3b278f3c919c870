//! `GET /health` (no auth): 200 when the broker's database answers, 503 when it does not.

use std::time::Duration;

use axum::{
    Json, Router, extract::State, http::StatusCode, response::IntoResponse, response::Response,
    routing::get,
};
use serde_json::json;

use crate::{AppState, error::ApiError};

pub fn router() -> Router<AppState> {
    Router::new().route("/health", get(health))
}

async fn health(State(state): State<AppState>) -> Response {
    let probe = sqlx::query("SELECT 1").execute(&state.db);
    match tokio::time::timeout(Duration::from_secs(3), probe).await {
        Ok(Ok(_)) => (StatusCode::OK, Json(json!({ "status": "ok" }))).into_response(),
        Ok(Err(err)) => {
            tracing::warn!(error = %err, "health check: database query failed");
            ApiError::Unavailable("the broker's database is not answering".into()).into_response()
        }
        Err(_) => {
            tracing::warn!("health check: database query timed out");
            ApiError::Unavailable("the broker's database is not answering".into()).into_response()
        }
    }
}
