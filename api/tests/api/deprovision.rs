use axum::http::{Method, StatusCode};
use broker::model::kinds;
use serde_json::{Value, json};
use sqlx::{PgPool, Row};

use crate::{
    assert_unchanged,
    helpers::{PG_SERVICE, PG_SHARED, TestApp, provision_body},
};

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn deprovision_is_202_with_a_task(pool: PgPool) {
    let app = TestApp::new(pool);
    app.provisioned("i-1").await;
    let op = app.deprovision("i-1").await.operation();
    let task = app.task(&op).await;
    assert_eq!(task.get::<String, _>("kind"), kinds::DEPROVISION);
    assert_eq!(
        task.get::<Option<String>, _>("operation").as_deref(),
        Some("deprovision")
    );
    assert_eq!(task.get::<Value, _>("payload"), json!({}));
    // Repeated while it runs: the same operation.
    assert_eq!(
        assert_unchanged!(app, app.deprovision("i-1").await).operation(),
        op
    );
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn missing_ids_are_400_and_sync_is_422(pool: PgPool) {
    let app = TestApp::new(pool);
    app.provisioned("i-1").await;
    assert_unchanged!(app, {
        for uri in [
            format!("/v2/service_instances/i-1?plan_id={PG_SHARED}&accepts_incomplete=true"),
            format!("/v2/service_instances/i-1?service_id={PG_SERVICE}&accepts_incomplete=true"),
        ] {
            app.call(Method::DELETE, &uri, None)
                .await
                .assert_osb_error(StatusCode::BAD_REQUEST, None);
        }
    });
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn unknown_instance_is_410(pool: PgPool) {
    let app = TestApp::new(pool);
    let res = assert_unchanged!(app, app.deprovision("nope").await);
    assert_eq!(res.status, StatusCode::GONE);
    assert_eq!(res.body, json!({}));
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn deprovision_during_another_operation_is_422(pool: PgPool) {
    let app = TestApp::new(pool);
    // While the provision runs: accepted (a platform cleaning up after a provision that timed out; the worker
    // cancels the provision if it has not started, or deprovisions once it has ended).
    let provision = app.provision("i-1", &provision_body()).await.operation();
    assert_ne!(app.deprovision("i-1").await.operation(), provision);
    // While an update runs.
    app.provisioned("i-2").await;
    app.update(
        "i-2",
        &json!({"service_id": PG_SERVICE, "parameters": {"extensions": ["hstore"]}}),
    )
    .await
    .operation();
    assert_unchanged!(app, app.deprovision("i-2").await)
        .assert_osb_error(StatusCode::UNPROCESSABLE_ENTITY, Some("ConcurrencyError"));
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn a_failed_provision_can_be_deprovisioned(pool: PgPool) {
    let app = TestApp::new(pool);
    let op = app.provision("i-1", &provision_body()).await.operation();
    app.finish(&op, "failed", Some("boom")).await;
    let op = app.deprovision("i-1").await.operation();
    app.complete_deprovision(&op, "i-1").await;
    assert_eq!(
        app.last_operation("i-1", None).await.status,
        StatusCode::GONE
    );
    assert_eq!(app.deprovision("i-1").await.status, StatusCode::GONE);
}
