//! The Akkeris action `PUT /v2/service_instances/{id}/actions/credentials`: rotate every binding's credentials.

use axum::{
    body::Body,
    http::{Method, Request, StatusCode},
};
use broker::model::kinds;
use serde_json::{Value, json};
use sqlx::{PgPool, Row};

use crate::{
    assert_unchanged,
    helpers::{S3_BASIC, S3_SERVICE, TestApp},
};

fn rotate_uri(id: &str) -> String {
    format!("/v2/service_instances/{id}/actions/credentials")
}

async fn rotate(app: &TestApp, id: &str) -> crate::helpers::TestResponse {
    app.call(Method::PUT, &rotate_uri(id), None).await
}

fn s3_provision() -> Value {
    json!({"service_id": S3_SERVICE, "plan_id": S3_BASIC, "organization_guid": "o", "space_guid": "s"})
}

fn s3_bind() -> Value {
    json!({"service_id": S3_SERVICE, "plan_id": S3_BASIC, "bind_resource": {"app_guid": "app-1"}})
}

/// An s3 instance, provisioned, with one completed binding.
async fn s3_bound(app: &TestApp, id: &str, bid: &str) {
    let op = app.provision(id, &s3_provision()).await.operation();
    app.finish(&op, "succeeded", None).await;
    let op = app.bind(id, bid, &s3_bind()).await.operation();
    app.complete_bind(
        &op,
        bid,
        &json!({"S3_ACCESS_KEY": "old", "S3_SECRET_KEY": "s"}),
    )
    .await;
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn rotate_credentials_is_an_instance_operation_polled_on_last_operation(pool: PgPool) {
    let app = TestApp::new(pool);
    s3_bound(&app, "i-1", "b-1").await;

    let op = rotate(&app, "i-1").await.operation();
    let task = app.task(&op).await;
    assert_eq!(task.get::<String, _>("kind"), kinds::ROTATE_CREDENTIALS);
    assert_eq!(
        task.get::<Option<String>, _>("operation").as_deref(),
        Some("rotate_credentials")
    );
    assert_eq!(task.get::<Option<String>, _>("binding_id"), None);
    // The same request while it runs: the same operation, nothing new written.
    assert_eq!(
        assert_unchanged!(app, rotate(&app, "i-1").await).operation(),
        op
    );

    let res = app.last_operation("i-1", Some(&op)).await;
    assert_eq!(res.body["state"], "in progress", "{res:?}");
    let res = app.last_operation("i-1", None).await;
    assert_eq!(res.body["state"], "in progress", "{res:?}");

    // Nothing else may change the instance or its bindings meanwhile.
    assert_unchanged!(app, app.unbind("i-1", "b-1").await)
        .assert_osb_error(StatusCode::UNPROCESSABLE_ENTITY, Some("ConcurrencyError"));
    assert_unchanged!(app, app.bind("i-1", "b-2", &s3_bind()).await)
        .assert_osb_error(StatusCode::UNPROCESSABLE_ENTITY, Some("ConcurrencyError"));
    let update = json!({"service_id": S3_SERVICE, "parameters": {}});
    assert_unchanged!(app, app.update("i-1", &update).await)
        .assert_osb_error(StatusCode::UNPROCESSABLE_ENTITY, Some("ConcurrencyError"));
    let uri = format!(
        "/v2/service_instances/i-1?service_id={S3_SERVICE}&plan_id={S3_BASIC}&accepts_incomplete=true"
    );
    assert_unchanged!(app, app.call(Method::DELETE, &uri, None).await)
        .assert_osb_error(StatusCode::UNPROCESSABLE_ENTITY, Some("ConcurrencyError"));

    // A failed rotation leaves a usable instance (each binding keeps credentials that work) and may be repeated.
    app.finish(&op, "failed", Some("IAM said no")).await;
    let res = app.last_operation("i-1", Some(&op)).await;
    assert_eq!(res.body["state"], "failed");
    assert!(
        res.body["description"]
            .as_str()
            .unwrap()
            .contains("IAM said no"),
        "{res:?}"
    );
    assert_eq!(res.body["instance_usable"], true);
    assert_eq!(res.body["update_repeatable"], true);

    let again = rotate(&app, "i-1").await.operation();
    assert_ne!(again, op);
    app.finish(&again, "succeeded", None).await;
    let res = app.last_operation("i-1", None).await;
    assert_eq!(res.body["state"], "succeeded", "{res:?}");
    // After a rotation the instance is as provisioned: a repeated provision is 200, and unbinding works.
    let res = app.provision("i-1", &s3_provision()).await;
    assert_eq!(res.status, StatusCode::OK, "{res:?}");
    assert_eq!(app.unbind("i-1", "b-1").await.status, StatusCode::ACCEPTED);
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn refused_rotations_write_nothing(pool: PgPool) {
    let app = TestApp::new(pool);
    // Unknown: 404; not yet provisioned: 422 ConcurrencyError.
    assert_unchanged!(app, rotate(&app, "nope").await)
        .assert_osb_error(StatusCode::NOT_FOUND, None);
    let provision = app.provision("i-1", &s3_provision()).await.operation();
    assert_unchanged!(app, rotate(&app, "i-1").await)
        .assert_osb_error(StatusCode::UNPROCESSABLE_ENTITY, Some("ConcurrencyError"));
    app.finish(&provision, "succeeded", None).await;

    // Mid-operation (a bind in progress): 422 ConcurrencyError.
    let bind = app.bind("i-1", "b-1", &s3_bind()).await.operation();
    let description = assert_unchanged!(app, rotate(&app, "i-1").await)
        .assert_osb_error(StatusCode::UNPROCESSABLE_ENTITY, Some("ConcurrencyError"));
    assert!(description.contains(&bind), "{description}");
    app.finish(&bind, "succeeded", None).await;

    // A plan whose bindings have no credentials of their own (shared Postgres): 422, not a concurrency error.
    app.provisioned("pg-1").await;
    let res = assert_unchanged!(app, rotate(&app, "pg-1").await);
    let description = res.assert_osb_error(StatusCode::UNPROCESSABLE_ENTITY, None);
    assert_ne!(res.body["error"], "ConcurrencyError");
    assert!(
        description.contains("cannot rotate credentials"),
        "{description}"
    );

    // The /v2 rules hold: basic auth and the version header.
    let bare = Request::put(rotate_uri("i-1")).body(Body::empty()).unwrap();
    assert_unchanged!(app, app.send(bare).await).assert_osb_error(StatusCode::UNAUTHORIZED, None);
    let no_version = Request::put(rotate_uri("i-1"))
        .header("authorization", TestApp::auth_header())
        .body(Body::empty())
        .unwrap();
    assert_unchanged!(app, app.send(no_version).await)
        .assert_osb_error(StatusCode::PRECONDITION_FAILED, None);

    // And the s3 instance, now idle, can rotate.
    assert_eq!(rotate(&app, "i-1").await.status, StatusCode::ACCEPTED);
}
