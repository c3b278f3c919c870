//! A client that never sends `accepts_incomplete` (an OSB 2.13 platform, a script): the whole `shared` lifecycle
//! answered synchronously, and the timeout path a platform cleans up after.

use std::time::Duration;

use berth_tests::{PG_SERVICE, PG_SHARED, Stack};
use reqwest::Method;
use serde_json::{Value, json};
use sqlx::{Connection, PgConnection};

/// A request as a 2.13 platform sends it: that version, never `accepts_incomplete`.
fn request_213(stack: &Stack, method: Method, path: &str) -> reqwest::RequestBuilder {
    stack
        .http
        .request(method, format!("{}{path}", stack.base_url))
        .basic_auth(&stack.username, Some(&stack.password))
        .header("X-Broker-API-Version", "2.13")
}

fn shared_ids() -> (&'static str, &'static str) {
    (PG_SERVICE, PG_SHARED)
}

fn provision_body() -> Value {
    let (service, plan) = shared_ids();
    json!({"service_id": service, "plan_id": plan, "organization_guid": "org", "space_guid": "space"})
}

fn bind_body() -> Value {
    let (service, plan) = shared_ids();
    json!({"service_id": service, "plan_id": plan, "app_guid": "app-1"})
}

fn delete_query() -> String {
    let (service, plan) = shared_ids();
    format!("service_id={service}&plan_id={plan}")
}

async fn roles_like(stack: &Stack, pattern: &str) -> i64 {
    let mut admin = stack.admin().await.unwrap();
    sqlx::query_scalar("SELECT count(*) FROM pg_roles WHERE rolname LIKE $1")
        .bind(pattern)
        .fetch_one(&mut admin)
        .await
        .unwrap()
}

async fn database_exists(stack: &Stack, instance: &str) -> bool {
    let database = broker::names::instance_database(&stack.name_prefix, instance);
    let mut admin = stack.admin().await.unwrap();
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
        .bind(&database)
        .fetch_one(&mut admin)
        .await
        .unwrap()
}

/// Sends a synchronous DELETE until it succeeds (200 or 410), as a platform's orphan mitigation does; returns the
/// statuses seen.
async fn delete_until_done(stack: &Stack, path: &str) -> Vec<u16> {
    let mut seen = Vec::new();
    for _ in 0..30 {
        let (status, body) = stack
            .send(request_213(
                stack,
                Method::DELETE,
                &format!("{path}?{}", delete_query()),
            ))
            .await
            .unwrap();
        seen.push(status);
        match status {
            200 | 410 => return seen,
            504 => assert_eq!(body["error"], "OperationTimedOut", "{body}"),
            other => panic!("DELETE {path}: {other} {body}\n{}", stack.logs()),
        }
    }
    panic!("DELETE {path} never succeeded: {seen:?}\n{}", stack.logs());
}

#[tokio::test]
async fn a_2_13_client_runs_the_shared_lifecycle_without_accepts_incomplete() {
    let stack = Stack::start().await.unwrap();
    let instance = uuid::Uuid::new_v4().to_string();
    let path = format!("/v2/service_instances/{instance}");

    let (status, body) = stack
        .send(request_213(&stack, Method::PUT, &path).json(&provision_body()))
        .await
        .unwrap();
    assert_created_with_a_dashboard_link(&stack, &instance, status, &body);
    assert!(database_exists(&stack, &instance).await);
    // The identical provision again: 200.
    let (status, _) = stack
        .send(request_213(&stack, Method::PUT, &path).json(&provision_body()))
        .await
        .unwrap();
    assert_eq!(status, 200);

    let (service, _) = shared_ids();
    let update = json!({"service_id": service, "parameters": {"extensions": ["citext"]}});
    let (status, body) = stack
        .send(request_213(&stack, Method::PATCH, &path).json(&update))
        .await
        .unwrap();
    assert_eq!((status, &body), (200, &json!({})), "{}", stack.logs());

    let binding_path = format!("{path}/service_bindings/b-1");
    let (status, body) = stack
        .send(request_213(&stack, Method::PUT, &binding_path).json(&bind_body()))
        .await
        .unwrap();
    assert_eq!(status, 201, "{body}\n{}", stack.logs());
    let url = body["credentials"]["DATABASE_URL"]
        .as_str()
        .expect("credentials in the 201")
        .to_string();
    let mut app = PgConnection::connect(&url)
        .await
        .expect("the binding's credentials log in");
    let citext: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citext')")
            .fetch_one(&mut app)
            .await
            .unwrap();
    assert!(citext, "the synchronous update was applied before its 200");
    app.close().await.unwrap();
    let (status, again) = stack
        .send(request_213(&stack, Method::PUT, &binding_path).json(&bind_body()))
        .await
        .unwrap();
    assert_eq!((status, &again["credentials"]), (200, &body["credentials"]));

    let (status, body) = stack
        .send(request_213(
            &stack,
            Method::DELETE,
            &format!("{binding_path}?{}", delete_query()),
        ))
        .await
        .unwrap();
    assert_eq!((status, &body), (200, &json!({})), "{}", stack.logs());
    assert!(
        PgConnection::connect(&url).await.is_err(),
        "an unbound role still logs in"
    );

    let (status, body) = stack
        .send(request_213(
            &stack,
            Method::DELETE,
            &format!("{path}?{}", delete_query()),
        ))
        .await
        .unwrap();
    assert_eq!((status, &body), (200, &json!({})), "{}", stack.logs());
    assert!(!database_exists(&stack, &instance).await);
    assert_eq!(
        roles_like(&stack, &format!("{}%", stack.name_prefix)).await,
        0
    );
    stack.stop().await;
}

/// No worker runs: a synchronous bind and a synchronous provision cannot finish within `SYNC_WAIT_SECS` and are
/// answered 504 (a 5xx, so a platform cleans up). The platform's unbind and deprovision are accepted while those
/// tasks are still queued; once a worker runs, they succeed and nothing is left on the shared server.
#[tokio::test]
async fn a_synchronous_bind_or_provision_that_times_out_is_cleaned_up() {
    let mut stack = Stack::start_with(vec![("SYNC_WAIT_SECS", "2".into())])
        .await
        .unwrap();
    // An instance to bind to, made while the worker runs.
    let instance = uuid::Uuid::new_v4().to_string();
    let path = format!("/v2/service_instances/{instance}");
    let (status, body) = stack
        .send(
            stack
                .request(Method::PUT, &format!("{path}?accepts_incomplete=true"))
                .json(&provision_body()),
        )
        .await
        .unwrap();
    assert_eq!(status, 202, "{body}");
    let (status, last) = stack
        .wait_operation(&format!("{path}/last_operation"), Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(
        (status, last["state"].as_str()),
        (200, Some("succeeded")),
        "{last}"
    );

    stack.kill_worker().await;
    let binding_path = format!("{path}/service_bindings/b-1");
    assert_times_out(
        &stack,
        request_213(&stack, Method::PUT, &binding_path).json(&bind_body()),
    )
    .await;
    let orphan = uuid::Uuid::new_v4().to_string();
    let orphan_path = format!("/v2/service_instances/{orphan}");
    assert_times_out(
        &stack,
        request_213(&stack, Method::PUT, &orphan_path).json(&provision_body()),
    )
    .await;

    // Orphan mitigation starts while no worker runs: accepted, and timing out again.
    assert_times_out(
        &stack,
        request_213(
            &stack,
            Method::DELETE,
            &format!("{binding_path}?{}", delete_query()),
        ),
    )
    .await;
    assert_times_out(
        &stack,
        request_213(
            &stack,
            Method::DELETE,
            &format!("{orphan_path}?{}", delete_query()),
        ),
    )
    .await;

    // A worker again: the platform's retries succeed (200 while the deletion was still running, 410 when the
    // worker finished it before the retry arrived: both end orphan mitigation).
    stack.restart_worker(Vec::new()).unwrap();
    let statuses = delete_until_done(&stack, &binding_path).await;
    assert!(matches!(statuses.last(), Some(200 | 410)), "{statuses:?}");
    let statuses = delete_until_done(&stack, &orphan_path).await;
    assert!(matches!(statuses.last(), Some(200 | 410)), "{statuses:?}");

    let binding_role = broker::names::binding_role(&stack.name_prefix, "b-1");
    assert_eq!(
        roles_like(&stack, &binding_role).await,
        0,
        "the timed-out binding's role was left behind"
    );
    assert!(
        !database_exists(&stack, &orphan).await,
        "the timed-out provision's database was left behind"
    );
    let owner = broker::names::instance_owner_role(&stack.name_prefix, &orphan);
    assert_eq!(roles_like(&stack, &owner).await, 0);
    // The bound instance is still there and usable; deleting it leaves nothing.
    let statuses = delete_until_done(&stack, &path).await;
    assert!(matches!(statuses.last(), Some(200 | 410)), "{statuses:?}");
    assert_eq!(
        roles_like(&stack, &format!("{}%", stack.name_prefix)).await,
        0
    );
    stack.stop().await;
}

/// An `s3` bucket on moto, the whole lifecycle without `accepts_incomplete` (moto from ./scripts/test.sh).
#[tokio::test]
async fn a_2_13_client_runs_an_s3_bucket_lifecycle_without_accepts_incomplete() {
    let env = |name: &str| {
        std::env::var(name).unwrap_or_else(|_| {
            panic!("{name} is not set: run ./scripts/test.sh, which starts moto")
        })
    };
    let stack = Stack::start_with(vec![
        ("AWS_REGION", "us-east-1".into()),
        ("AWS_ENDPOINT_URL", env("BERTH_TEST_MOTO_URL")),
        ("AWS_ACCESS_KEY_ID", env("BERTH_TEST_MOTO_ACCESS_KEY")),
        ("AWS_SECRET_ACCESS_KEY", env("BERTH_TEST_MOTO_SECRET_KEY")),
    ])
    .await
    .unwrap();
    let service = "6f0c2f4e-3b1a-4c55-9d0e-8a4b7c2e1f01";
    let (basic, versioned) = (
        "b1c7a3e0-52d4-4f0a-8e61-3d2f9a7c5b11",
        "c2d8b4f1-63e5-4a1b-9f72-4e3a0b8d6c22",
    );
    let instance = uuid::Uuid::new_v4().to_string();
    let path = format!("/v2/service_instances/{instance}");
    let provision = json!({"service_id": service, "plan_id": basic, "organization_guid": "org", "space_guid": "space"});
    let (status, body) = stack
        .send(request_213(&stack, Method::PUT, &path).json(&provision))
        .await
        .unwrap();
    assert_created_with_a_dashboard_link(&stack, &instance, status, &body);

    // A plan change (versioning on) is an update the worker makes: 200 once made.
    let update = json!({"service_id": service, "plan_id": versioned});
    let (status, body) = stack
        .send(request_213(&stack, Method::PATCH, &path).json(&update))
        .await
        .unwrap();
    assert_eq!((status, &body), (200, &json!({})), "{}", stack.logs());
    let (status, fetched) = stack.send(stack.request(Method::GET, &path)).await.unwrap();
    assert_eq!(
        (status, fetched["plan_id"].as_str()),
        (200, Some(versioned))
    );

    let binding = format!("{path}/service_bindings/b-1");
    let (status, body) = stack
        .send(
            request_213(&stack, Method::PUT, &binding)
                .json(&json!({"service_id": service, "plan_id": versioned})),
        )
        .await
        .unwrap();
    assert_eq!(status, 201, "{body}\n{}", stack.logs());
    assert!(body["credentials"]["S3_ACCESS_KEY"].is_string(), "{body}");

    let query = format!("service_id={service}&plan_id={versioned}");
    let (status, body) = stack
        .send(request_213(
            &stack,
            Method::DELETE,
            &format!("{binding}?{query}"),
        ))
        .await
        .unwrap();
    assert_eq!((status, &body), (200, &json!({})), "{}", stack.logs());
    let (status, body) = stack
        .send(request_213(
            &stack,
            Method::DELETE,
            &format!("{path}?{query}"),
        ))
        .await
        .unwrap();
    assert_eq!((status, &body), (200, &json!({})), "{}", stack.logs());
    let (status, _) = stack.send(stack.request(Method::GET, &path)).await.unwrap();
    assert_eq!(status, 404);
    stack.stop().await;
}

/// Sends a request the API cannot finish in time: 504 OperationTimedOut.
async fn assert_times_out(stack: &Stack, request: reqwest::RequestBuilder) {
    let (status, body) = stack.send(request).await.unwrap();
    assert_eq!(
        (status, body["error"].as_str()),
        (504, Some("OperationTimedOut")),
        "{body}"
    );
}

/// A synchronous provision's 201: `{}` but for the instance's `dashboard_url` (OSB lets a provision answer carry it).
fn assert_created_with_a_dashboard_link(stack: &Stack, instance: &str, status: u16, body: &Value) {
    assert_eq!(status, 201, "{body}\n{}", stack.logs());
    let fields = body.as_object().expect("a JSON object");
    assert_eq!(fields.len(), 1, "{body}");
    let link = body["dashboard_url"].as_str().expect("dashboard_url");
    assert!(
        link.starts_with(&format!(
            "{}/dashboard/instances/{instance}?",
            stack.base_url
        )),
        "{link}"
    );
}
