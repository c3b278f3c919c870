//! The dashboard pages: `GET /dashboard/instances/{instance_id}?expires=…&sig=…` (an instance's page, opened
//! with the signed link of `dashboard_url`, no basic auth) and `GET /berth/v1/dashboard` (the operator overview,
//! behind the broker's credentials like every `/berth/v1` route).

use axum::{
    Router,
    extract::{Path, Query, State},
    http::StatusCode,
    response::Response,
    routing::get,
};
use broker::{
    dashboard_link::{self, LinkQuery, Refusal},
    db::instances,
};
use serde::Deserialize;

use crate::{
    AppState,
    dashboard::{instance_page, overview, page, refused},
};

/// The instance pages: no credentials, the link is the credential.
pub fn public_router() -> Router<AppState> {
    Router::new().route("/dashboard/instances/{instance_id}", get(instance))
}

/// The operator overview, to be merged under the broker's basic auth.
pub fn operator_router() -> Router<AppState> {
    Router::new().route("/berth/v1/dashboard", get(operator_overview))
}

#[derive(Debug, Deserialize)]
struct LinkParams {
    expires: Option<String>,
    sig: Option<String>,
}

async fn instance(
    State(state): State<AppState>,
    Path(instance_id): Path<String>,
    Query(params): Query<LinkParams>,
) -> Response {
    let Some(query) = params
        .expires
        .and_then(|e| e.parse::<i64>().ok())
        .zip(params.sig)
        .map(|(expires, sig)| LinkQuery { expires, sig })
    else {
        return not_a_good_link();
    };
    match render_instance(&state, &instance_id, &query).await {
        Ok(response) => response,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "reading an instance's dashboard failed");
            refused(
                StatusCode::INTERNAL_SERVER_ERROR,
                "The page is not available",
                "The broker could not read this instance's state just now; try again in a moment.",
            )
        }
    }
}

async fn render_instance(
    state: &AppState,
    instance_id: &str,
    query: &LinkQuery,
) -> anyhow::Result<Response> {
    let mut conn = state.db.acquire().await?;
    let Some(row) = instances::get(&mut *conn, instance_id).await? else {
        // Deprovisioned (or never there): the link died with the instance.
        return Ok(refused(
            StatusCode::GONE,
            "This instance is gone",
            "The service instance this link was made for has been deleted, and its page with it.",
        ));
    };
    match dashboard_link::verify(
        &state.cipher,
        &row.id,
        row.created_at,
        query,
        chrono::Utc::now(),
    ) {
        Ok(()) => {}
        Err(Refusal::NotSigned) => return Ok(not_a_good_link()),
        Err(Refusal::Expired) => {
            return Ok(refused(
                StatusCode::FORBIDDEN,
                "This link has expired",
                "Dashboard links last a limited time. Ask the platform for the instance again (a GET of the \
                 instance answers a fresh dashboard_url), or ask the broker's operator.",
            ));
        }
    }
    let page_data = instance_page::load(&mut conn, &state.catalog, &row, query.expires).await?;
    Ok(page(StatusCode::OK, "instance.html", page_data))
}

fn not_a_good_link() -> Response {
    refused(
        StatusCode::FORBIDDEN,
        "This link is not valid",
        "The link is incomplete, was changed, or was signed with a key the broker no longer holds. Use the \
         dashboard_url exactly as the broker gave it.",
    )
}

/// The operator overview, an HTML page: instances per plan and state, the queue by kind, recent failures.
#[utoipa::path(
    get,
    path = "/berth/v1/dashboard",
    tag = "dashboard",
    operation_id = "operator_overview",
    responses(
        (status = 200, description = "The overview page", content_type = "text/html", body = String),
        (status = 500, description = "The database could not be read (an HTML page)", content_type = "text/html", body = String),
    )
)]
pub(crate) async fn operator_overview(State(state): State<AppState>) -> Response {
    let loaded = async {
        let mut conn = state.db.acquire().await?;
        overview::load(&mut conn, &state.catalog).await
    }
    .await;
    match loaded {
        Ok(data) => page(StatusCode::OK, "overview.html", data),
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "reading the operator overview failed");
            refused(
                StatusCode::INTERNAL_SERVER_ERROR,
                "The overview is not available",
                "The broker could not read its database just now; try again in a moment.",
            )
        }
    }
}
