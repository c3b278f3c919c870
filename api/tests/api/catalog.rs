use axum::{
    body::Body,
    http::{Method, Request, StatusCode},
};
use serde_json::Value;
use sqlx::PgPool;

use crate::helpers::{PG_SERVICE, TestApp};

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn catalog_is_the_rendered_catalog(pool: PgPool) {
    let app = TestApp::new(pool);
    let res = app.call(Method::GET, "/v2/catalog", None).await;
    assert_eq!(res.status, StatusCode::OK);
    assert_eq!(res.headers["content-type"], "application/json");
    let services = res.body["services"].as_array().unwrap();
    let pg = services
        .iter()
        .find(|s| s["id"] == PG_SERVICE)
        .expect("postgres in the catalog");
    assert_eq!(pg["name"], "postgres");
    assert!(
        !res.text.contains("\"engine\""),
        "berth-only fields are not published"
    );
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn health_needs_no_auth_and_reports_the_database(pool: PgPool) {
    let app = TestApp::new(pool.clone());
    let res = app
        .send(Request::get("/health").body(Body::empty()).unwrap())
        .await;
    assert_eq!(res.status, StatusCode::OK);
    assert_eq!(res.body, serde_json::json!({"status": "ok"}));

    pool.close().await;
    let res = app
        .send(Request::get("/health").body(Body::empty()).unwrap())
        .await;
    res.assert_osb_error(StatusCode::SERVICE_UNAVAILABLE, None);
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn database_failure_is_a_generic_500(pool: PgPool) {
    let app = TestApp::new(pool.clone());
    pool.close().await;
    let res = app
        .provision("i-1", &crate::helpers::provision_body())
        .await;
    let description = res.assert_osb_error(StatusCode::INTERNAL_SERVER_ERROR, None);
    assert!(
        !description.to_lowercase().contains("pool"),
        "{description}"
    );
    assert!(!description.contains("sqlx"), "{description}");
    assert!(matches!(res.body, Value::Object(_)));
}
