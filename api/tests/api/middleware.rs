use axum::{
    body::Body,
    http::{Method, Request, StatusCode},
};
use base64::{Engine, engine::general_purpose::STANDARD};
use sqlx::PgPool;

use crate::helpers::{TestApp, USER};

fn catalog_with(auth: Option<&str>, version: Option<&str>) -> Request<Body> {
    let mut builder = Request::get("/v2/catalog");
    if let Some(auth) = auth {
        builder = builder.header("authorization", auth);
    }
    if let Some(version) = version {
        builder = builder.header("x-broker-api-version", version);
    }
    builder.body(Body::empty()).unwrap()
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn missing_or_wrong_credentials_are_401_with_a_challenge(pool: PgPool) {
    let app = TestApp::new(pool);
    let wrong = format!("Basic {}", STANDARD.encode(format!("{USER}:nope")));
    for auth in [
        None,
        Some(wrong.as_str()),
        Some("Bearer token"),
        Some("Basic !!!"),
    ] {
        let res = app.send(catalog_with(auth, Some("2.17"))).await;
        res.assert_osb_error(StatusCode::UNAUTHORIZED, Some("Unauthorized"));
        assert_eq!(res.headers["www-authenticate"], r#"Basic realm="berth""#);
    }
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn version_header_must_be_2_13_or_later(pool: PgPool) {
    let app = TestApp::new(pool);
    let auth = TestApp::auth_header();
    let res = app.send(catalog_with(Some(&auth), None)).await;
    let description =
        res.assert_osb_error(StatusCode::PRECONDITION_FAILED, Some("PreconditionFailed"));
    assert!(
        description.contains("X-Broker-API-Version"),
        "{description}"
    );
    for bad in ["2.12", "1.17", "3.0", "latest", ""] {
        let res = app.send(catalog_with(Some(&auth), Some(bad))).await;
        res.assert_osb_error(StatusCode::PRECONDITION_FAILED, Some("PreconditionFailed"));
    }
    for good in ["2.13", "2.14", "2.16", "2.17", "2.18"] {
        let res = app.send(catalog_with(Some(&auth), Some(good))).await;
        assert_eq!(res.status, StatusCode::OK, "{good}: {res:?}");
    }
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn request_identity_is_echoed_on_every_response(pool: PgPool) {
    let app = TestApp::new(pool);
    for request in [
        TestApp::request(Method::GET, "/v2/catalog"),
        Request::get("/v2/catalog"),
        TestApp::request(Method::GET, "/v2/nowhere"),
        Request::get("/health"),
    ] {
        let res = app
            .send(
                request
                    .header("x-broker-api-request-identity", "req-123")
                    .body(Body::empty())
                    .unwrap(),
            )
            .await;
        assert_eq!(
            res.headers["x-broker-api-request-identity"], "req-123",
            "{res:?}"
        );
    }
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn unknown_paths_and_methods_are_osb_errors(pool: PgPool) {
    let app = TestApp::new(pool);
    app.call(Method::GET, "/v2/nowhere", None)
        .await
        .assert_osb_error(StatusCode::NOT_FOUND, Some("NotFound"));
    app.call(Method::GET, "/", None)
        .await
        .assert_osb_error(StatusCode::NOT_FOUND, Some("NotFound"));
    app.call(Method::POST, "/v2/catalog", None)
        .await
        .assert_osb_error(StatusCode::METHOD_NOT_ALLOWED, None);
    app.call(Method::POST, "/v2/service_instances/i-1", None)
        .await
        .assert_osb_error(StatusCode::METHOD_NOT_ALLOWED, None);
    app.call(
        Method::DELETE,
        "/v2/service_instances/i-1/last_operation",
        None,
    )
    .await
    .assert_osb_error(StatusCode::METHOD_NOT_ALLOWED, None);
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn unauthenticated_requests_learn_nothing(pool: PgPool) {
    let app = TestApp::new(pool);
    for (method, uri) in [
        (Method::PUT, "/v2/service_instances/i-1"),
        (Method::POST, "/v2/catalog"),
    ] {
        let request = Request::builder()
            .method(method)
            .uri(uri)
            .header("x-broker-api-version", "2.17")
            .body(Body::empty())
            .unwrap();
        let res = app.send(request).await;
        res.assert_osb_error(StatusCode::UNAUTHORIZED, Some("Unauthorized"));
    }
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn a_request_without_a_usable_id_gets_one_made_up_and_its_tasks_keep_it(pool: PgPool) {
    let app = TestApp::new(pool.clone());
    for sent in [None, Some("has spaces"), Some(&*"x".repeat(129))] {
        let mut request = TestApp::request(Method::GET, "/v2/catalog");
        if let Some(sent) = sent {
            request = request.header("x-broker-api-request-identity", sent);
        }
        let res = app.send(request.body(Body::empty()).unwrap()).await;
        let made_up = res.headers["x-broker-api-request-identity"]
            .to_str()
            .unwrap();
        assert!(
            uuid::Uuid::parse_str(made_up).is_ok(),
            "{sent:?}: {made_up}"
        );
    }

    // A provision's task is stored with the request's id.
    let request = TestApp::request(
        Method::PUT,
        "/v2/service_instances/i-req?accepts_incomplete=true",
    )
    .header("x-broker-api-request-identity", "req-provision-1")
    .header("content-type", "application/json")
    .body(Body::from(crate::helpers::provision_body().to_string()))
    .unwrap();
    let res = app.send(request).await;
    let operation = res.operation();
    let stored: Option<String> =
        sqlx::query_scalar("SELECT request_id FROM tasks WHERE id = $1::uuid")
            .bind(&operation)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(stored.as_deref(), Some("req-provision-1"));
}
