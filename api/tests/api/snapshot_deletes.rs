//! Deleting presets, preset versions and backups (the rows at once, the objects queued for a `snapshot.delete`
//! task), refused while a task still reads them or the preset is locked; and the list of instances.

use axum::http::{Method, StatusCode};
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

use crate::helpers::{PG_SERVICE, PG_SHARED, TestApp};

/// What the worker does when a snapshot task succeeds: the row turns ready, the task succeeded.
async fn snapshot_made(app: &TestApp, answer: &Value) {
    sqlx::query("UPDATE snapshots SET state = 'ready', size_bytes = 10 WHERE task_id = $1")
        .bind(Uuid::parse_str(answer["operation"].as_str().unwrap()).unwrap())
        .execute(&app.pool)
        .await
        .unwrap();
    app.finish(answer["operation"].as_str().unwrap(), "succeeded", None)
        .await;
}

async fn scalar(app: &TestApp, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(&app.pool).await.unwrap()
}

/// The `snapshot.delete` task of a 202 answer: its payload.
async fn deletion_payload(app: &TestApp, answer: &Value) -> Value {
    let (kind, payload): (String, Value) =
        sqlx::query_as("SELECT kind, payload FROM tasks WHERE id = $1")
            .bind(Uuid::parse_str(answer["operation"].as_str().unwrap()).unwrap())
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(kind, "snapshot.delete");
    payload
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn presets_and_versions_are_deleted_unless_in_use_or_locked(pool: PgPool) {
    let app = TestApp::new(pool);
    app.provisioned("db1").await;
    let push = app
        .call(
            Method::POST,
            "/berth/v1/presets",
            Some(&json!({"name": "shop", "instance_id": "db1"})),
        )
        .await;
    assert_eq!(push.status, StatusCode::ACCEPTED, "{push:?}");

    // While version 1 is being pushed.
    let refused = app
        .call(Method::DELETE, "/berth/v1/presets/shop", None)
        .await;
    let said = refused.assert_osb_error(StatusCode::CONFLICT, None);
    assert!(said.contains("preset.push"), "{said}");
    snapshot_made(&app, &push.body).await;
    let push = app
        .call(
            Method::POST,
            "/berth/v1/presets/shop/versions",
            Some(&json!({"instance_id": "db1"})),
        )
        .await;
    snapshot_made(&app, &push.body).await;

    // While an instance is being provisioned from it.
    let from_preset = json!({
        "service_id": PG_SERVICE, "plan_id": PG_SHARED, "organization_guid": "o", "space_guid": "s",
        "parameters": {"preset": {"name": "shop"}},
    });
    let provision = app.provision("db2", &from_preset).await.operation();
    let refused = app
        .call(Method::DELETE, "/berth/v1/presets/shop", None)
        .await;
    let said = refused.assert_osb_error(StatusCode::CONFLICT, None);
    assert!(
        said.contains("instance.provision") && said.contains("db2"),
        "{said}"
    );
    app.finish(&provision, "succeeded", None).await;

    // While it is locked.
    let lock = app
        .call(
            Method::POST,
            "/berth/v1/presets/shop/lock",
            Some(&json!({"by": "ci"})),
        )
        .await;
    let refused = app
        .call(Method::DELETE, "/berth/v1/presets/shop/versions/1", None)
        .await;
    refused.assert_osb_error(StatusCode::LOCKED, None);
    app.call(
        Method::DELETE,
        "/berth/v1/presets/shop/lock",
        Some(&json!({"lock_key": lock.body["lock_key"]})),
    )
    .await;

    // One version: its row goes, its object is queued, its template named in the task.
    let v1: (Uuid, String) =
        sqlx::query_as("SELECT id, object_key FROM snapshots WHERE version = 1")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    let deleted = app
        .call(Method::DELETE, "/berth/v1/presets/shop/versions/1", None)
        .await;
    assert_eq!(deleted.status, StatusCode::ACCEPTED, "{deleted:?}");
    assert_eq!(deleted.body["deleted_versions"], json!([1]));
    assert_eq!(
        deletion_payload(&app, &deleted.body).await,
        json!({"template_snapshot_ids": [v1.0]})
    );
    assert_eq!(
        scalar(&app, "SELECT count(*) FROM snapshots WHERE kind = 'preset'").await,
        1
    );
    let queued: Vec<String> =
        sqlx::query_scalar("SELECT object_key FROM snapshot_objects_to_delete")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    assert_eq!(queued, [v1.1]);
    let missing = app
        .call(Method::DELETE, "/berth/v1/presets/shop/versions/1", None)
        .await;
    missing.assert_osb_error(StatusCode::NOT_FOUND, None);
    let bad = app
        .call(Method::DELETE, "/berth/v1/presets/shop/versions/x", None)
        .await;
    bad.assert_osb_error(StatusCode::BAD_REQUEST, None);

    // The whole preset.
    let deleted = app
        .call(Method::DELETE, "/berth/v1/presets/shop", None)
        .await;
    assert_eq!(deleted.status, StatusCode::ACCEPTED, "{deleted:?}");
    assert_eq!(deleted.body["deleted_versions"], json!([2]));
    assert_eq!(scalar(&app, "SELECT count(*) FROM presets").await, 0);
    assert_eq!(scalar(&app, "SELECT count(*) FROM snapshots").await, 0);
    assert_eq!(
        scalar(&app, "SELECT count(*) FROM snapshot_objects_to_delete").await,
        2
    );
    let missing = app
        .call(Method::DELETE, "/berth/v1/presets/shop", None)
        .await;
    missing.assert_osb_error(StatusCode::NOT_FOUND, None);
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn backups_are_deleted_once_no_task_reads_them(pool: PgPool) {
    let app = TestApp::new(pool);
    app.provisioned("db1").await;
    let taken = app
        .call(
            Method::POST,
            "/berth/v1/instances/db1/backups",
            Some(&json!({})),
        )
        .await;
    let backup = taken.body["backup_id"].as_str().unwrap().to_string();
    let path = format!("/berth/v1/instances/db1/backups/{backup}");
    let refused = app.call(Method::DELETE, &path, None).await;
    let said = refused.assert_osb_error(StatusCode::CONFLICT, None);
    assert!(said.contains("instance.backup"), "{said}");
    snapshot_made(&app, &taken.body).await;

    // A restore from it is running.
    let restore = app
        .call(Method::POST, &format!("{path}/restore"), Some(&json!({})))
        .await
        .operation();
    app.call(Method::DELETE, &path, None)
        .await
        .assert_osb_error(StatusCode::CONFLICT, None);
    app.finish(&restore, "succeeded", None).await;

    let deleted = app.call(Method::DELETE, &path, None).await;
    assert_eq!(deleted.status, StatusCode::ACCEPTED, "{deleted:?}");
    assert_eq!(
        deletion_payload(&app, &deleted.body).await,
        json!({"template_snapshot_ids": []})
    );
    assert_eq!(scalar(&app, "SELECT count(*) FROM snapshots").await, 0);
    assert_eq!(
        scalar(&app, "SELECT count(*) FROM snapshot_objects_to_delete").await,
        1
    );
    app.call(Method::DELETE, &path, None)
        .await
        .assert_osb_error(StatusCode::NOT_FOUND, None);
    // Another instance's backup id is not found under this one.
    app.call(
        Method::DELETE,
        &format!("/berth/v1/instances/db2/backups/{backup}"),
        None,
    )
    .await
    .assert_osb_error(StatusCode::NOT_FOUND, None);
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn instances_are_listed_a_page_at_a_time(pool: PgPool) {
    let app = TestApp::new(pool);
    for id in ["a1", "b2", "c3"] {
        app.provisioned(id).await;
    }
    let page = app
        .call(Method::GET, "/berth/v1/instances?limit=2", None)
        .await;
    assert_eq!(page.status, StatusCode::OK, "{page:?}");
    let ids: Vec<&str> = page.body["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["a1", "b2"]);
    assert_eq!(page.body["next_after"], "b2");
    assert_eq!(page.body["instances"][0]["plan"], "shared");
    assert_eq!(
        page.body["instances"][0]["last_operation"]["type"],
        "provision"
    );
    assert_eq!(
        page.body["instances"][0]["last_operation"]["state"],
        "succeeded"
    );
    let last = app
        .call(Method::GET, "/berth/v1/instances?limit=2&after=b2", None)
        .await;
    assert_eq!(last.body["instances"][0]["id"], "c3");
    assert_eq!(last.body["next_after"], Value::Null);

    let one = app.call(Method::GET, "/berth/v1/instances/b2", None).await;
    assert_eq!(one.body["id"], "b2");
    assert_eq!(one.body["parameters"]["extensions"], json!(["citext"]));
    app.call(Method::GET, "/berth/v1/instances/nope", None)
        .await
        .assert_osb_error(StatusCode::NOT_FOUND, None);
    app.call(Method::GET, "/berth/v1/instances?limit=0", None)
        .await
        .assert_osb_error(StatusCode::BAD_REQUEST, None);
    // Behind the broker's credentials.
    let anonymous = app
        .send(
            axum::http::Request::builder()
                .uri("/berth/v1/instances")
                .body(axum::body::Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED);
}
