//! Clients that do not send `accepts_incomplete=true` (an OSB 2.13 platform, older tools, scripts): the API
//! records the task, waits for it to finish (the task-finished NOTIFY), then answers with the result. The
//! worker is played by `finish_soon`, which completes a task from another connection while the request waits.

use std::time::Duration;

use axum::http::{HeaderValue, Method, StatusCode};
use serde_json::{Value, json};
use sqlx::{Connection, PgPool, Row};
use uuid::Uuid;

use crate::{
    assert_unchanged,
    helpers::{
        PG_SERVICE, PG_SHARED, S3_BASIC, S3_SERVICE, TestApp, TestResponse, bind_body,
        provision_body,
    },
};

const PG_DEDICATED: &str = "5f0c2d8e-9b41-4c7a-a6e3-2d7f1b8c4e90";

/// A request as a 2.13 platform sends it: that version's header, no `accepts_incomplete`.
async fn call_213(app: &TestApp, method: Method, uri: &str, body: Option<&Value>) -> TestResponse {
    let mut builder = TestApp::request(method, uri);
    builder
        .headers_mut()
        .unwrap()
        .insert("x-broker-api-version", HeaderValue::from_static("2.13"));
    app.send_with_body(builder, body).await
}

/// A 2.13 bind (the usual body) of `binding` to `instance`.
async fn bind_213(app: &TestApp, instance: &str, binding: &str) -> TestResponse {
    call_213(
        app,
        Method::PUT,
        &binding_uri(instance, binding),
        Some(&bind_body()),
    )
    .await
}

/// A 2.13 unbind of `binding` from `instance`.
async fn unbind_213(app: &TestApp, instance: &str, binding: &str) -> TestResponse {
    call_213(app, Method::DELETE, &unbind_uri(instance, binding), None).await
}

fn binding_uri(instance: &str, binding: &str) -> String {
    format!("/v2/service_instances/{instance}/service_bindings/{binding}")
}

fn unbind_uri(instance: &str, binding: &str) -> String {
    format!(
        "{}?service_id={PG_SERVICE}&plan_id={PG_SHARED}",
        binding_uri(instance, binding)
    )
}

fn deprovision_uri(instance: &str) -> String {
    format!("/v2/service_instances/{instance}?service_id={PG_SERVICE}&plan_id={PG_SHARED}")
}

/// The unfinished task of `operation` on the instance (and binding), once the request has recorded it.
async fn wait_for_task(
    pool: &PgPool,
    operation: &str,
    instance: &str,
    binding: Option<&str>,
) -> Uuid {
    for _ in 0..500 {
        let id: Option<Uuid> = sqlx::query_scalar(
            "SELECT id FROM tasks WHERE operation = $1 AND instance_id = $2 AND binding_id IS NOT DISTINCT FROM $3
               AND state IN ('pending', 'running')",
        )
        .bind(operation)
        .bind(instance)
        .bind(binding)
        .fetch_optional(pool)
        .await
        .unwrap();
        if let Some(id) = id {
            return id;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no {operation} task for {instance}/{binding:?} was recorded");
}

/// Plays the worker: once the request has recorded its task, does what the worker would, after a pause long
/// enough that the request is surely waiting.
fn finish_soon(
    app: &TestApp,
    operation: &'static str,
    instance: &str,
    binding: Option<&str>,
    state: &'static str,
) {
    let pool = app.pool.clone();
    let cipher = app.cipher.clone();
    let (instance, binding) = (instance.to_string(), binding.map(str::to_string));
    tokio::spawn(async move {
        let id = wait_for_task(&pool, operation, &instance, binding.as_deref()).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        if state == "succeeded" {
            match operation {
                "bind" => {
                    sqlx::query("UPDATE service_bindings SET credentials = $2 WHERE id = $1")
                        .bind(binding.as_deref())
                        .bind(cipher.seal_json(&json!({"uri": "postgres://u:p@db.example/d"})))
                        .execute(&pool)
                        .await
                        .unwrap();
                }
                "unbind" => {
                    sqlx::query("DELETE FROM service_bindings WHERE id = $1")
                        .bind(binding.as_deref())
                        .execute(&pool)
                        .await
                        .unwrap();
                }
                "deprovision" => {
                    sqlx::query("DELETE FROM service_instances WHERE id = $1")
                        .bind(&instance)
                        .execute(&pool)
                        .await
                        .unwrap();
                }
                _ => {}
            }
        }
        sqlx::query(
            "UPDATE tasks SET state = $2, last_error = CASE WHEN $2 = 'failed' THEN 'the server said no' END,
                              finished_at = now() WHERE id = $1",
        )
        .bind(id)
        .bind(state)
        .execute(&pool)
        .await
        .unwrap();
    });
}

async fn task_state(pool: &PgPool, operation: &str, binding: &str) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT state FROM tasks WHERE operation = $1 AND binding_id = $2 ORDER BY created_at",
    )
    .bind(operation)
    .bind(binding)
    .fetch_all(pool)
    .await
    .unwrap()
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn bind_and_unbind_without_accepts_incomplete_answer_when_done(pool: PgPool) {
    let app = TestApp::new(pool);
    app.provisioned("i-1").await;

    finish_soon(&app, "bind", "i-1", Some("b-1"), "succeeded");
    let started = std::time::Instant::now();
    let res = bind_213(&app, "i-1", "b-1").await;
    assert_eq!(res.status, StatusCode::CREATED, "{res:?}");
    assert_eq!(
        res.body["credentials"],
        json!({"uri": "postgres://u:p@db.example/d"})
    );
    assert!(
        started.elapsed() >= Duration::from_millis(200),
        "answered before the task finished"
    );
    assert_eq!(task_state(&app.pool, "bind", "b-1").await, ["succeeded"]);

    // The identical request again: 200 with the same credentials, nothing new recorded.
    let res = assert_unchanged!(app, bind_213(&app, "i-1", "b-1").await);
    assert_eq!(res.status, StatusCode::OK, "{res:?}");
    assert_eq!(
        res.body["credentials"],
        json!({"uri": "postgres://u:p@db.example/d"})
    );

    finish_soon(&app, "unbind", "i-1", Some("b-1"), "succeeded");
    let res = unbind_213(&app, "i-1", "b-1").await;
    assert_eq!(
        (res.status, &res.body),
        (StatusCode::OK, &json!({})),
        "{res:?}"
    );
    // Gone now: 410.
    let res = unbind_213(&app, "i-1", "b-1").await;
    assert_eq!(res.status, StatusCode::GONE);
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn a_failed_synchronous_bind_is_a_500_in_the_osb_shape(pool: PgPool) {
    let app = TestApp::new(pool);
    app.provisioned("i-1").await;
    finish_soon(&app, "bind", "i-1", Some("b-1"), "failed");
    let res = bind_213(&app, "i-1", "b-1").await;
    let description =
        res.assert_osb_error(StatusCode::INTERNAL_SERVER_ERROR, Some("OperationFailed"));
    assert!(description.contains("the server said no"), "{description}");
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn a_bind_that_times_out_is_a_504_and_the_unbind_that_follows_is_accepted(pool: PgPool) {
    let app = TestApp::with_sync_wait(pool, Duration::from_millis(300));
    app.provisioned("i-1").await;
    // Nobody finishes the task: the wait runs out. A 5xx (not 408) so that the platform cleans up.
    let res = bind_213(&app, "i-1", "b-1").await;
    res.assert_osb_error(StatusCode::GATEWAY_TIMEOUT, Some("OperationTimedOut"));
    assert_eq!(task_state(&app.pool, "bind", "b-1").await, ["pending"]);

    // The platform's orphan mitigation: an unbind while the bind is still pending is accepted (recorded; the
    // worker cancels the bind or waits for it), synchronously...
    let res = unbind_213(&app, "i-1", "b-1").await;
    res.assert_osb_error(StatusCode::GATEWAY_TIMEOUT, Some("OperationTimedOut"));
    let unbinds = task_state(&app.pool, "unbind", "b-1").await;
    assert_eq!(unbinds, ["pending"]);
    // ... or asynchronously, which answers the same operation.
    let unbind = sqlx::query_scalar::<_, Uuid>("SELECT id FROM tasks WHERE operation = 'unbind'")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(
        app.unbind("i-1", "b-1").await.operation(),
        unbind.to_string()
    );

    // Once the unbind has run, the synchronous retry says so.
    finish_soon(&app, "unbind", "i-1", Some("b-1"), "succeeded");
    let patient = TestApp::with_sync_wait(app.pool.clone(), Duration::from_secs(5));
    let res = unbind_213(&patient, "i-1", "b-1").await;
    assert_eq!(res.status, StatusCode::OK, "{res:?}");
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn shared_and_s3_plans_run_their_whole_lifecycle_synchronously(pool: PgPool) {
    let app = TestApp::new(pool);
    finish_soon(&app, "provision", "i-1", None, "succeeded");
    let res = call_213(
        &app,
        Method::PUT,
        "/v2/service_instances/i-1",
        Some(&provision_body()),
    )
    .await;
    assert_eq!(
        (res.status, &res.body),
        (StatusCode::CREATED, &json!({})),
        "{res:?}"
    );
    // The identical provision again: 200.
    let res = assert_unchanged!(
        app,
        call_213(
            &app,
            Method::PUT,
            "/v2/service_instances/i-1",
            Some(&provision_body())
        )
        .await
    );
    assert_eq!(
        (res.status, &res.body),
        (StatusCode::OK, &json!({})),
        "{res:?}"
    );

    finish_soon(&app, "update", "i-1", None, "succeeded");
    let update = json!({"service_id": PG_SERVICE, "parameters": {"extensions": ["hstore"]}});
    let res = call_213(
        &app,
        Method::PATCH,
        "/v2/service_instances/i-1",
        Some(&update),
    )
    .await;
    assert_eq!(
        (res.status, &res.body),
        (StatusCode::OK, &json!({})),
        "{res:?}"
    );

    // A failed update: 500, the instance as before.
    finish_soon(&app, "update", "i-1", None, "failed");
    let update = json!({"service_id": PG_SERVICE, "parameters": {"extensions": ["citext"]}});
    call_213(
        &app,
        Method::PATCH,
        "/v2/service_instances/i-1",
        Some(&update),
    )
    .await
    .assert_osb_error(StatusCode::INTERNAL_SERVER_ERROR, Some("OperationFailed"));

    finish_soon(&app, "deprovision", "i-1", None, "succeeded");
    let res = call_213(&app, Method::DELETE, &deprovision_uri("i-1"), None).await;
    assert_eq!(
        (res.status, &res.body),
        (StatusCode::OK, &json!({})),
        "{res:?}"
    );
    assert_eq!(app.counts().await.0, 0);

    // An s3 plan too.
    let body = json!({"service_id": S3_SERVICE, "plan_id": S3_BASIC, "organization_guid": "o", "space_guid": "s"});
    finish_soon(&app, "provision", "s-1", None, "succeeded");
    let res = call_213(&app, Method::PUT, "/v2/service_instances/s-1", Some(&body)).await;
    assert_eq!(res.status, StatusCode::CREATED, "{res:?}");
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn slow_plans_still_require_accepts_incomplete(pool: PgPool) {
    let app = TestApp::new(pool);
    let mut body = provision_body();
    body["plan_id"] = json!(PG_DEDICATED);
    body["parameters"] = json!({});
    assert_unchanged!(
        app,
        call_213(&app, Method::PUT, "/v2/service_instances/d-1", Some(&body)).await
    )
    .assert_osb_error(StatusCode::UNPROCESSABLE_ENTITY, Some("AsyncRequired"));
    // Provisioned asynchronously, a dedicated instance cannot be updated or deleted synchronously either.
    let op = app.provision("d-1", &body).await.operation();
    app.finish(&op, "succeeded", None).await;
    assert_unchanged!(app, {
        call_213(
            &app,
            Method::PATCH,
            "/v2/service_instances/d-1",
            Some(&json!({"service_id": PG_SERVICE, "parameters": {"extensions": ["hstore"]}})),
        )
        .await
        .assert_osb_error(StatusCode::UNPROCESSABLE_ENTITY, Some("AsyncRequired"));
        let uri =
            format!("/v2/service_instances/d-1?service_id={PG_SERVICE}&plan_id={PG_DEDICATED}");
        call_213(&app, Method::DELETE, &uri, None)
            .await
            .assert_osb_error(StatusCode::UNPROCESSABLE_ENTITY, Some("AsyncRequired"));
    });
    // Binding works synchronously on every plan.
    finish_soon(&app, "bind", "d-1", Some("b-1"), "succeeded");
    let mut bind = bind_body();
    bind["plan_id"] = json!(PG_DEDICATED);
    bind["parameters"] = json!({});
    let res = call_213(&app, Method::PUT, &binding_uri("d-1", "b-1"), Some(&bind)).await;
    assert_eq!(res.status, StatusCode::CREATED, "{res:?}");
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn a_provision_that_times_out_can_be_deprovisioned_while_it_runs(pool: PgPool) {
    let app = TestApp::with_sync_wait(pool, Duration::from_millis(300));
    call_213(
        &app,
        Method::PUT,
        "/v2/service_instances/i-1",
        Some(&provision_body()),
    )
    .await
    .assert_osb_error(StatusCode::GATEWAY_TIMEOUT, Some("OperationTimedOut"));
    let provision = wait_for_task(&app.pool, "provision", "i-1", None).await;
    app.set_running(&provision.to_string(), None).await;
    // The platform's orphan mitigation while the provision runs: accepted (the worker holds it back).
    let op = app.deprovision("i-1").await.operation();
    assert_eq!(app.task(&op).await.get::<String, _>("state"), "pending");
    // A repeated synchronous one waits on that same deprovision.
    call_213(&app, Method::DELETE, &deprovision_uri("i-1"), None)
        .await
        .assert_osb_error(StatusCode::GATEWAY_TIMEOUT, Some("OperationTimedOut"));
    let deprovisions: i64 =
        sqlx::query_scalar("SELECT count(*) FROM tasks WHERE operation = 'deprovision'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(deprovisions, 1);
}

/// The listener's connection is lost while a request waits, and the task finishes while nobody can listen (the
/// database refuses new connections): once the listener is back it wakes every waiter, which reads its task again.
#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn a_lost_listener_wakes_its_waiters_when_back(pool: PgPool) {
    let app = TestApp::with_sync_wait(pool.clone(), Duration::from_secs(10));
    app.provisioned("i-1").await;
    let options = (*pool.connect_options()).clone();
    let killer = tokio::spawn(async move {
        let id = wait_for_task(&pool, "bind", "i-1", Some("b-1")).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut own = sqlx::PgConnection::connect_with(&options).await.unwrap();
        let database: String = sqlx::query_scalar("SELECT current_database()::text")
            .fetch_one(&mut own)
            .await
            .unwrap();
        // A database cannot refuse connections by its own say: from the server's `postgres` database.
        let mut admin = sqlx::PgConnection::connect_with(&options.clone().database("postgres"))
            .await
            .unwrap();
        sqlx::query(&format!(
            "ALTER DATABASE \"{database}\" ALLOW_CONNECTIONS false"
        ))
        .execute(&mut admin)
        .await
        .unwrap();
        let listeners: i64 = sqlx::query_scalar(
            "SELECT count(*) FILTER (WHERE query LIKE 'LISTEN%') FROM pg_stat_activity, pg_terminate_backend(pid)
             WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
        .fetch_one(&mut own)
        .await
        .unwrap();
        // Every other connection is gone and none can be made: this NOTIFY reaches nobody.
        sqlx::query("UPDATE tasks SET state = 'succeeded', finished_at = now() WHERE id = $1")
            .bind(id)
            .execute(&mut own)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        sqlx::query(&format!(
            "ALTER DATABASE \"{database}\" ALLOW_CONNECTIONS true"
        ))
        .execute(&mut admin)
        .await
        .unwrap();
        listeners
    });
    let started = std::time::Instant::now();
    let res = bind_213(&app, "i-1", "b-1").await;
    assert_eq!(
        killer.await.unwrap(),
        1,
        "the listener was found and cut off"
    );
    assert_eq!(res.status, StatusCode::CREATED, "{res:?}");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "woken by the reconnect, not the timeout"
    );
}
