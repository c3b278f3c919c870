//! berth's OSB API (v2.17) as a library: `main.rs` builds an [`AppState`] and serves [`router`]; the
//! in-process tests drive the same router with `oneshot`.

pub mod auth_throttle;
pub mod dashboard;
pub mod error;
pub mod extract;
pub mod identity;
pub mod middleware;
pub mod observe;
pub mod openapi;
pub(crate) mod pool_claim;
pub mod provision_batch;
pub mod routes;
pub mod server;
pub mod snapshot_params;
pub mod task_waits;
pub mod tls;
pub mod webhook;

use std::{sync::Arc, time::Duration};

use axum::{
    Router,
    extract::{DefaultBodyLimit, Request},
    http::StatusCode,
};
use broker::{catalog::Catalog, crypto::Cipher};
use tower_http::{
    timeout::TimeoutLayer,
    trace::{DefaultOnResponse, TraceLayer},
};

pub use crate::{
    error::{ApiError, ApiResult},
    middleware::BrokerAuth,
};

/// Writers of the provision batcher: one batch in flight per writer, each on its own pool connection.
pub const PROVISION_WRITERS: usize = 2;

/// How long one request may take before it is answered with 408.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// What every handler needs. Cheap to clone (every extractor and middleware with state clones it): pool, catalog,
/// cipher, credentials and batcher are all shared handles.
#[derive(Clone)]
pub struct AppState {
    pub db: sqlx::PgPool,
    pub catalog: Arc<Catalog>,
    pub cipher: Cipher,
    pub auth: Arc<BrokerAuth>,
    pub max_body_bytes: usize,
    /// Group commit of new provisions (see [`provision_batch`]).
    pub provisions: provision_batch::ProvisionBatcher,
    /// Responses by status class, for `/metrics`.
    pub requests: Arc<middleware::RequestCounts>,
    /// Which webhook URLs requests may name.
    pub webhook_targets: Arc<broker::webhook_target::TargetPolicy>,
    /// The process's listener for finished tasks, for requests answered synchronously.
    pub task_waits: task_waits::TaskWaits,
    /// How long such a request waits for its task (`SYNC_WAIT_SECS`; below [`REQUEST_TIMEOUT`]).
    pub sync_wait: Duration,
    /// How `dashboard_url` links are made (`BROKER_PUBLIC_URL`, `DASHBOARD_LINK_TTL_SECS`).
    pub dashboard: Arc<dashboard::DashboardLinks>,
    /// Warm pools' targets by plan (`POOL_TARGETS`): a provision of a pooled plan tries its pool first.
    pub pool_targets: Arc<broker::pools::PoolTargets>,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("max_body_bytes", &self.max_body_bytes)
            .field("sync_wait", &self.sync_wait)
            .finish_non_exhaustive()
    }
}

/// The whole HTTP surface, fully layered: basic auth and the version check on `/v2`, the request id (echoed, in
/// the request's span and on its tasks) and latency histogram,
/// the body limit, tracing and the request timeout everywhere.
pub fn router(state: AppState) -> Router {
    let v2 = Router::new()
        .merge(routes::catalog::router())
        .merge(routes::instances::router())
        .merge(routes::bindings::router())
        .merge(routes::backups::akkeris_router())
        .method_not_allowed_fallback(middleware::method_not_allowed)
        .route_layer(axum::middleware::from_fn(middleware::require_api_version))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            middleware::require_basic_auth,
        ));

    // berth's own extensions: the same broker credentials, no OSB version header.
    let berth_v1 = Router::new()
        .merge(routes::presets::router())
        .merge(routes::backups::router())
        .merge(routes::price_check::router())
        .merge(routes::cluster::router())
        .merge(routes::events::router())
        .merge(routes::dashboard::operator_router())
        .merge(routes::instance_list::router())
        .method_not_allowed_fallback(middleware::method_not_allowed)
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            middleware::require_basic_auth,
        ));

    // One line per answer at info (status and latency), in the request's span: the access log.
    let trace = TraceLayer::new_for_http()
        .make_span_with(|req: &Request| observe::request_span(req))
        .on_response(DefaultOnResponse::new().level(tracing::Level::INFO));

    let metrics = routes::metrics::router().route_layer(axum::middleware::from_fn_with_state(
        state.clone(),
        middleware::require_basic_auth,
    ));

    Router::new()
        .merge(routes::health::router())
        .merge(openapi::router())
        .merge(routes::dashboard::public_router())
        .merge(metrics)
        .merge(v2)
        .merge(berth_v1)
        .method_not_allowed_fallback(middleware::method_not_allowed)
        .fallback(middleware::not_found)
        .layer(DefaultBodyLimit::max(state.max_body_bytes))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            REQUEST_TIMEOUT,
        ))
        .layer(trace)
        .layer(axum::middleware::from_fn(middleware::osb_error_bodies))
        .layer(axum::middleware::from_fn_with_state(
            state.requests.clone(),
            middleware::count_requests,
        ))
        .layer(axum::middleware::from_fn(observe::request_id_and_latency))
        .with_state(state)
}
