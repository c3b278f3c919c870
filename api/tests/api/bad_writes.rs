//! Refused writes on every write endpoint: missing credentials or version, and bodies that are not a valid
//! request. Each is a 4xx in the OSB shape and leaves every table as it was.

use axum::{
    body::Body,
    http::{Method, Request, StatusCode},
};
use serde_json::{Value, json};
use sqlx::PgPool;

use crate::{
    assert_unchanged,
    helpers::{MAX_BODY, TestApp, bind_body, provision_body},
};

/// (method, uri, a valid body) of each write: a new instance, an update of `i-2` and a new binding of `i-1`
/// (both provisioned), independent of each other so all three can be accepted at the end.
fn writes() -> Vec<(Method, &'static str, Value)> {
    vec![
        (
            Method::PUT,
            "/v2/service_instances/i-new?accepts_incomplete=true",
            provision_body(),
        ),
        (
            Method::PATCH,
            "/v2/service_instances/i-2?accepts_incomplete=true",
            json!({"service_id": provision_body()["service_id"], "parameters": {"extensions": ["hstore"]}}),
        ),
        (
            Method::PUT,
            "/v2/service_instances/i-1/service_bindings/b-1?accepts_incomplete=true",
            bind_body(),
        ),
    ]
}

fn raw(
    method: &Method,
    uri: &str,
    auth: Option<String>,
    version: Option<&str>,
    content_type: &str,
    body: Vec<u8>,
) -> Request<Body> {
    let mut builder = Request::builder()
        .method(method.clone())
        .uri(uri)
        .header("content-type", content_type);
    if let Some(auth) = auth {
        builder = builder.header("authorization", auth);
    }
    if let Some(version) = version {
        builder = builder.header("x-broker-api-version", version);
    }
    builder.body(Body::from(body)).unwrap()
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn writes_without_credentials_or_version_write_nothing(pool: PgPool) {
    let app = TestApp::new(pool);
    app.provisioned("i-1").await;
    app.provisioned("i-2").await;
    let deletes = [
        "/v2/service_instances/i-1?accepts_incomplete=true&service_id=x&plan_id=y",
        "/v2/service_instances/i-1/service_bindings/b-0?accepts_incomplete=true&service_id=x&plan_id=y",
    ];
    assert_unchanged!(app, {
        for (method, uri, body) in writes() {
            let body = body.to_string().into_bytes();
            for (auth, how) in [
                (None, "without credentials"),
                (
                    Some("Basic d3Jvbmc6d3Jvbmc=".into()),
                    "with wrong credentials",
                ),
            ] {
                let r = app
                    .send(raw(
                        &method,
                        uri,
                        auth,
                        Some("2.17"),
                        "application/json",
                        body.clone(),
                    ))
                    .await;
                assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{method} {uri} {how}");
            }
            for version in [None, Some("2.12"), Some("1.0")] {
                let d = app
                    .send(raw(
                        &method,
                        uri,
                        Some(TestApp::auth_header()),
                        version,
                        "application/json",
                        body.clone(),
                    ))
                    .await
                    .assert_osb_error(StatusCode::PRECONDITION_FAILED, None);
                assert!(
                    d.contains("X-Broker-API-Version"),
                    "{method} {uri} {version:?}: {d}"
                );
            }
        }
        for uri in deletes {
            let r = app
                .send(raw(
                    &Method::DELETE,
                    uri,
                    None,
                    Some("2.17"),
                    "application/json",
                    Vec::new(),
                ))
                .await;
            assert_eq!(r.status, StatusCode::UNAUTHORIZED, "DELETE {uri}");
            app.send(raw(
                &Method::DELETE,
                uri,
                Some(TestApp::auth_header()),
                None,
                "application/json",
                Vec::new(),
            ))
            .await
            .assert_osb_error(StatusCode::PRECONDITION_FAILED, None);
        }
    });
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn bad_bodies_on_every_write_write_nothing(pool: PgPool) {
    let app = TestApp::new(pool);
    app.provisioned("i-1").await;
    app.provisioned("i-2").await;
    let send = |method: &Method, uri: &str, content_type: &str, body: Vec<u8>| {
        app.send(raw(
            method,
            uri,
            Some(TestApp::auth_header()),
            Some("2.17"),
            content_type,
            body,
        ))
    };
    assert_unchanged!(app, {
        for (method, uri, valid) in writes() {
            for body in [
                &b"{\"service_id\": "[..],
                b"",
                b"[1,2]",
                b"{} trailing",
                b"null",
            ] {
                send(&method, uri, "application/json", body.to_vec())
                    .await
                    .assert_osb_error(StatusCode::BAD_REQUEST, None);
            }
            // A field of the wrong type is named.
            for field in ["service_id", "plan_id", "parameters"] {
                let mut body = valid.clone();
                body[field] = json!(42);
                let d = send(
                    &method,
                    uri,
                    "application/json",
                    body.to_string().into_bytes(),
                )
                .await
                .assert_osb_error(StatusCode::BAD_REQUEST, None);
                assert!(d.contains(field), "{method} {uri} {field}: {d}");
            }
            let mut big = valid.clone();
            big["parameters"] = json!({"padding": "x".repeat(MAX_BODY)});
            send(
                &method,
                uri,
                "application/json",
                big.to_string().into_bytes(),
            )
            .await
            .assert_osb_error(StatusCode::PAYLOAD_TOO_LARGE, Some("PayloadTooLarge"));
            send(&method, uri, "text/plain", valid.to_string().into_bytes())
                .await
                .assert_osb_error(StatusCode::UNSUPPORTED_MEDIA_TYPE, None);
            // Parameters the plan's schema does not allow.
            let mut body = valid.clone();
            body["parameters"] = json!({"no_such_parameter": true});
            let d = send(
                &method,
                uri,
                "application/json",
                body.to_string().into_bytes(),
            )
            .await
            .assert_osb_error(StatusCode::BAD_REQUEST, None);
            assert!(d.contains("no_such_parameter"), "{method} {uri}: {d}");
        }
    });
    // The same valid bodies are accepted: the refusals above were about the body alone.
    for (method, uri, valid) in writes() {
        let r = send(
            &method,
            uri,
            "application/json",
            valid.to_string().into_bytes(),
        )
        .await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{method} {uri}: {}", r.text);
    }
}
