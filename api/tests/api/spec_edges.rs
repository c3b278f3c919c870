//! OSB v2.17 to the letter at the edges: text Postgres cannot store (U+0000) is a 400 naming the field, the
//! guids the spec says are non-empty, operations on an instance whose provision runs (422 `ConcurrencyError`),
//! 410 before `AsyncRequired` on DELETE, and the size cap on `X-Broker-API-Originating-Identity`.

use axum::{
    body::Body,
    http::{Method, StatusCode},
};
use base64::{Engine, engine::general_purpose::STANDARD};
use serde_json::{Value, json};
use sqlx::PgPool;

use crate::{
    assert_unchanged,
    helpers::{PG_SERVICE, PG_SHARED, TestApp, TestResponse, bind_body, provision_body},
};

const PG_DEDICATED: &str = "5f0c2d8e-9b41-4c7a-a6e3-2d7f1b8c4e90";
const IDENTITY: &str = "x-broker-api-originating-identity";

async fn send(
    app: &TestApp,
    method: Method,
    uri: &str,
    headers: &[(&str, &str)],
    body: Option<&Value>,
) -> TestResponse {
    let mut builder = TestApp::request(method, uri).header("content-type", "application/json");
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let body = body.map_or_else(Body::empty, |b| Body::from(serde_json::to_vec(b).unwrap()));
    app.send(builder.body(body).unwrap()).await
}

fn with(mut body: Value, field: &str, value: Value) -> Value {
    body[field] = value;
    body
}

/// (method, uri, identity header, body, what the description must name)
type Case<'a> = (Method, String, Option<&'a str>, Option<Value>, &'static str);

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn nul_anywhere_is_400_naming_the_field_and_writes_nothing(pool: PgPool) {
    let app = TestApp::new(pool);
    app.provisioned("i-1").await;
    app.provisioned("i-2").await;
    let nul_identity = format!(
        "cloudfoundry {}",
        STANDARD.encode(r#"{"user_id":"a\u0000b"}"#)
    );
    let cases = [
        provision_nul_cases(&nul_identity),
        update_nul_cases(&nul_identity),
        bind_nul_cases(&nul_identity),
        berth_api_nul_cases(),
    ]
    .concat();
    assert_unchanged!(app, {
        for (method, uri, identity, body, field) in cases {
            let headers: Vec<(&str, &str)> = identity.map(|v| (IDENTITY, v)).into_iter().collect();
            let d = send(&app, method.clone(), &uri, &headers, body.as_ref())
                .await
                .assert_osb_error(StatusCode::BAD_REQUEST, Some("BadRequest"));
            assert!(
                d.contains(field) && d.contains("U+0000"),
                "{method} {uri}: {d:?} should name {field}"
            );
        }
    });
    // An escaped backslash before `u0000` is ordinary text, not a NUL.
    let body = with(provision_body(), "context", json!({"path": "C:\\u0000"}));
    app.provision("i-3", &body).await.operation();
}

/// NUL in a provision: its guids, context (values, keys, nested), parameters, query and identity.
fn provision_nul_cases<'a>(identity: &'a str) -> Vec<Case<'a>> {
    let provision = "/v2/service_instances/i-new?accepts_incomplete=true";
    let dedicated = json!({
        "service_id": PG_SERVICE, "plan_id": PG_DEDICATED, "organization_guid": "o", "space_guid": "s",
        "parameters": {"tags": {"k": "v\u{0}"}},
    });
    vec![
        (
            Method::PUT,
            provision.into(),
            None,
            Some(with(provision_body(), "organization_guid", json!("o\u{0}"))),
            "`organization_guid`",
        ),
        (
            Method::PUT,
            provision.into(),
            None,
            Some(with(provision_body(), "space_guid", json!("\u{0}"))),
            "`space_guid`",
        ),
        (
            Method::PUT,
            provision.into(),
            None,
            Some(with(provision_body(), "context", json!({"foo": "v\u{0}"}))),
            "`context.foo`",
        ),
        (
            Method::PUT,
            provision.into(),
            None,
            Some(with(provision_body(), "context", json!({"f\u{0}": "v"}))),
            "a key of `context`",
        ),
        (
            Method::PUT,
            provision.into(),
            None,
            Some(with(
                provision_body(),
                "context",
                json!({"a": [1, {"b": "\u{0}"}]}),
            )),
            "`context.a[1].b`",
        ),
        (
            Method::PUT,
            provision.into(),
            None,
            Some(dedicated),
            "`parameters.tags.k`",
        ),
        (
            Method::PUT,
            format!("{provision}&webhook=https%3A%2F%2Fexample.com%2F%00"),
            None,
            Some(provision_body()),
            "the query parameter `webhook`",
        ),
        (
            Method::PUT,
            provision.into(),
            Some(identity),
            Some(provision_body()),
            "X-Broker-API-Originating-Identity",
        ),
    ]
}

/// NUL in an update: its context and identity.
fn update_nul_cases<'a>(identity: &'a str) -> Vec<Case<'a>> {
    let patch = "/v2/service_instances/i-2?accepts_incomplete=true";
    let patch_body = json!({"service_id": PG_SERVICE, "parameters": {"extensions": ["hstore"]}});
    vec![
        (
            Method::PATCH,
            patch.into(),
            None,
            Some(with(patch_body.clone(), "context", json!({"k": "\u{0}"}))),
            "`context.k`",
        ),
        (
            Method::PATCH,
            patch.into(),
            Some(identity),
            Some(patch_body),
            "X-Broker-API-Originating-Identity",
        ),
    ]
}

/// NUL in a bind: its app guid, bind resource, context, query and identity.
fn bind_nul_cases<'a>(identity: &'a str) -> Vec<Case<'a>> {
    let bind = "/v2/service_instances/i-1/service_bindings/b-1?accepts_incomplete=true";
    vec![
        (
            Method::PUT,
            bind.into(),
            None,
            Some(with(bind_body(), "app_guid", json!("app\u{0}"))),
            "`app_guid`",
        ),
        (
            Method::PUT,
            bind.into(),
            None,
            Some(with(
                bind_body(),
                "bind_resource",
                json!({"app_guid": "\u{0}"}),
            )),
            "`bind_resource.app_guid`",
        ),
        (
            Method::PUT,
            bind.into(),
            None,
            Some(with(bind_body(), "context", json!({"platform": "x\u{0}"}))),
            "`context.platform`",
        ),
        (
            Method::PUT,
            format!("{bind}&secret=s%00"),
            None,
            Some(bind_body()),
            "the query parameter `secret`",
        ),
        (
            Method::PUT,
            bind.into(),
            Some(identity),
            Some(bind_body()),
            "X-Broker-API-Originating-Identity",
        ),
    ]
}

/// NUL in berth's own endpoints: actions, presets, select, switchover, price check.
fn berth_api_nul_cases<'a>() -> Vec<Case<'a>> {
    vec![
        (
            Method::PUT,
            "/v2/service_instances/i-1/actions/credentials?webhook=%00".into(),
            None,
            None,
            "the query parameter `webhook`",
        ),
        (
            Method::POST,
            "/berth/v1/presets".into(),
            None,
            Some(json!({"name": "p", "instance_id": "i-1", "description": "d\u{0}"})),
            "`description`",
        ),
        (
            Method::POST,
            "/berth/v1/presets".into(),
            None,
            Some(json!({"name": "p", "instance_id": "i-1", "post_restore_sql": "select 1\u{0}"})),
            "`post_restore_sql`",
        ),
        (
            Method::POST,
            "/berth/v1/presets/p/lock".into(),
            None,
            Some(json!({"by": "me\u{0}"})),
            "`by`",
        ),
        (
            Method::POST,
            "/berth/v1/instances/i-1/select".into(),
            None,
            Some(json!({"preset": "p\u{0}"})),
            "`preset`",
        ),
        (
            Method::POST,
            "/berth/v1/instances/i-1/switchover".into(),
            None,
            Some(json!({"candidate": "m\u{0}"})),
            "`candidate`",
        ),
        (
            Method::GET,
            "/berth/v1/price-check?region=us%00".into(),
            None,
            None,
            "the query parameter `region`",
        ),
    ]
}

/// The backstop: any text Postgres refuses to store (a NUL the extractors did not see) is a 400, not a 500.
#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn text_postgres_cannot_store_maps_to_400(pool: PgPool) {
    for (sql, value) in [
        ("SELECT $1::text", "a\u{0}b"),
        ("SELECT $1::text::jsonb", r#"{"k": "\u0000"}"#),
    ] {
        let err = sqlx::query(sql)
            .bind(value)
            .execute(&pool)
            .await
            .expect_err("Postgres refuses it");
        let api = berth_api::ApiError::from(err);
        assert_eq!(api.status_code(), StatusCode::BAD_REQUEST, "{sql}: {api:?}");
        assert!(api.to_string().contains("cannot store"), "{api}");
    }
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn empty_app_guid_is_400(pool: PgPool) {
    let app = TestApp::new(pool);
    app.provisioned("i-1").await;
    let d = assert_unchanged!(
        app,
        app.bind("i-1", "b-1", &with(bind_body(), "app_guid", json!("")))
            .await
    )
    .assert_osb_error(StatusCode::BAD_REQUEST, None);
    assert!(d.contains("app_guid"), "{d}");
}

/// Every operation on an instance whose provision is running is 422 `ConcurrencyError` (GET stays 404); once
/// the provision failed, they are 422 saying so.
#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn operations_during_provisioning_are_concurrency_errors(pool: PgPool) {
    let app = TestApp::new(pool);
    let provision_op = app.provision("i-1", &provision_body()).await.operation();
    let patch_body = json!({"service_id": PG_SERVICE, "parameters": {"extensions": ["hstore"]}});
    let operations: Vec<(Method, &str, Option<Value>)> = vec![
        (
            Method::PATCH,
            "/v2/service_instances/i-1?accepts_incomplete=true",
            Some(patch_body),
        ),
        (
            Method::PUT,
            "/v2/service_instances/i-1/service_bindings/b-1?accepts_incomplete=true",
            Some(bind_body()),
        ),
        (
            Method::PUT,
            "/v2/service_instances/i-1/actions/credentials",
            None,
        ),
        (
            Method::PUT,
            "/v2/service_instances/i-1/actions/backups",
            None,
        ),
        (Method::POST, "/berth/v1/instances/i-1/backups", None),
        (Method::POST, "/berth/v1/instances/i-1/switchover", None),
        (
            Method::POST,
            "/berth/v1/presets",
            Some(json!({"name": "p", "instance_id": "i-1"})),
        ),
    ];
    let run = |expected_code: &'static str| {
        let app = &app;
        let operations = &operations;
        async move {
            for (method, uri, body) in operations {
                let d = send(app, method.clone(), uri, &[], body.as_ref())
                    .await
                    .assert_osb_error(StatusCode::UNPROCESSABLE_ENTITY, Some(expected_code));
                assert!(d.contains("i-1"), "{method} {uri}: {d}");
            }
            app.fetch_instance("i-1")
                .await
                .assert_osb_error(StatusCode::NOT_FOUND, None);
            app.fetch_binding("i-1", "b-1")
                .await
                .assert_osb_error(StatusCode::NOT_FOUND, None);
        }
    };
    assert_unchanged!(app, run("ConcurrencyError").await);
    app.set_running(&provision_op, Some("creating the database"))
        .await;
    assert_unchanged!(app, run("ConcurrencyError").await);
    app.finish(&provision_op, "failed", Some("no capacity"))
        .await;
    assert_unchanged!(app, run("UnprocessableEntity").await);
    let d = app
        .call(
            Method::PATCH,
            "/v2/service_instances/i-1?accepts_incomplete=true",
            Some(&json!({"service_id": PG_SERVICE, "parameters": {}})),
        )
        .await
        .assert_osb_error(StatusCode::UNPROCESSABLE_ENTITY, None);
    assert!(d.contains("failed"), "{d}");
    // Unknown instances are still 404.
    app.call(
        Method::PUT,
        "/v2/service_instances/nope/service_bindings/b-1?accepts_incomplete=true",
        Some(&bind_body()),
    )
    .await
    .assert_osb_error(StatusCode::NOT_FOUND, None);
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn delete_of_unknown_is_410_before_async_required(pool: PgPool) {
    let app = TestApp::new(pool);
    app.provisioned("i-1").await;
    let q = format!("service_id={PG_SERVICE}&plan_id={PG_SHARED}");
    assert_unchanged!(app, {
        for uri in [
            format!("/v2/service_instances/nope?{q}"),
            format!("/v2/service_instances/nope/service_bindings/b-0?{q}"),
            format!("/v2/service_instances/i-1/service_bindings/b-0?{q}"),
        ] {
            let r = app.call(Method::DELETE, &uri, None).await;
            assert_eq!(r.status, StatusCode::GONE, "DELETE {uri}: {r:?}");
            assert_eq!(r.body, json!({}));
        }
    });
    // What exists on a plan that is not synchronous still needs accepts_incomplete.
    const PG_DEDICATED: &str = "5f0c2d8e-9b41-4c7a-a6e3-2d7f1b8c4e90";
    let mut body = provision_body();
    body["plan_id"] = json!(PG_DEDICATED);
    let op = app.provision("d-1", &body).await.operation();
    app.finish(&op, "succeeded", None).await;
    let uri = format!("/v2/service_instances/d-1?service_id={PG_SERVICE}&plan_id={PG_DEDICATED}");
    assert_unchanged!(app, app.call(Method::DELETE, &uri, None).await)
        .assert_osb_error(StatusCode::UNPROCESSABLE_ENTITY, Some("AsyncRequired"));
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn originating_identity_is_capped_and_parsed_leniently(pool: PgPool) {
    let app = TestApp::new(pool);
    let uri = "/v2/service_instances/i-1?accepts_incomplete=true";
    let huge = format!("cloudfoundry {}", "A".repeat(100 * 1024));
    let d = assert_unchanged!(
        app,
        send(
            &app,
            Method::PUT,
            uri,
            &[(IDENTITY, &huge)],
            Some(&provision_body())
        )
        .await
    )
    .assert_osb_error(StatusCode::BAD_REQUEST, None);
    assert!(
        d.contains("X-Broker-API-Originating-Identity") && d.contains("4096"),
        "{d}"
    );
    let just_over = format!("k {}", "x".repeat(4095));
    send(
        &app,
        Method::PUT,
        uri,
        &[(IDENTITY, &just_over)],
        Some(&provision_body()),
    )
    .await
    .assert_osb_error(StatusCode::BAD_REQUEST, None);
    // Within the cap, a value that is not base64 JSON is kept raw.
    let garbage = format!("kubernetes {}", "!".repeat(3000));
    let op = send(
        &app,
        Method::PUT,
        uri,
        &[(IDENTITY, &garbage)],
        Some(&provision_body()),
    )
    .await
    .operation();
    let stored: Value = sqlx::Row::get(&app.task(&op).await, "originating_identity");
    assert_eq!(
        stored,
        json!({"platform": "kubernetes", "raw": "!".repeat(3000)})
    );
}
