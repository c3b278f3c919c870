//! `GET /v2/catalog`: the catalog body, rendered once at start.

use axum::{
    Router,
    body::Body,
    extract::State,
    http::{HeaderValue, header},
    response::Response,
    routing::get,
};

use crate::AppState;

pub fn router() -> Router<AppState> {
    Router::new().route("/v2/catalog", get(catalog))
}

/// The services and plans this broker serves (only plans whose engine is configured), with each plan's
/// parameter schemas. Rendered once at start.
#[utoipa::path(
    get,
    path = "/v2/catalog",
    tag = "catalog",
    operation_id = "catalog",
    responses(
        (status = 200, description = "The catalog", body = broker::catalog::CatalogBody<'static>),
    )
)]
pub(crate) async fn catalog(State(state): State<AppState>) -> Response {
    let mut response = Response::new(Body::from(axum::body::Bytes::from_owner(
        state.catalog.rendered(),
    )));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}
