//! berth's HA extension routes: `POST /berth/v1/instances/{id}/switchover` and `/failover`.

use axum::{
    body::Body,
    http::{Method, Request, StatusCode},
};
use broker::model::kinds;
use serde_json::{Value, json};
use sqlx::{PgPool, Row};

use crate::{
    assert_unchanged,
    helpers::{PG_SERVICE, TestApp},
};

const PG_HA: &str = "82d9fed1-cf5e-4477-8b7e-9a78f10e59b3";

/// An `ha` instance, provisioned, with members m1..m3 recorded as the worker records them.
async fn ha_provisioned(app: &TestApp, id: &str) {
    let body = json!({"service_id": PG_SERVICE, "plan_id": PG_HA, "organization_guid": "o", "space_guid": "s",
                      "parameters": {"members": 3}});
    let op = app.provision(id, &body).await.operation();
    app.finish(&op, "succeeded", None).await;
    sqlx::query("UPDATE service_instances SET details = $2 WHERE id = $1")
        .bind(id)
        .bind(json!({"primary": "m1", "members": [{"name": "m1"}, {"name": "m2"}, {"name": "m3"}]}))
        .execute(&app.pool)
        .await
        .unwrap();
}

async fn post(
    app: &TestApp,
    id: &str,
    action: &str,
    body: Option<&Value>,
) -> crate::helpers::TestResponse {
    app.call(
        Method::POST,
        &format!("/berth/v1/instances/{id}/{action}"),
        body,
    )
    .await
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn switchover_and_failover_are_instance_operations(pool: PgPool) {
    let app = TestApp::new(pool);
    ha_provisioned(&app, "ha-1").await;

    let op = post(&app, "ha-1", "switchover", None).await.operation();
    let task = app.task(&op).await;
    assert_eq!(task.get::<String, _>("kind"), kinds::CHANGE_PRIMARY);
    assert_eq!(
        task.get::<Option<String>, _>("operation").as_deref(),
        Some("switchover")
    );
    assert_eq!(task.get::<Value, _>("payload"), json!({}));
    // The same request again while it runs: the same operation; another one: 422 ConcurrencyError.
    assert_eq!(
        assert_unchanged!(app, post(&app, "ha-1", "switchover", None).await).operation(),
        op
    );
    assert_unchanged!(app, post(&app, "ha-1", "failover", None).await)
        .assert_osb_error(StatusCode::UNPROCESSABLE_ENTITY, Some("ConcurrencyError"));
    let last = app.last_operation("ha-1", Some(&op)).await;
    assert_eq!(last.body["state"], "in progress", "{last:?}");
    app.finish(&op, "succeeded", None).await;

    let op = post(&app, "ha-1", "failover", Some(&json!({"candidate": "m3"})))
        .await
        .operation();
    let task = app.task(&op).await;
    assert_eq!(
        task.get::<Option<String>, _>("operation").as_deref(),
        Some("failover")
    );
    assert_eq!(task.get::<Value, _>("payload"), json!({"candidate": "m3"}));
    // A failed change of primary leaves a usable instance.
    app.finish(&op, "failed", Some("Patroni refused")).await;
    let last = app.last_operation("ha-1", None).await;
    assert_eq!(
        (
            last.body["state"].as_str(),
            last.body["instance_usable"].as_bool()
        ),
        (Some("failed"), Some(true))
    );
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn refused_requests_change_nothing(pool: PgPool) {
    let app = TestApp::new(pool);
    ha_provisioned(&app, "ha-1").await;
    app.provisioned("shared-1").await;

    let anonymous = Request::builder()
        .method(Method::POST)
        .uri("/berth/v1/instances/ha-1/switchover")
        .body(Body::empty())
        .unwrap();
    assert_unchanged!(app, app.send(anonymous).await)
        .assert_osb_error(StatusCode::UNAUTHORIZED, None);
    assert_unchanged!(app, post(&app, "nope", "switchover", None).await)
        .assert_osb_error(StatusCode::NOT_FOUND, None);
    let why = assert_unchanged!(app, post(&app, "shared-1", "failover", None).await)
        .assert_osb_error(StatusCode::UNPROCESSABLE_ENTITY, None);
    assert!(why.contains("not an HA cluster"), "{why}");
    let why = assert_unchanged!(
        app,
        post(
            &app,
            "ha-1",
            "switchover",
            Some(&json!({"candidate": "m9"}))
        )
        .await
    )
    .assert_osb_error(StatusCode::UNPROCESSABLE_ENTITY, None);
    assert!(why.contains("not a member"), "{why}");
    assert_unchanged!(
        app,
        post(&app, "ha-1", "switchover", Some(&json!({"candidate": 3}))).await
    )
    .assert_osb_error(StatusCode::BAD_REQUEST, None);
    assert_unchanged!(
        app,
        post(&app, "ha-1", "switchover", Some(&json!({"leader": "m1"}))).await
    )
    .assert_osb_error(StatusCode::BAD_REQUEST, None);
}
