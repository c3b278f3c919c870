//! Rotating and expiring bindings on the `shared` plan with the real binaries: a successor named by
//! `predecessor_binding_id` gets credentials of its own and the predecessor's parameters (its lifetime
//! included); both log in until the old one is unbound; once the successor expires, the worker's reconcile loop
//! revokes its role, GET binding still answers with `expires_at` in the past, and the unbind works.

use std::time::{Duration, Instant};

use berth_tests::{Stack, find_plan, plan_ids};
use reqwest::Method;
use serde_json::{Value, json};
use sqlx::{Connection, PgConnection};

const WAIT: Duration = Duration::from_secs(60);

async fn bind(stack: &Stack, path: &str, body: Value) -> Value {
    stack.put_until_done(path, &body, WAIT).await;
    stack.fetch_binding(path).await
}

async fn unbind(stack: &Stack, path: &str, ids: &(String, String)) {
    let (status, _) = stack.delete_until_done(path, ids, WAIT).await;
    assert!(status == 410 || status == 200, "unbind ended with {status}");
    let (status, _) = stack.send(stack.request(Method::GET, path)).await.unwrap();
    assert_eq!(status, 404);
}

async fn logs_in(url: &str) -> bool {
    match PgConnection::connect(url).await {
        Ok(mut conn) => sqlx::query("SELECT 1").execute(&mut conn).await.is_ok(),
        Err(_) => false,
    }
}

fn url_of(binding: &Value) -> String {
    binding["credentials"]["DATABASE_URL"]
        .as_str()
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn shared_binding_rotation_and_expiry() {
    let stack = Stack::start().await.unwrap();
    let catalog = stack.catalog().await.unwrap();
    let plan = find_plan(&catalog, "postgres", "shared");
    assert_eq!(plan["binding_rotatable"], true, "{plan}");
    let expires_in =
        &plan["schemas"]["service_binding"]["create"]["parameters"]["properties"]["expires_in"];
    assert_eq!(
        (
            expires_in["minimum"].as_u64(),
            expires_in["maximum"].as_u64()
        ),
        (Some(600), Some(7200))
    );
    let ids = plan_ids(&catalog, "postgres", "shared");

    let instance = uuid::Uuid::new_v4().to_string();
    let provision = json!({"service_id": ids.0, "plan_id": ids.1, "organization_guid": "org", "space_guid": "space"});
    stack
        .put_until_done(
            &format!("/v2/service_instances/{instance}"),
            &provision,
            WAIT,
        )
        .await;

    let old_path = format!("/v2/service_instances/{instance}/service_bindings/old");
    let new_path = format!("/v2/service_instances/{instance}/service_bindings/new");
    let old = bind(
        &stack,
        &old_path,
        json!({"service_id": ids.0, "plan_id": ids.1, "parameters": {"access": "read-only", "expires_in": 7200}}),
    )
    .await;
    assert!(old["metadata"]["expires_at"].is_string(), "{old}");
    let new = bind(
        &stack,
        &new_path,
        json!({"service_id": ids.0, "plan_id": ids.1, "predecessor_binding_id": "old"}),
    )
    .await;

    // Credentials of its own, the predecessor's parameters and lifetime.
    assert_ne!(new["credentials"]["PGUSER"], old["credentials"]["PGUSER"]);
    assert_ne!(
        new["credentials"]["PGPASSWORD"],
        old["credentials"]["PGPASSWORD"]
    );
    assert_eq!(
        new["parameters"],
        json!({"access": "read-only", "expires_in": 7200})
    );
    assert!(
        new["metadata"]["expires_at"].as_str().unwrap()
            >= old["metadata"]["expires_at"].as_str().unwrap()
    );
    assert!(new["metadata"]["renew_before"].is_string(), "{new}");
    let (old_url, new_url) = (url_of(&old), url_of(&new));
    assert!(
        logs_in(&old_url).await && logs_in(&new_url).await,
        "both bindings work in parallel"
    );

    // Unbinding the predecessor leaves the successor working.
    unbind(&stack, &old_path, &ids).await;
    assert!(
        !logs_in(&old_url).await,
        "the unbound predecessor still logs in"
    );
    assert!(
        logs_in(&new_url).await,
        "the successor stopped working with its predecessor"
    );

    // The successor expires (moved forward in the broker's database instead of waiting two hours): the
    // worker's reconcile loop revokes it.
    assert_expired_and_revoked(&stack, &new_path, &new_url).await;
    // An expired binding cannot be rotated.
    let (status, body) = stack
        .send(stack.request(Method::PUT, &format!("/v2/service_instances/{instance}/service_bindings/newer?accepts_incomplete=true"))
            .json(&json!({"service_id": ids.0, "plan_id": ids.1, "predecessor_binding_id": "new"})))
        .await
        .unwrap();
    assert_eq!(status, 400, "{body}");
    unbind(&stack, &new_path, &ids).await;

    let (status, _) = stack
        .delete_until_done(&format!("/v2/service_instances/{instance}"), &ids, WAIT)
        .await;
    assert_eq!(status, 410);
    stack.stop().await;
}

/// Moves the binding `new`'s expiry to now: the worker's reconcile loop revokes it (its login and open session
/// end, `revoked_at` is recorded), and GET binding shows the expiry in the past.
async fn assert_expired_and_revoked(stack: &Stack, new_path: &str, new_url: &str) {
    let mut broker_db = PgConnection::connect(&stack.broker_db_url).await.unwrap();
    // The session opens before the expiry moves: the reconcile loop may revoke at once after it.
    let mut session = PgConnection::connect(new_url).await.unwrap();
    sqlx::query(
        "UPDATE service_bindings SET expires_at = now(), renew_before = now() WHERE id = 'new'",
    )
    .execute(&mut broker_db)
    .await
    .unwrap();
    let deadline = Instant::now() + WAIT;
    while logs_in(new_url).await {
        assert!(
            Instant::now() < deadline,
            "the expired binding still logs in\n{}",
            stack.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        sqlx::query("SELECT 1").execute(&mut session).await.is_err(),
        "its open session survived"
    );
    // The role goes first, then the task's completion records `revoked_at`: wait for it, not only for the login.
    loop {
        let revoked: bool = sqlx::query_scalar(
            "SELECT revoked_at IS NOT NULL FROM service_bindings WHERE id = 'new'",
        )
        .fetch_one(&mut broker_db)
        .await
        .unwrap();
        if revoked {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "revoked_at recorded\n{}",
            stack.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, fetched) = stack
        .send(stack.request(Method::GET, new_path))
        .await
        .unwrap();
    assert_eq!(status, 200, "{fetched}");
    let past: bool = sqlx::query_scalar("SELECT $1::timestamptz <= now()")
        .bind(fetched["metadata"]["expires_at"].as_str().unwrap())
        .fetch_one(&mut broker_db)
        .await
        .unwrap();
    assert!(past, "GET binding shows the expiry: {fetched}");
}
