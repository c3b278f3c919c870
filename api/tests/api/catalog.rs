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
    // The v2.17 fields platforms rely on, for the shipped postgres service and its plans.
    assert_eq!(pg["instances_retrievable"], true, "{pg}");
    assert_eq!(pg["bindings_retrievable"], true, "{pg}");
    assert!(pg["plan_updateable"].is_boolean(), "{pg}");
    let plans = pg["plans"].as_array().unwrap();
    let shared = plans
        .iter()
        .find(|p| p["name"] == "shared")
        .expect("plan shared");
    assert!(
        shared["maximum_polling_duration"]
            .as_u64()
            .is_some_and(|s| s > 0),
        "{shared}"
    );
    assert!(
        shared["maintenance_info"]["version"].is_string(),
        "{shared}"
    );
    let schemas = &shared["schemas"];
    for (resource, action) in [
        ("service_instance", "create"),
        ("service_instance", "update"),
        ("service_binding", "create"),
    ] {
        let schema = &schemas[resource][action]["parameters"];
        assert!(
            schema.is_object(),
            "schemas.{resource}.{action}.parameters: {schemas}"
        );
    }
    assert!(
        schemas["service_instance"]["create"]["parameters"]["properties"]["extensions"].is_object(),
        "the extensions parameter is published: {schemas}"
    );
    assert!(
        schemas["service_binding"]["create"]["parameters"]["properties"]["access"].is_object(),
        "the access parameter is published: {schemas}"
    );
    // Every plan of every service has an id, a name and a description; ids are unique.
    let mut ids = std::collections::HashSet::new();
    for service in services {
        assert!(
            ids.insert(service["id"].as_str().unwrap().to_string()),
            "{service}"
        );
        for plan in service["plans"].as_array().unwrap() {
            assert!(
                plan["name"].is_string() && plan["description"].is_string(),
                "{plan}"
            );
            assert!(
                ids.insert(plan["id"].as_str().unwrap().to_string()),
                "duplicate id {plan}"
            );
        }
    }
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
async fn unreachable_database_is_a_generic_503(pool: PgPool) {
    let app = TestApp::new(pool.clone());
    pool.close().await;
    let res = app
        .provision("i-1", &crate::helpers::provision_body())
        .await;
    // A database the broker cannot reach is 503 (retry later), and the answer names nothing internal.
    let description =
        res.assert_osb_error(StatusCode::SERVICE_UNAVAILABLE, Some("ServiceUnavailable"));
    assert!(
        !description.to_lowercase().contains("pool"),
        "{description}"
    );
    assert!(!description.contains("sqlx"), "{description}");
    assert!(matches!(res.body, Value::Object(_)));
}
