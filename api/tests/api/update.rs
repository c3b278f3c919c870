use axum::http::{Method, StatusCode};
use broker::model::{UpdatePayload, kinds};
use serde_json::{Value, json};
use sqlx::{PgPool, Row};

use crate::{
    assert_unchanged,
    helpers::{
        PG_SERVICE, PG_SHARED, T_FIXED, T_LARGE, T_SERVICE, T_SMALL, TestApp, provision_body,
    },
};

async fn provisioned_test_plan(app: &TestApp, id: &str, plan: &str) {
    let body = json!({"service_id": T_SERVICE, "plan_id": plan, "organization_guid": "o", "space_guid": "s",
                      "parameters": {"size": 1}});
    let op = app.provision(id, &body).await.operation();
    app.finish(&op, "succeeded", None).await;
}

async fn payload(app: &TestApp, op: &str) -> UpdatePayload {
    let task = app.task(op).await;
    assert_eq!(task.get::<String, _>("kind"), kinds::UPDATE);
    assert_eq!(
        task.get::<Option<String>, _>("operation").as_deref(),
        Some("update")
    );
    serde_json::from_value(task.get::<Value, _>("payload")).unwrap()
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn unknown_instance_is_404_and_unprovisioned_is_422(pool: PgPool) {
    let app = TestApp::new(pool);
    let body = json!({"service_id": PG_SERVICE, "parameters": {"extensions": ["hstore"]}});
    assert_unchanged!(app, app.update("nope", &body).await)
        .assert_osb_error(StatusCode::NOT_FOUND, None);
    app.provision("i-1", &provision_body()).await.operation();
    assert_unchanged!(app, app.update("i-1", &body).await)
        .assert_osb_error(StatusCode::UNPROCESSABLE_ENTITY, Some("ConcurrencyError"));
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn service_id_is_required(pool: PgPool) {
    let app = TestApp::new(pool);
    app.provisioned("i-1").await;
    let d = assert_unchanged!(app, app.update("i-1", &json!({"plan_id": PG_SHARED})).await)
        .assert_osb_error(StatusCode::BAD_REQUEST, None);
    assert!(d.contains("service_id"), "{d}");
    assert_unchanged!(
        app,
        app.update("i-1", &json!({"service_id": "other"})).await
    )
    .assert_osb_error(StatusCode::BAD_REQUEST, None);
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn context_only_update_is_applied_at_once(pool: PgPool) {
    let app = TestApp::new(pool);
    app.provisioned("i-1").await;
    let body = json!({"service_id": PG_SERVICE, "plan_id": PG_SHARED, "context": {"space_name": "new"},
                      "maintenance_info": {"version": "1.0.0"}});
    // No accepts_incomplete needed: nothing runs asynchronously.
    let before = app.counts().await;
    let res = app
        .call(Method::PATCH, "/v2/service_instances/i-1", Some(&body))
        .await;
    assert_eq!(app.counts().await, before, "no task: applied at once");
    assert_eq!(res.status, StatusCode::OK, "{res:?}");
    assert_eq!(res.body, json!({}));
    let context: Value =
        sqlx::query_scalar("SELECT context FROM service_instances WHERE id = 'i-1'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(context, json!({"space_name": "new"}));
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn parameter_update_is_202_with_merged_parameters(pool: PgPool) {
    let app = TestApp::new(pool);
    provisioned_test_plan(&app, "i-1", T_SMALL).await;
    let body = json!({"service_id": T_SERVICE, "parameters": {"color": "blue",
                      "webhook": {"url": "https://h.example/x", "secret": "s"}}});
    assert_unchanged!(
        app,
        app.call(Method::PATCH, "/v2/service_instances/i-1", Some(&body))
            .await
    )
    .assert_osb_error(StatusCode::UNPROCESSABLE_ENTITY, Some("AsyncRequired"));
    let op = app.update("i-1", &body).await.operation();
    let p = payload(&app, &op).await;
    assert_eq!(p.plan_id, T_SMALL);
    assert_eq!(p.parameters, json!({"size": 1, "color": "blue"}));
    assert_eq!(p.maintenance_version, None);
    assert_eq!(
        app.task(&op)
            .await
            .get::<Option<String>, _>("webhook_url")
            .as_deref(),
        Some("https://h.example/x")
    );
    // The row keeps its parameters until the worker applies the update.
    let params: Value =
        sqlx::query_scalar("SELECT parameters FROM service_instances WHERE id = 'i-1'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(params, json!({"size": 1}));
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn update_parameters_are_schema_checked(pool: PgPool) {
    let app = TestApp::new(pool);
    app.provisioned("i-1").await;
    let body = json!({"service_id": PG_SERVICE, "parameters": {"extensions": ["nope"]}});
    let d = assert_unchanged!(app, app.update("i-1", &body).await)
        .assert_osb_error(StatusCode::BAD_REQUEST, None);
    assert!(d.contains("extensions"), "{d}");
    let body = json!({"service_id": PG_SERVICE, "parameters": {"extensions": ["hstore"]}});
    let op = app.update("i-1", &body).await.operation();
    assert_eq!(
        payload(&app, &op).await.parameters,
        json!({"extensions": ["hstore"]})
    );
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn plan_changes(pool: PgPool) {
    let app = TestApp::new(pool);
    provisioned_test_plan(&app, "i-1", T_SMALL).await;
    // To a plan of another service: 400.
    let d = assert_unchanged!(
        app,
        app.update(
            "i-1",
            &json!({"service_id": T_SERVICE, "plan_id": PG_SHARED})
        )
        .await
    )
    .assert_osb_error(StatusCode::BAD_REQUEST, None);
    assert!(d.contains("another service"), "{d}");
    // To an unknown plan: 400.
    assert_unchanged!(
        app,
        app.update("i-1", &json!({"service_id": T_SERVICE, "plan_id": "nope"}))
            .await
    )
    .assert_osb_error(StatusCode::BAD_REQUEST, None);
    // small -> large: 202, the new plan's maintenance version.
    let op = app
        .update("i-1", &json!({"service_id": T_SERVICE, "plan_id": T_LARGE}))
        .await
        .operation();
    let p = payload(&app, &op).await;
    assert_eq!(p.plan_id, T_LARGE);
    assert_eq!(p.maintenance_version.as_deref(), Some("2.1.0"));
    assert_eq!(p.parameters, json!({"size": 1}));
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn plan_change_of_a_non_updateable_plan_is_422(pool: PgPool) {
    let app = TestApp::new(pool);
    provisioned_test_plan(&app, "i-1", T_FIXED).await;
    let d = assert_unchanged!(
        app,
        app.update("i-1", &json!({"service_id": T_SERVICE, "plan_id": T_SMALL}))
            .await
    )
    .assert_osb_error(
        StatusCode::UNPROCESSABLE_ENTITY,
        Some("UnprocessableEntity"),
    );
    assert!(d.contains("plan_updateable"), "{d}");
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn maintenance_info_must_match_the_target_plan(pool: PgPool) {
    let app = TestApp::new(pool);
    provisioned_test_plan(&app, "i-1", T_SMALL).await;
    let body = json!({"service_id": T_SERVICE, "plan_id": T_LARGE, "maintenance_info": {"version": "2.0.0"}});
    assert_unchanged!(app, app.update("i-1", &body).await).assert_osb_error(
        StatusCode::UNPROCESSABLE_ENTITY,
        Some("MaintenanceInfoConflict"),
    );
    let body = json!({"service_id": T_SERVICE, "plan_id": T_LARGE, "maintenance_info": {"version": "2.1.0"}});
    app.update("i-1", &body).await.operation();
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn update_during_another_operation_is_422_concurrency(pool: PgPool) {
    let app = TestApp::new(pool);
    app.provisioned("i-1").await;
    app.deprovision("i-1").await.operation();
    let body = json!({"service_id": PG_SERVICE, "parameters": {"extensions": ["hstore"]}});
    assert_unchanged!(app, app.update("i-1", &body).await)
        .assert_osb_error(StatusCode::UNPROCESSABLE_ENTITY, Some("ConcurrencyError"));
    // A context-only update is refused too while something runs.
    let body = json!({"service_id": PG_SERVICE, "context": {"x": 1}});
    assert_unchanged!(app, app.update("i-1", &body).await)
        .assert_osb_error(StatusCode::UNPROCESSABLE_ENTITY, Some("ConcurrencyError"));
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn a_resent_update_is_202_with_the_same_operation(pool: PgPool) {
    let app = TestApp::new(pool);
    app.provisioned("i-1").await;
    let body = json!({"service_id": PG_SERVICE, "parameters": {"extensions": ["hstore"]}});
    let op = app.update("i-1", &body).await.operation();
    assert_eq!(
        assert_unchanged!(app, app.update("i-1", &body).await).operation(),
        op
    );
    // A different update while it runs is a concurrency error.
    let other = json!({"service_id": PG_SERVICE, "parameters": {"extensions": ["citext"]}});
    assert_unchanged!(app, app.update("i-1", &other).await)
        .assert_osb_error(StatusCode::UNPROCESSABLE_ENTITY, Some("ConcurrencyError"));
}

/// s3: versioning and encryption can be turned on by a plan change, never off (S3 cannot), and the refusal
/// is synchronous, driven by the catalog's `one_way_features`.
#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn s3_plan_changes_that_s3_cannot_make_are_422(pool: PgPool) {
    const S3: &str = "6f0c2f4e-3b1a-4c55-9d0e-8a4b7c2e1f01";
    const BASIC: &str = "b1c7a3e0-52d4-4f0a-8e61-3d2f9a7c5b11";
    const VERSIONED: &str = "c2d8b4f1-63e5-4a1b-9f72-4e3a0b8d6c22";
    const ENCRYPTED: &str = "d3e9c5a2-74f6-4b2c-8a83-5f4b1c9e7d33";
    const BOTH: &str = "e4fad6b3-8507-4c3d-9b94-6a5c2daf8e44";
    let app = TestApp::new(pool);
    let provision = |plan: &str| json!({"service_id": S3, "plan_id": plan, "organization_guid": "o", "space_guid": "s"});
    for (id, plan) in [("v", VERSIONED), ("e", ENCRYPTED)] {
        let op = app.provision(id, &provision(plan)).await.operation();
        app.finish(&op, "succeeded", None).await;
    }
    for (id, to, what) in [
        ("v", BASIC, "versioning"),
        ("v", ENCRYPTED, "versioning"),
        ("e", BASIC, "encrypted"),
    ] {
        let d = assert_unchanged!(
            app,
            app.update(id, &json!({"service_id": S3, "plan_id": to}))
                .await
        )
        .assert_osb_error(
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("UnprocessableEntity"),
        );
        assert!(d.contains(what), "{d}");
    }
    // Turning a feature on is allowed: versioned -> encrypted-versioned.
    let op = app
        .update("v", &json!({"service_id": S3, "plan_id": BOTH}))
        .await
        .operation();
    assert_eq!(payload(&app, &op).await.plan_id, BOTH);
}
