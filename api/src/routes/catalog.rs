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

async fn catalog(State(state): State<AppState>) -> Response {
    let mut response = Response::new(Body::from(axum::body::Bytes::from_owner(
        state.catalog.rendered(),
    )));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}
