use axum::http::StatusCode;
use serde_json::json;
use sqlx::PgPool;

use crate::helpers::{PG_SERVICE, PG_SHARED, TestApp, bind_body, provision_body};

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn fetch_instance(pool: PgPool) {
    let app = TestApp::new(pool);
    app.fetch_instance("nope")
        .await
        .assert_osb_error(StatusCode::NOT_FOUND, None);
    let op = app.provision("i-1", &provision_body()).await.operation();
    app.fetch_instance("i-1")
        .await
        .assert_osb_error(StatusCode::NOT_FOUND, None);
    app.finish(&op, "succeeded", None).await;
    let res = app.fetch_instance("i-1").await;
    assert_eq!(res.status, StatusCode::OK);
    assert_eq!(
        res.body,
        json!({"service_id": PG_SERVICE, "plan_id": PG_SHARED, "parameters": {"extensions": ["citext"]},
               "maintenance_info": {"version": "1.0.0"}})
    );
    // While an update runs: 422.
    app.update(
        "i-1",
        &json!({"service_id": PG_SERVICE, "parameters": {"extensions": ["hstore"]}}),
    )
    .await
    .operation();
    app.fetch_instance("i-1")
        .await
        .assert_osb_error(StatusCode::UNPROCESSABLE_ENTITY, Some("ConcurrencyError"));
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn fetch_binding(pool: PgPool) {
    let app = TestApp::new(pool);
    app.provisioned("i-1").await;
    app.fetch_binding("i-1", "b-1")
        .await
        .assert_osb_error(StatusCode::NOT_FOUND, None);
    let op = app.bind("i-1", "b-1", &bind_body()).await.operation();
    app.fetch_binding("i-1", "b-1")
        .await
        .assert_osb_error(StatusCode::NOT_FOUND, None);
    app.complete_bind(&op, "b-1", &json!({"DATABASE_URL": "postgres://u:p@h/d"}))
        .await;
    let res = app.fetch_binding("i-1", "b-1").await;
    assert_eq!(res.status, StatusCode::OK);
    assert_eq!(
        res.body["credentials"],
        json!({"DATABASE_URL": "postgres://u:p@h/d"})
    );
    assert_eq!(res.body["parameters"], json!({"access": "read-only"}));
    assert_eq!(res.body["endpoints"][0]["host"], "db.example");
    // Under another instance id: 404.
    app.fetch_binding("i-2", "b-1")
        .await
        .assert_osb_error(StatusCode::NOT_FOUND, None);
}
