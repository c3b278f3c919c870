//! `GET /berth/v1/instances/{id}/events`: the audit trail over HTTP (its rows and outcomes are the triggers' work,
//! tested in broker/tests/events.rs).

use axum::{
    body::Body,
    http::{Method, StatusCode},
};
use base64::{Engine, engine::general_purpose::STANDARD};
use serde_json::json;
use sqlx::PgPool;

use crate::helpers::{TestApp, bind_body, provision_body};

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn the_trail_lists_who_asked_newest_first_a_page_at_a_time(pool: PgPool) {
    let app = TestApp::new(pool);
    let identity = STANDARD.encode(br#"{"user_id":"u-9","email":"private@example.com"}"#);
    let request = TestApp::request(
        Method::PUT,
        "/v2/service_instances/i-ev?accepts_incomplete=true",
    )
    .header("x-broker-api-request-identity", "req-ev-1")
    .header(
        "x-broker-api-originating-identity",
        format!("cloudfoundry {identity}"),
    )
    .header("content-type", "application/json")
    .body(Body::from(provision_body().to_string()))
    .unwrap();
    let provision = app.send(request).await.operation();
    app.finish(&provision, "succeeded", None).await;
    let bind = app.bind("i-ev", "b-ev", &bind_body()).await.operation();
    app.finish(&bind, "failed", Some("the role could not be made"))
        .await;

    let res = app
        .call(Method::GET, "/berth/v1/instances/i-ev/events", None)
        .await;
    assert_eq!(res.status, StatusCode::OK, "{res:?}");
    let events = res.body["events"].as_array().unwrap();
    assert_eq!(events.len(), 2);
    assert_eq!(events[0]["action"], "bind");
    assert_eq!(events[0]["binding_id"], "b-ev");
    assert_eq!(events[0]["outcome"], "failed");
    assert_eq!(events[0]["error"], "the role could not be made");
    assert_eq!(events[1]["action"], "provision");
    assert_eq!(events[1]["task_id"], provision.as_str());
    assert_eq!(events[1]["request_id"], "req-ev-1");
    assert_eq!(
        events[1]["actor"],
        json!({"platform": "cloudfoundry", "user_id": "u-9"})
    );
    assert_eq!(events[1]["outcome"], "succeeded");
    assert!(!res.text.contains("private@example.com"), "{}", res.text);

    let first = app
        .call(Method::GET, "/berth/v1/instances/i-ev/events?limit=1", None)
        .await;
    assert_eq!(first.body["events"].as_array().unwrap().len(), 1);
    let next = first.body["next"].as_i64().expect("next");
    let second = app
        .call(
            Method::GET,
            &format!("/berth/v1/instances/i-ev/events?limit=1&before={next}"),
            None,
        )
        .await;
    assert_eq!(second.body["events"][0]["action"], "provision");
    assert!(second.body.get("next").is_none(), "{:?}", second.body);
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn bad_pages_unknown_instances_and_missing_credentials_are_refused(pool: PgPool) {
    let app = TestApp::new(pool);
    app.call(Method::GET, "/berth/v1/instances/nobody/events", None)
        .await
        .assert_osb_error(StatusCode::NOT_FOUND, Some("NotFound"));
    app.provision("i-page", &provision_body()).await.operation();
    for bad in ["limit=0", "limit=501", "limit=x", "before=y"] {
        app.call(
            Method::GET,
            &format!("/berth/v1/instances/i-page/events?{bad}"),
            None,
        )
        .await
        .assert_osb_error(StatusCode::BAD_REQUEST, None);
    }
    let res = app
        .send(
            axum::http::Request::get("/berth/v1/instances/i-page/events")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(res.status, StatusCode::UNAUTHORIZED);
}
