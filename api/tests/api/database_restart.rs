//! After the broker's database restarts, every idle connection in the pool is broken. One request finds out (503,
//! which a platform retries); from then on checkouts ping first, so the pool's other dead connections are
//! replaced instead of each failing a request of its own.

use axum::http::{Method, StatusCode};
use sqlx::{
    Connection, PgConnection,
    postgres::{PgConnectOptions, PgPoolOptions},
};

use crate::helpers::TestApp;

const POOLED: usize = 4;

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn after_a_restart_one_request_fails_not_one_per_pooled_connection(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let opts = opts.application_name("berth-restart-test");
    let pool = broker::db::pool_options(POOLED as u32)
        .connect_with(opts.clone())
        .await
        .unwrap();
    let app = TestApp::new(pool.clone());
    app.provisioned("i-1").await;
    // Every connection of the pool open and idle.
    let mut held = Vec::new();
    for _ in 0..POOLED {
        held.push(pool.acquire().await.unwrap());
    }
    drop(held);
    // Connections go back to the pool in the background.
    for _ in 0..50 {
        if pool.num_idle() == POOLED {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(pool.num_idle(), POOLED);

    // What a restart does to them: the server ends every session.
    let mut admin = PgConnection::connect_with(&opts.clone().application_name("admin"))
        .await
        .unwrap();
    let ended: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE application_name = 'berth-restart-test') AS t",
    )
    .fetch_one(&mut admin)
    .await
    .unwrap();
    assert!(ended >= POOLED as i64, "{ended}");
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;

    let mut statuses = Vec::new();
    for _ in 0..2 * POOLED {
        statuses.push(
            app.call(
                Method::GET,
                "/v2/service_instances/i-1/last_operation",
                None,
            )
            .await
            .status,
        );
    }
    let failed = statuses
        .iter()
        .filter(|s| **s == StatusCode::SERVICE_UNAVAILABLE)
        .count();
    assert!(
        failed <= 1,
        "{failed} requests failed on dead pooled connections: {statuses:?}"
    );
    assert!(
        statuses
            .iter()
            .all(|s| *s == StatusCode::OK || *s == StatusCode::SERVICE_UNAVAILABLE),
        "{statuses:?}"
    );
    assert_eq!(statuses.last(), Some(&StatusCode::OK));
}
