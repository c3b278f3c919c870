//! Requests whose client is gone (a 408, a disconnect: the handler's future is dropped) leave nothing behind.

use std::time::Duration;

use serde_json::json;
use sqlx::{PgPool, postgres::PgPoolOptions};

use crate::helpers::{PG_SERVICE, TestApp, provision_body};

/// A provision queued while every connection is busy, whose client leaves before one frees up, is never written:
/// the batcher checks that someone still waits after it gets its connection.
#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn a_provision_abandoned_while_waiting_for_a_connection_is_not_written(pool: PgPool) {
    let one = PgPoolOptions::new()
        .max_connections(1)
        .connect_with((*pool.connect_options()).clone())
        .await
        .unwrap();
    let app = TestApp::new(one.clone());
    let held = one.acquire().await.unwrap();
    let gave_up = tokio::time::timeout(
        Duration::from_millis(500),
        app.provision("i-1", &provision_body()),
    )
    .await;
    assert!(
        gave_up.is_err(),
        "the provision cannot be answered while the only connection is held"
    );
    drop(held);
    // The connection is free again: a waiting writer would have written by now.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let counts: (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM service_instances), (SELECT count(*) FROM tasks)",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(counts, (0, 0), "the abandoned provision was written");
    // And the batcher still serves the next one.
    app.provision("i-2", &provision_body()).await.operation();
}

/// A write handler dropped while its transaction waits (here on the instance's row lock) commits nothing, even
/// once the lock is released: its transaction is rolled back.
#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn an_update_abandoned_inside_its_transaction_is_rolled_back(pool: PgPool) {
    let app = TestApp::new(pool.clone());
    app.provisioned("i-1").await;
    let before = app.contents().await;
    let mut lock = pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM service_instances WHERE id = 'i-1' FOR UPDATE")
        .execute(&mut *lock)
        .await
        .unwrap();
    let body = json!({"service_id": PG_SERVICE, "parameters": {"extensions": ["hstore"]}});
    let gave_up = tokio::time::timeout(Duration::from_millis(500), app.update("i-1", &body)).await;
    assert!(gave_up.is_err(), "the update waits for the row lock");
    lock.rollback().await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        app.contents().await,
        before,
        "the abandoned update changed rows"
    );
    // The pool's connections are sound: the same update from a patient client is accepted.
    app.update("i-1", &body).await.operation();
}
