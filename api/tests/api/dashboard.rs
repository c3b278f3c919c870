//! `dashboard_url` and the dashboard pages in process: where the link comes from, what it opens, what it does
//! not open (changed, expired, a gone instance), the overview behind the broker's credentials, and no secret
//! on a page (the browser test in the e2e suite checks the rendered pages of real instances).

use std::time::Duration;

use axum::{
    body::Body,
    http::{Method, Request, StatusCode},
};
use berth_api::dashboard::DashboardLinks;
use serde_json::{Value, json};
use sqlx::PgPool;

use crate::helpers::{TestApp, TestResponse, bind_body, provision_body};

const HOST: &str = "broker.test:8443";

/// A request with the broker's credentials, the OSB version and a `Host`.
async fn call_with_host(
    app: &TestApp,
    method: Method,
    uri: &str,
    body: Option<&Value>,
) -> TestResponse {
    app.send_with_body(TestApp::request(method, uri).header("host", HOST), body)
        .await
}

/// A browser's GET: no credentials.
async fn open(app: &TestApp, url: &str) -> TestResponse {
    let path = url.split_once(HOST).map_or(url, |(_, path)| path);
    app.send(Request::get(path).body(Body::empty()).unwrap())
        .await
}

fn link(body: &Value) -> String {
    body["dashboard_url"]
        .as_str()
        .unwrap_or_else(|| panic!("no dashboard_url in {body}"))
        .to_string()
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn provision_and_fetch_answer_a_link_that_opens_the_page_until_the_instance_goes(
    pool: PgPool,
) {
    let app = TestApp::new(pool);
    let uri = "/v2/service_instances/i-1?accepts_incomplete=true";
    let accepted = call_with_host(&app, Method::PUT, uri, Some(&provision_body())).await;
    assert_eq!(accepted.status, StatusCode::ACCEPTED, "{}", accepted.text);
    let operation = accepted.operation();
    let first = link(&accepted.body);
    assert!(
        first.starts_with(&format!("http://{HOST}/dashboard/instances/i-1?expires=")),
        "{first}"
    );
    // While the provision runs the page shows it, with its progress.
    app.set_running(&operation, Some("creating the database"))
        .await;
    let page = open(&app, &first).await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.text);
    assert_eq!(page.headers["content-type"], "text/html; charset=utf-8");
    assert_eq!(page.headers["cache-control"], "no-store");
    assert_eq!(page.headers["referrer-policy"], "no-referrer");
    assert!(page.text.contains("provisioning") && page.text.contains("creating the database"));

    // The same request again: 202 with the operation and a link; once done, 200 with one.
    let again = call_with_host(&app, Method::PUT, uri, Some(&provision_body())).await;
    assert_eq!(
        (again.status, again.operation()),
        (StatusCode::ACCEPTED, operation.clone())
    );
    link(&again.body);
    app.finish(&operation, "succeeded", None).await;
    let done = call_with_host(&app, Method::PUT, uri, Some(&provision_body())).await;
    assert_eq!(done.status, StatusCode::OK);
    link(&done.body);

    // GET instance: a fresh link; the page shows the instance ready, with its binding and no credential.
    let fetched = call_with_host(&app, Method::GET, "/v2/service_instances/i-1", None).await;
    assert_eq!(fetched.status, StatusCode::OK);
    let url = link(&fetched.body);
    let bind = app.bind("i-1", "b-1", &bind_body()).await.operation();
    app.complete_bind(
        &bind,
        "b-1",
        &json!({"DATABASE_URL": "postgres://u:binding-pass-123@db.example/d"}),
    )
    .await;
    let page = open(&app, &url).await;
    assert_eq!(page.status, StatusCode::OK);
    for expected in ["shared", "ready", "b-1", "read-only"] {
        assert!(
            page.text.contains(expected),
            "{expected} missing:\n{}",
            page.text
        );
    }
    assert!(!page.text.contains("binding-pass-123"));
    // The audit trail (written by the triggers on tasks) has the provision.
    assert!(page.text.contains("id=\"events\""), "{}", page.text);
    assert!(page.text.contains("<td>provision</td>"), "{}", page.text);

    // Gone with the instance (and not back for an instance provisioned again under the same id).
    let deprovision = app.deprovision("i-1").await.operation();
    app.complete_deprovision(&deprovision, "i-1").await;
    let gone = open(&app, &url).await;
    assert_eq!(gone.status, StatusCode::GONE);
    assert!(gone.text.contains("This instance is gone"));
    app.provisioned("i-1").await;
    assert_eq!(open(&app, &url).await.status, StatusCode::FORBIDDEN);
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn changed_expired_and_incomplete_links_are_refused(pool: PgPool) {
    let app = TestApp::new(pool);
    app.provisioned("i-1").await;
    let url = link(
        &call_with_host(&app, Method::GET, "/v2/service_instances/i-1", None)
            .await
            .body,
    );
    let (base, query) = url.split_once('?').unwrap();
    let expires: i64 = query
        .strip_prefix("expires=")
        .and_then(|q| q.split('&').next())
        .unwrap()
        .parse()
        .unwrap();
    let sig = query.split("sig=").nth(1).unwrap();
    let created: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT created_at FROM service_instances WHERE id = 'i-1'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    let past = broker::dashboard_link::sign(
        &app.cipher,
        "i-1",
        created,
        chrono::Utc::now().timestamp() - 1,
    );
    for (bad, title) in [
        (
            format!("{base}?expires={}&sig={sig}", expires + 1),
            "This link is not valid",
        ),
        (
            format!("{base}?expires={expires}&sig=AAAA{sig}"),
            "This link is not valid",
        ),
        (
            base.replace("i-1", "i-2") + &format!("?expires={expires}&sig={sig}"),
            "This instance is gone",
        ),
        (base.to_string(), "This link is not valid"),
        (
            format!("{base}?expires=soon&sig={sig}"),
            "This link is not valid",
        ),
        (
            format!("{base}?expires={}&sig={}", past.expires, past.sig),
            "This link has expired",
        ),
    ] {
        let page = open(&app, &bad).await;
        let status = if title.contains("gone") {
            StatusCode::GONE
        } else {
            StatusCode::FORBIDDEN
        };
        assert_eq!(page.status, status, "{bad}: {}", page.text);
        assert!(page.text.contains(title), "{bad}: {}", page.text);
    }
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn the_public_url_and_ttl_settings_make_the_link(pool: PgPool) {
    let app = TestApp::with_dashboard(
        pool,
        DashboardLinks {
            public_url: Some("https://broker.example.com/osb/".into()),
            ttl: Duration::from_secs(3600),
            https: true,
        },
    );
    let accepted = app.provision("i-1", &provision_body()).await;
    let url = link(&accepted.body);
    let prefix = "https://broker.example.com/osb/dashboard/instances/i-1?expires=";
    assert!(url.starts_with(prefix), "{url}");
    let expires: i64 = url[prefix.len()..]
        .split('&')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let ttl = expires - chrono::Utc::now().timestamp();
    assert!((3590..=3600).contains(&ttl), "{ttl}");

    // Without a public URL, a Host that names a user is not made into a link.
    let plain = TestApp::new(app.pool.clone());
    let fetched = plain
        .send_with_body(
            TestApp::request(Method::GET, "/v2/service_instances/i-1").header("host", "evil@x"),
            None,
        )
        .await;
    assert!(
        fetched.body.get("dashboard_url").is_none(),
        "{}",
        fetched.text
    );
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn the_operator_overview_needs_credentials_and_shows_plans_queue_and_failures(pool: PgPool) {
    let app = TestApp::new(pool);
    app.provisioned("i-1").await;
    let op = app.provision("i-2", &provision_body()).await.operation();
    app.finish(
        &op,
        "failed",
        Some("connecting to postgres://admin:hunter2-secret@10.0.0.9/db: refused"),
    )
    .await;
    app.provision("i-3", &provision_body()).await;

    let anonymous = app
        .send(
            Request::get("/berth/v1/dashboard")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED);
    let page = app.call(Method::GET, "/berth/v1/dashboard", None).await;
    assert_eq!(page.status, StatusCode::OK);
    for expected in [
        "Instances per plan and state (3)",
        "provision failed",
        "provisioning",
        "ready",
        "admin:***@10.0.0.9",
    ] {
        assert!(
            page.text.contains(expected),
            "{expected} missing:\n{}",
            page.text
        );
    }
    assert!(!page.text.contains("hunter2-secret"));
}
