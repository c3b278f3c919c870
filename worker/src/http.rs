//! The worker's own HTTP listener (`WORKER_HTTP_ADDR`): `GET /health` and `GET /metrics`, without credentials,
//! so keep it on a private address. Alive means the claim loop went round recently and the broker's database
//! answers; anything else is 503 with the reason.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context as _;
use axum::{
    Json, Router,
    extract::State,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use broker::telemetry::{self, names};
use serde_json::json;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::runner::Liveness;

/// The claim loop goes round once per poll interval at least; this many intervals (and no less than
/// [`MIN_STALE`]) without a round is a stuck worker.
const STALE_ROUNDS: u32 = 10;
const MIN_STALE: Duration = Duration::from_secs(15);
/// How long the database may take to answer `SELECT 1`.
const DB_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Clone)]
struct Probe {
    pool: PgPool,
    liveness: Arc<Liveness>,
    stale_after: Duration,
}

/// Binds `addr` and serves until `shutdown`; returns the bound address (port 0 picks a free one).
pub async fn start(
    addr: &str,
    pool: PgPool,
    liveness: Arc<Liveness>,
    poll_interval: Duration,
    shutdown: CancellationToken,
) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("WORKER_HTTP_ADDR {addr:?}: listening failed"))?;
    let local = listener.local_addr()?;
    let probe = Probe {
        pool,
        liveness,
        stale_after: (poll_interval * STALE_ROUNDS).max(MIN_STALE),
    };
    let app = router(probe);
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
        if let Err(e) = served {
            tracing::warn!(error = %e, "the worker's HTTP listener stopped");
        }
    });
    tracing::info!(%local, "worker health and metrics listening");
    Ok(local)
}

fn router(probe: Probe) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(render_metrics))
        .with_state(probe)
}

async fn health(State(probe): State<Probe>) -> Response {
    let age = probe.liveness.age();
    if age > probe.stale_after {
        return unavailable(format!(
            "the claim loop has not gone round for {:.0} s",
            age.as_secs_f64()
        ));
    }
    let query = sqlx::query("SELECT 1").execute(&probe.pool);
    match tokio::time::timeout(DB_TIMEOUT, query).await {
        Ok(Ok(_)) => (
            StatusCode::OK,
            Json(json!({ "status": "ok", "claim_loop_age_seconds": age.as_secs_f64() })),
        )
            .into_response(),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "health check: database query failed");
            unavailable("the broker's database is not answering".into())
        }
        Err(_) => unavailable("the broker's database did not answer in time".into()),
    }
}

fn unavailable(reason: String) -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({ "status": "unavailable", "description": reason })),
    )
        .into_response()
}

async fn render_metrics(State(probe): State<Probe>) -> Response {
    metrics::gauge!(names::WORKER_CLAIM_LOOP_AGE).set(probe.liveness.age().as_secs_f64());
    let mut response = telemetry::render_metrics().into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}

/// Counters start at 0 for every task kind, so rates and alerts see a series before the first event.
pub fn zero_counters(kinds: &[&'static str]) {
    for kind in kinds {
        metrics::counter!(names::TASK_RETRIES, "kind" => *kind).absolute(0);
        metrics::counter!(names::TASK_LEASE_EXPIRIES, "kind" => *kind).absolute(0);
    }
    for last in ["true", "false"] {
        metrics::counter!(names::WEBHOOK_FAILURES, "final" => last).absolute(0);
    }
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use tower::ServiceExt as _;

    use super::*;

    fn request(path: &str) -> axum::http::Request<Body> {
        axum::http::Request::get(path).body(Body::empty()).unwrap()
    }

    #[sqlx::test(migrator = "broker::MIGRATOR")]
    async fn health_fails_when_the_claim_loop_stalls(pool: PgPool) {
        let liveness = Arc::new(Liveness::default());
        let probe = |stale_after| Probe {
            pool: pool.clone(),
            liveness: liveness.clone(),
            stale_after,
        };
        let ok = router(probe(Duration::from_secs(60)))
            .oneshot(request("/health"))
            .await
            .unwrap();
        assert_eq!(ok.status(), StatusCode::OK);
        tokio::time::sleep(Duration::from_millis(30)).await;
        let stale = router(probe(Duration::from_millis(10)))
            .oneshot(request("/health"))
            .await
            .unwrap();
        assert_eq!(stale.status(), StatusCode::SERVICE_UNAVAILABLE);
    }

    #[sqlx::test(migrator = "broker::MIGRATOR")]
    async fn health_fails_when_the_database_is_gone(pool: PgPool) {
        let probe = Probe {
            pool: pool.clone(),
            liveness: Arc::new(Liveness::default()),
            stale_after: Duration::from_secs(60),
        };
        pool.close().await;
        let res = router(probe).oneshot(request("/health")).await.unwrap();
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    }
}
