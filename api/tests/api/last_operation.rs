use axum::http::StatusCode;
use serde_json::json;
use sqlx::PgPool;

use crate::helpers::{PG_SERVICE, TestApp, bind_body, provision_body};

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn in_progress_then_succeeded(pool: PgPool) {
    let app = TestApp::new(pool);
    let op = app.provision("i-1", &provision_body()).await.operation();
    let res = app.last_operation("i-1", None).await;
    assert_eq!(res.status, StatusCode::OK);
    assert_eq!(
        res.body,
        json!({"state": "in progress", "description": "provision in progress"})
    );
    assert_eq!(res.headers["retry-after"], "2");

    app.set_running(&op, Some("creating database berth_x"))
        .await;
    let res = app.last_operation("i-1", Some(&op)).await;
    assert_eq!(res.body["description"], "creating database berth_x");

    app.finish(&op, "succeeded", None).await;
    let res = app.last_operation("i-1", Some(&op)).await;
    assert_eq!(
        res.body,
        json!({"state": "succeeded", "description": "provision succeeded"})
    );
    assert!(res.headers.get("retry-after").is_none());
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn failures_say_why_and_whether_the_instance_is_usable(pool: PgPool) {
    let app = TestApp::new(pool);
    let op = app.provision("i-1", &provision_body()).await.operation();
    app.finish(
        &op,
        "failed",
        Some("the shared server refused the connection"),
    )
    .await;
    let res = app.last_operation("i-1", None).await;
    assert_eq!(res.body["state"], "failed");
    assert!(
        res.body["description"]
            .as_str()
            .unwrap()
            .contains("the shared server refused the connection")
    );
    assert!(res.body.get("instance_usable").is_none());

    app.provisioned("i-2").await;
    let op = app
        .update(
            "i-2",
            &json!({"service_id": PG_SERVICE, "parameters": {"extensions": ["hstore"]}}),
        )
        .await
        .operation();
    app.finish(&op, "failed", Some("extension missing")).await;
    let res = app.last_operation("i-2", None).await;
    assert_eq!(res.body["state"], "failed");
    assert_eq!(res.body["instance_usable"], true);
    assert_eq!(res.body["update_repeatable"], true);

    let op = app.deprovision("i-2").await.operation();
    app.finish(&op, "failed", None).await;
    let res = app.last_operation("i-2", None).await;
    assert_eq!(res.body["state"], "failed");
    assert_eq!(res.body["description"], "The deprovision failed.");
    assert_eq!(res.body["instance_usable"], false);
    assert_eq!(res.body["update_repeatable"], false);
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn deprovisioned_is_410_and_unknown_is_404(pool: PgPool) {
    let app = TestApp::new(pool);
    app.last_operation("nope", None)
        .await
        .assert_osb_error(StatusCode::NOT_FOUND, None);
    app.provisioned("i-1").await;
    let op = app.deprovision("i-1").await.operation();
    app.complete_deprovision(&op, "i-1").await;
    let res = app.last_operation("i-1", Some(&op)).await;
    assert_eq!(res.status, StatusCode::GONE);
    assert_eq!(res.body, json!({}));
    assert_eq!(
        app.last_operation("i-1", None).await.status,
        StatusCode::GONE
    );
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn operation_must_be_this_instances(pool: PgPool) {
    let app = TestApp::new(pool);
    let op1 = app.provision("i-1", &provision_body()).await.operation();
    app.provision("i-2", &provision_body()).await.operation();
    app.last_operation("i-2", Some("not-a-uuid"))
        .await
        .assert_osb_error(StatusCode::BAD_REQUEST, None);
    app.last_operation("i-2", Some(&op1))
        .await
        .assert_osb_error(StatusCode::BAD_REQUEST, None);
    app.last_operation("i-2", Some(&uuid::Uuid::new_v4().to_string()))
        .await
        .assert_osb_error(StatusCode::BAD_REQUEST, None);
    assert_eq!(
        app.last_operation("i-1", Some(&op1)).await.status,
        StatusCode::OK
    );
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn binding_last_operation(pool: PgPool) {
    let app = TestApp::new(pool);
    app.binding_last_operation("i-1", "b-1", None)
        .await
        .assert_osb_error(StatusCode::NOT_FOUND, None);
    app.provisioned("i-1").await;
    let op = app.bind("i-1", "b-1", &bind_body()).await.operation();
    let res = app.binding_last_operation("i-1", "b-1", Some(&op)).await;
    assert_eq!(
        res.body,
        json!({"state": "in progress", "description": "bind in progress"})
    );
    assert_eq!(res.headers["retry-after"], "2");
    app.binding_last_operation("i-1", "b-1", Some("zzz"))
        .await
        .assert_osb_error(StatusCode::BAD_REQUEST, None);

    app.complete_bind(&op, "b-1", &json!({"u": "p"})).await;
    let res = app.binding_last_operation("i-1", "b-1", None).await;
    assert_eq!(
        res.body,
        json!({"state": "succeeded", "description": "bind succeeded"})
    );

    let op = app.unbind("i-1", "b-1").await.operation();
    app.finish(&op, "failed", Some("role in use")).await;
    let res = app.binding_last_operation("i-1", "b-1", None).await;
    assert_eq!(res.body["state"], "failed");
    assert!(
        res.body["description"]
            .as_str()
            .unwrap()
            .contains("role in use")
    );
    assert!(res.body.get("instance_usable").is_none());

    let op = app.unbind("i-1", "b-1").await.operation();
    app.complete_unbind(&op, "b-1").await;
    let res = app.binding_last_operation("i-1", "b-1", Some(&op)).await;
    assert_eq!(res.status, StatusCode::GONE);
    assert_eq!(res.body, json!({}));
}
