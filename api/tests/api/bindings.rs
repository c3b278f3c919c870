use axum::http::{Method, StatusCode};
use broker::model::kinds;
use serde_json::{Value, json};
use sqlx::{PgPool, Row};

use crate::{
    assert_unchanged,
    helpers::{
        PG_SERVICE, PG_SHARED, T_SERVICE, T_SMALL, T_UNBINDABLE, TestApp, bind_body, provision_body,
    },
};

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn new_binding_is_202_with_row_and_task(pool: PgPool) {
    let app = TestApp::new(pool);
    app.provisioned("i-1").await;
    let op = app.bind("i-1", "b-1", &bind_body()).await.operation();
    assert_eq!(app.counts().await, (1, 1, 2));
    let task = app.task(&op).await;
    assert_eq!(task.get::<String, _>("kind"), kinds::BIND);
    assert_eq!(
        task.get::<Option<String>, _>("operation").as_deref(),
        Some("bind")
    );
    assert_eq!(
        task.get::<Option<String>, _>("instance_id").as_deref(),
        Some("i-1")
    );
    assert_eq!(
        task.get::<Option<String>, _>("binding_id").as_deref(),
        Some("b-1")
    );
    assert_eq!(task.get::<Value, _>("payload"), json!({}));
    let row = sqlx::query("SELECT * FROM service_bindings WHERE id = 'b-1'")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(
        row.get::<Option<String>, _>("app_guid").as_deref(),
        Some("app-1")
    );
    assert_eq!(
        row.get::<Value, _>("parameters"),
        json!({"access": "read-only"})
    );
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn bind_refusals(pool: PgPool) {
    let app = TestApp::new(pool);
    app.provisioned("i-1").await;
    assert_unchanged!(app, {
        // `accepts_incomplete=false` is a synchronous bind (tests/api/synchronous.rs), no refusal.
        // Unknown plan: 400.
        let mut body = bind_body();
        body["plan_id"] = json!("nope");
        app.bind("i-1", "b-1", &body)
            .await
            .assert_osb_error(StatusCode::BAD_REQUEST, None);
        // A known plan that is not the instance's: 400.
        let body = json!({"service_id": T_SERVICE, "plan_id": T_SMALL});
        app.bind("i-1", "b-1", &body)
            .await
            .assert_osb_error(StatusCode::BAD_REQUEST, None);
        // Not bindable: 400.
        let body = json!({"service_id": T_SERVICE, "plan_id": T_UNBINDABLE});
        let d = app
            .bind("i-1", "b-1", &body)
            .await
            .assert_osb_error(StatusCode::BAD_REQUEST, None);
        assert!(d.contains("bindable"), "{d}");
        // Schema violation names the field.
        let mut body = bind_body();
        body["parameters"] = json!({"access": "write-only"});
        let d = app
            .bind("i-1", "b-1", &body)
            .await
            .assert_osb_error(StatusCode::BAD_REQUEST, None);
        assert!(d.contains("access"), "{d}");
        // Missing service_id: 400.
        app.bind("i-1", "b-1", &json!({"plan_id": PG_SHARED}))
            .await
            .assert_osb_error(StatusCode::BAD_REQUEST, None);
        // Unknown instance: 404.
        app.bind("nope", "b-1", &bind_body())
            .await
            .assert_osb_error(StatusCode::NOT_FOUND, None);
    });
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn bind_before_the_instance_is_provisioned_is_422(pool: PgPool) {
    let app = TestApp::new(pool);
    let op = app.provision("i-1", &provision_body()).await.operation();
    assert_unchanged!(app, app.bind("i-1", "b-1", &bind_body()).await)
        .assert_osb_error(StatusCode::UNPROCESSABLE_ENTITY, Some("ConcurrencyError"));
    app.finish(&op, "failed", None).await;
    let d = assert_unchanged!(app, app.bind("i-1", "b-1", &bind_body()).await).assert_osb_error(
        StatusCode::UNPROCESSABLE_ENTITY,
        Some("UnprocessableEntity"),
    );
    assert!(d.contains("failed"), "{d}");
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn bind_during_an_instance_operation_is_422(pool: PgPool) {
    let app = TestApp::new(pool);
    app.provisioned("i-1").await;
    app.update(
        "i-1",
        &json!({"service_id": PG_SERVICE, "parameters": {"extensions": ["hstore"]}}),
    )
    .await
    .operation();
    assert_unchanged!(app, app.bind("i-1", "b-1", &bind_body()).await)
        .assert_osb_error(StatusCode::UNPROCESSABLE_ENTITY, Some("ConcurrencyError"));
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn repeating_a_bind_follows_its_task(pool: PgPool) {
    let app = TestApp::new(pool);
    app.provisioned("i-1").await;
    let first = app.bind("i-1", "b-1", &bind_body()).await.operation();
    assert_eq!(
        assert_unchanged!(app, app.bind("i-1", "b-1", &bind_body()).await).operation(),
        first
    );

    app.finish(&first, "failed", Some("boom")).await;
    let second = app.bind("i-1", "b-1", &bind_body()).await.operation();
    assert_ne!(first, second);

    app.complete_bind(&second, "b-1", &json!({"DATABASE_URL": "postgres://x"}))
        .await;
    let res = assert_unchanged!(app, app.bind("i-1", "b-1", &bind_body()).await);
    assert_eq!(res.status, StatusCode::OK);
    assert_eq!(
        res.body["credentials"],
        json!({"DATABASE_URL": "postgres://x"})
    );
    assert_eq!(res.body["endpoints"][0]["port"], Value::Null);
    assert_eq!(res.body["endpoints"][0]["host"], "db.example");
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn different_binding_attributes_are_409(pool: PgPool) {
    let app = TestApp::new(pool);
    app.provisioned("i-1").await;
    app.provisioned("i-2").await;
    app.bind("i-1", "b-1", &bind_body()).await.operation();
    let mut body = bind_body();
    body["parameters"] = json!({"access": "read-write"});
    assert_unchanged!(app, app.bind("i-1", "b-1", &body).await)
        .assert_osb_error(StatusCode::CONFLICT, None);
    let mut body = bind_body();
    body["bind_resource"] = json!({"app_guid": "app-2"});
    assert_unchanged!(app, app.bind("i-1", "b-1", &body).await)
        .assert_osb_error(StatusCode::CONFLICT, None);
    // The same binding id under another instance.
    assert_unchanged!(app, app.bind("i-2", "b-1", &bind_body()).await)
        .assert_osb_error(StatusCode::CONFLICT, None);
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn unbind(pool: PgPool) {
    let app = TestApp::new(pool);
    app.bound("i-1", "b-1").await;
    assert_unchanged!(app, {
        for query in [
            format!("plan_id={PG_SHARED}&accepts_incomplete=true"),
            format!("service_id={PG_SERVICE}&accepts_incomplete=true"),
        ] {
            let uri = format!("/v2/service_instances/i-1/service_bindings/b-1?{query}");
            app.call(Method::DELETE, &uri, None)
                .await
                .assert_osb_error(StatusCode::BAD_REQUEST, None);
        }
        let res = app.unbind("i-1", "nope").await;
        assert_eq!((res.status, res.body), (StatusCode::GONE, json!({})));
        assert_eq!(app.unbind("i-2", "b-1").await.status, StatusCode::GONE);
    });
    let op = app.unbind("i-1", "b-1").await.operation();
    let task = app.task(&op).await;
    assert_eq!(task.get::<String, _>("kind"), kinds::UNBIND);
    assert_eq!(
        task.get::<Option<String>, _>("binding_id").as_deref(),
        Some("b-1")
    );
    assert_eq!(
        assert_unchanged!(app, app.unbind("i-1", "b-1").await).operation(),
        op
    );
    // A bind of the same id while the unbind runs: 422.
    assert_unchanged!(app, app.bind("i-1", "b-1", &bind_body()).await)
        .assert_osb_error(StatusCode::UNPROCESSABLE_ENTITY, Some("ConcurrencyError"));
}

/// A platform cleaning up after a bind that timed out unbinds while the bind is in progress: accepted (the
/// worker cancels the bind if it has not started, or unbinds once it has ended).
#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn unbind_while_binding_is_accepted(pool: PgPool) {
    let app = TestApp::new(pool);
    app.provisioned("i-1").await;
    let bind = app.bind("i-1", "b-1", &bind_body()).await.operation();
    let unbind = app.unbind("i-1", "b-1").await.operation();
    assert_ne!(bind, unbind);
    assert_eq!(
        assert_unchanged!(app, app.unbind("i-1", "b-1").await).operation(),
        unbind
    );
    // The bind again while the unbind is in progress: 422.
    assert_unchanged!(app, app.bind("i-1", "b-1", &bind_body()).await)
        .assert_osb_error(StatusCode::UNPROCESSABLE_ENTITY, Some("ConcurrencyError"));
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn concurrent_identical_binds_make_one_task(pool: PgPool) {
    let app = TestApp::new(pool);
    app.provisioned("i-1").await;
    let body = bind_body();
    let (a, b, c) = tokio::join!(
        app.bind("i-1", "b-1", &body),
        app.bind("i-1", "b-1", &body),
        app.bind("i-1", "b-1", &body)
    );
    assert_eq!(a.operation(), b.operation());
    assert_eq!(a.operation(), c.operation());
    assert_eq!(app.counts().await, (1, 1, 2));
}

/// OSB binding rotation: on a `binding_rotatable` plan a bind may name its predecessor (a binding of the same
/// instance) and takes its parameters when it brings none; the predecessor stays until it is deleted.
#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn binding_rotation_names_a_predecessor(pool: PgPool) {
    const S3: &str = "6f0c2f4e-3b1a-4c55-9d0e-8a4b7c2e1f01";
    const BASIC: &str = "b1c7a3e0-52d4-4f0a-8e61-3d2f9a7c5b11";
    let app = TestApp::new(pool);
    for id in ["s-1", "s-2"] {
        let body = json!({"service_id": S3, "plan_id": BASIC, "organization_guid": "o", "space_guid": "s"});
        let op = app.provision(id, &body).await.operation();
        app.finish(&op, "succeeded", None).await;
    }
    let bind = |params: Value| json!({"service_id": S3, "plan_id": BASIC, "parameters": params});
    let op = app
        .bind("s-1", "old", &bind(json!({"access": "read-only"})))
        .await
        .operation();
    app.complete_bind(&op, "old", &json!({"S3_ACCESS_KEY": "k"}))
        .await;

    let mut rotated = json!({"service_id": S3, "plan_id": BASIC, "predecessor_binding_id": "old"});
    app.bind("s-1", "new", &rotated).await.operation();
    assert_eq!(
        app.binding_parameters("new").await,
        json!({"access": "read-only"})
    );
    assert_eq!(app.counts().await.1, 2, "the predecessor stays");

    // A predecessor of another instance, or an unknown one: 400, nothing written.
    rotated["predecessor_binding_id"] = json!("old");
    assert_unchanged!(app, app.bind("s-2", "other", &rotated).await)
        .assert_osb_error(StatusCode::BAD_REQUEST, None);
    rotated["predecessor_binding_id"] = json!("nope");
    assert_unchanged!(app, app.bind("s-1", "other", &rotated).await)
        .assert_osb_error(StatusCode::BAD_REQUEST, None);
    // A plan that is not binding_rotatable: 400.
    let body = json!({"service_id": T_SERVICE, "plan_id": T_SMALL, "organization_guid": "o", "space_guid": "s"});
    let op = app.provision("t-1", &body).await.operation();
    app.finish(&op, "succeeded", None).await;
    let mut body = json!({"service_id": T_SERVICE, "plan_id": T_SMALL});
    let op = app.bind("t-1", "tb-1", &body).await.operation();
    app.complete_bind(&op, "tb-1", &json!({"k": "v"})).await;
    body["predecessor_binding_id"] = json!("tb-1");
    let d = assert_unchanged!(app, app.bind("t-1", "tb-2", &body).await)
        .assert_osb_error(StatusCode::BAD_REQUEST, None);
    assert!(d.contains("binding_rotatable"), "{d}");
}

/// A webhook rides on bind (in `parameters`), unbind and deprovision (the Akkeris query form): each task
/// carries the URL and the sealed secret, and the binding's stored parameters do not.
#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn webhooks_ride_on_bind_unbind_and_deprovision(pool: PgPool) {
    let app = TestApp::new(pool);
    app.provisioned("i-1").await;
    let webhook_of = |task: &sqlx::postgres::PgRow| {
        let sealed: Vec<u8> = task.get("webhook_secret");
        (
            task.get::<Option<String>, _>("webhook_url"),
            String::from_utf8(app.cipher.open(&sealed).unwrap()).unwrap(),
        )
    };

    let mut body = bind_body();
    body["parameters"]["webhook"] =
        json!({"url": "https://hooks.example/bind", "secret": "bind-secret"});
    let op = app.bind("i-1", "b-1", &body).await.operation();
    assert_eq!(
        webhook_of(&app.task(&op).await),
        (
            Some("https://hooks.example/bind".into()),
            "bind-secret".into()
        )
    );
    let stored: Value =
        sqlx::query_scalar("SELECT parameters FROM service_bindings WHERE id = 'b-1'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(stored, json!({"access": "read-only"}));
    app.complete_bind(&op, "b-1", &json!({"uri": "x"})).await;

    let hook = "webhook=https%3A%2F%2Fhooks.example%2Fgone&secret=gone-secret";
    let uri = format!(
        "/v2/service_instances/i-1/service_bindings/b-1?accepts_incomplete=true&service_id={PG_SERVICE}&plan_id={PG_SHARED}&{hook}"
    );
    let op = app.call(Method::DELETE, &uri, None).await.operation();
    assert_eq!(
        webhook_of(&app.task(&op).await),
        (
            Some("https://hooks.example/gone".into()),
            "gone-secret".into()
        )
    );
    app.complete_unbind(&op, "b-1").await;

    let uri = format!(
        "/v2/service_instances/i-1?accepts_incomplete=true&service_id={PG_SERVICE}&plan_id={PG_SHARED}&{hook}"
    );
    let op = app.call(Method::DELETE, &uri, None).await.operation();
    assert_eq!(
        webhook_of(&app.task(&op).await),
        (
            Some("https://hooks.example/gone".into()),
            "gone-secret".into()
        )
    );
}
