//! Password guessing: failed basic-auth attempts from one source address lead to 429 with `Retry-After` for that
//! source only; the right credentials from another source keep working, and the source may try again once its
//! window has passed.

use std::{net::SocketAddr, path::Path, sync::Arc, time::Duration};

use axum::{
    Router,
    body::Body,
    extract::ConnectInfo,
    http::{Request, StatusCode},
};
use base64::{Engine, engine::general_purpose::STANDARD};
use berth_api::{AppState, BrokerAuth};
use broker::{
    catalog::{Catalog, KNOWN_ENGINES},
    crypto::Cipher,
};
use http_body_util::BodyExt;
use serde_json::Value;
use sqlx::PgPool;
use tower::ServiceExt;

use crate::helpers::{MAX_BODY, PASSWORD, USER};

const LIMIT: u32 = 3;
const WINDOW: Duration = Duration::from_secs(2);

fn router(pool: PgPool) -> Router {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plans");
    berth_api::router(AppState {
        db: pool.clone(),
        catalog: Arc::new(Catalog::load(&dir, KNOWN_ENGINES).unwrap()),
        cipher: Cipher::from_key(&[42; 32]),
        auth: Arc::new(BrokerAuth::new(USER.into(), PASSWORD.into()).with_throttle(LIMIT, WINDOW)),
        max_body_bytes: MAX_BODY,
        provisions: berth_api::provision_batch::ProvisionBatcher::start(pool.clone(), 1),
        requests: Default::default(),
        webhook_targets: Arc::new(broker::webhook_target::TargetPolicy::new(true, None).unwrap()),
        task_waits: berth_api::task_waits::TaskWaits::start(pool.clone()),
        sync_wait: Duration::from_secs(5),
        dashboard: Default::default(),
        pool_targets: Default::default(),
    })
}

/// GET /v2/catalog from `source` (as the server's `ConnectInfo` would say), with these credentials.
async fn catalog(
    router: &Router,
    source: Option<&str>,
    password: &str,
) -> (StatusCode, Option<String>, Value) {
    let mut request = Request::get("/v2/catalog")
        .header("x-broker-api-version", "2.17")
        .header(
            "authorization",
            format!("Basic {}", STANDARD.encode(format!("{USER}:{password}"))),
        )
        .body(Body::empty())
        .unwrap();
    if let Some(source) = source {
        let addr: SocketAddr = source.parse().unwrap();
        request.extensions_mut().insert(ConnectInfo(addr));
    }
    let response = router.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        retry_after,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn guessing_from_one_source_is_429_and_never_locks_out_another(pool: PgPool) {
    let router = router(pool);
    let (guesser, platform) = (Some("203.0.113.7:40000"), Some("198.51.100.2:50000"));
    for _ in 0..LIMIT {
        assert_eq!(
            catalog(&router, guesser, "guess").await.0,
            StatusCode::UNAUTHORIZED
        );
    }
    // The guesser is refused, whatever it sends and from whichever of its ports.
    for (source, password) in [
        (guesser, "guess"),
        (guesser, PASSWORD),
        (Some("203.0.113.7:40001"), PASSWORD),
    ] {
        let (status, retry_after, body) = catalog(&router, source, password).await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
        assert_eq!(body["error"], "TooManyRequests", "{body}");
        let secs: u64 = retry_after.expect("Retry-After").parse().unwrap();
        assert!((1..=WINDOW.as_secs()).contains(&secs), "{secs}");
    }
    // Meanwhile the platform, elsewhere, is served; its own wrong attempts are its own.
    assert_eq!(catalog(&router, platform, PASSWORD).await.0, StatusCode::OK);
    assert_eq!(
        catalog(&router, platform, "typo").await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(catalog(&router, platform, PASSWORD).await.0, StatusCode::OK);
    // Requests the server cannot place (no peer address, as in-process) are not throttled.
    assert_eq!(catalog(&router, None, PASSWORD).await.0, StatusCode::OK);

    // Once the window has passed the guesser's source may log in again.
    tokio::time::sleep(WINDOW + Duration::from_millis(200)).await;
    assert_eq!(catalog(&router, guesser, PASSWORD).await.0, StatusCode::OK);
    assert_eq!(
        catalog(&router, guesser, "guess").await.0,
        StatusCode::UNAUTHORIZED
    );
}
