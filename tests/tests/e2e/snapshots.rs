//! Presets and backups end to end: the real binaries, the real Postgres, a `file://` store (the embedded
//! default) and SeaweedFS (an S3-compatible server started by the test setup).

use std::{path::Path, time::Duration};

use berth_tests::{Stack, plan_ids};
use reqwest::Method;
use serde_json::{Value, json};
use sqlx::{Connection, PgConnection, Row};

const WAIT: Duration = Duration::from_secs(120);

async fn shared_ids(stack: &Stack) -> (String, String) {
    plan_ids(&stack.catalog().await.unwrap(), "postgres", "shared")
}

/// Provisions a `shared` instance with `parameters`; returns (instance id, DATABASE_URL of a new binding).
async fn provision(stack: &Stack, ids: &(String, String), parameters: Value) -> (String, String) {
    let instance = uuid::Uuid::new_v4().to_string();
    let provision = json!({ "service_id": ids.0, "plan_id": ids.1, "organization_guid": "o", "space_guid": "s",
                            "parameters": parameters });
    stack
        .put_until_done(
            &format!("/v2/service_instances/{instance}"),
            &provision,
            WAIT,
        )
        .await;
    let path = format!("/v2/service_instances/{instance}/service_bindings/b-{instance}");
    let bind = json!({ "service_id": ids.0, "plan_id": ids.1, "app_guid": "app" });
    stack.put_until_done(&path, &bind, WAIT).await;
    let credentials = stack.fetch_credentials(&path).await;
    (
        instance,
        credentials["DATABASE_URL"].as_str().unwrap().to_string(),
    )
}

async fn deprovision(stack: &Stack, ids: &(String, String), instance: &str) {
    let path = format!("/v2/service_instances/{instance}/service_bindings/b-{instance}");
    let query = format!(
        "service_id={}&plan_id={}&accepts_incomplete=true",
        ids.0, ids.1
    );
    let (status, _) = stack
        .send(stack.request(Method::DELETE, &format!("{path}?{query}")))
        .await
        .unwrap();
    assert!(status == 202 || status == 410, "unbind answered {status}");
    let _ = stack
        .wait_operation(&format!("{path}/last_operation"), WAIT)
        .await;
    let (status, _) = stack
        .delete_until_done(&format!("/v2/service_instances/{instance}"), ids, WAIT)
        .await;
    assert_eq!(status, 410, "{}", stack.logs());
}

async fn sql(url: &str, statements: &str) {
    let mut conn = PgConnection::connect(url).await.unwrap();
    sqlx::raw_sql(statements).execute(&mut conn).await.unwrap();
    conn.close().await.unwrap();
}

async fn names(url: &str) -> Vec<String> {
    let mut conn = PgConnection::connect(url).await.unwrap();
    let rows = sqlx::query("SELECT name FROM items ORDER BY id")
        .fetch_all(&mut conn)
        .await
        .unwrap();
    rows.iter().map(|r| r.get::<String, _>(0)).collect()
}

/// 202 from a `/berth/v1` POST; returns its body.
async fn accepted(stack: &Stack, method: Method, path: &str, body: Value) -> Value {
    let (status, answer) = stack
        .send(stack.request(method, path).json(&body))
        .await
        .unwrap();
    assert_eq!(status, 202, "{path}: {answer}\n{}", stack.logs());
    answer
}

/// Sends the requests all at once; their (status, body) in any order.
async fn concurrently(requests: Vec<reqwest::RequestBuilder>) -> Vec<(u16, Value)> {
    let mut set = tokio::task::JoinSet::new();
    for request in requests {
        set.spawn(async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            (
                status,
                response.json::<Value>().await.unwrap_or(Value::Null),
            )
        });
    }
    set.join_all().await
}

fn files_under(dir: &Path, suffix: &str) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files_under(&path, suffix));
        } else if path.to_string_lossy().ends_with(suffix) {
            out.push(path);
        }
    }
    out
}

async fn databases_like(stack: &Stack, pattern: &str) -> Vec<String> {
    let mut admin = stack.admin().await.unwrap();
    sqlx::query_scalar::<_, String>("SELECT datname::text FROM pg_database WHERE datname LIKE $1")
        .bind(pattern)
        .fetch_all(&mut admin)
        .await
        .unwrap()
}

/// push-new, push, the lock, select, and instances made from a preset (the later ones by template clone).
async fn preset_round_trip(stack: &Stack) {
    let ids = shared_ids(stack).await;
    let (source, source_url) = provision(stack, &ids, json!({})).await;
    sql(&source_url, "CREATE TABLE items (id int PRIMARY KEY, name text); INSERT INTO items VALUES (1, 'a'), (2, 'b');")
        .await;

    let v1 = accepted(
        stack,
        Method::POST,
        "/berth/v1/presets",
        json!({
            "name": "shop", "instance_id": source, "description": "two items", "author": "alice",
        }),
    )
    .await;
    assert_eq!(v1["version"], 1);
    stack.assert_task_succeeded(&v1, WAIT).await;

    // Many concurrent push-new of one name: exactly one wins.
    assert_one_of_eight_racing_pushes_wins(stack, &source).await;

    // A second version; the first stays restorable.
    sql(&source_url, "INSERT INTO items VALUES (3, 'c');").await;
    let v2 = accepted(
        stack,
        Method::POST,
        "/berth/v1/presets/shop/versions",
        json!({
            "instance_id": source, "description": "three items", "author": "bob",
        }),
    )
    .await;
    assert_eq!(v2["version"], 2);
    stack.assert_task_succeeded(&v2, WAIT).await;

    // Many concurrent lockers: exactly one gets the key; while locked, pushes need it.
    lock_push_with_the_key_and_unlock(stack, &source).await;

    // The change log.
    let versions = change_log(stack).await;

    // Three instances from version 1: the first restores the template, the others clone it.
    let made = three_instances_from_version_one(stack, &ids, &versions).await;

    // Select (db-p): reset the source to version 1 while its binding stays valid; an OSB update naming a
    // preset selects it too.
    select_version_one_then_two(stack, &ids, &source, &source_url).await;

    // Bad input changes nothing: an unknown preset, a missing version.
    assert_unknown_presets_are_refused(stack, &ids).await;

    for instance in made.iter().chain([&source]) {
        deprovision(stack, &ids, instance).await;
    }
    let scratch = databases_like(stack, &format!("{}rs_%", stack.name_prefix)).await;
    assert!(scratch.is_empty(), "scratch databases left: {scratch:?}");
}

/// Eight concurrent pushes of a new preset name: one 202, seven 409.
async fn assert_one_of_eight_racing_pushes_wins(stack: &Stack, source: &str) {
    let racers = (0..8)
        .map(|i| {
            stack
                .request(Method::POST, "/berth/v1/presets")
                .json(&json!({
                    "name": "race", "instance_id": source, "author": format!("racer-{i}"),
                }))
        })
        .collect();
    let statuses: Vec<u16> = concurrently(racers)
        .await
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 202).count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 409).count(),
        7,
        "{statuses:?}"
    );
}

/// Ten concurrent lockers of `shop`: one gets the key (never shown again); a push without it or with a wrong one
/// is 423, with it version 3 is made; a wrong key cannot unlock, the right one does.
async fn lock_push_with_the_key_and_unlock(stack: &Stack, source: &str) {
    let lockers = (0..10)
        .map(|i| {
            stack
                .request(Method::POST, "/berth/v1/presets/shop/lock")
                .json(&json!({"by": format!("dev-{i}"), "reason": "migrating"}))
        })
        .collect();
    let answers = concurrently(lockers).await;
    let winners: Vec<&Value> = answers
        .iter()
        .filter(|(s, _)| *s == 200)
        .map(|(_, b)| b)
        .collect();
    assert_eq!(winners.len(), 1, "{answers:?}");
    assert_eq!(
        answers.iter().filter(|(s, _)| *s == 409).count(),
        9,
        "{answers:?}"
    );
    let key = winners[0]["lock_key"].as_str().unwrap().to_string();
    let (status, lock) = stack
        .send(stack.request(Method::GET, "/berth/v1/presets/shop/lock"))
        .await
        .unwrap();
    assert_eq!((status, &lock["locked"]), (200, &json!(true)));
    assert!(
        lock.get("lock_key").is_none(),
        "the key is never shown again: {lock}"
    );

    // Locked: pushes need the key (none, or a wrong one, is 423).
    for push in [
        json!({"instance_id": source}),
        json!({"instance_id": source, "lock_key": "lk_not-the-key"}),
    ] {
        let (status, body) = stack
            .send(
                stack
                    .request(Method::POST, "/berth/v1/presets/shop/versions")
                    .json(&push),
            )
            .await
            .unwrap();
        assert_eq!(status, 423, "{push}: {body}");
    }
    let v3 = accepted(
        stack,
        Method::POST,
        "/berth/v1/presets/shop/versions",
        json!({
            "instance_id": source, "lock_key": key, "description": "locked push",
        }),
    )
    .await;
    assert_eq!(v3["version"], 3);
    stack.assert_task_succeeded(&v3, WAIT).await;
    let (status, _) = stack
        .send(
            stack
                .request(Method::DELETE, "/berth/v1/presets/shop/lock")
                .json(&json!({"lock_key": "lk_wrong"})),
        )
        .await
        .unwrap();
    assert_eq!(status, 403);
    let (status, _) = stack
        .send(
            stack
                .request(Method::DELETE, "/berth/v1/presets/shop/lock")
                .json(&json!({"lock_key": key})),
        )
        .await
        .unwrap();
    assert_eq!(status, 200);
}

/// `shop`'s versions, newest first: three, all ready and non-empty, with their authors and descriptions.
async fn change_log(stack: &Stack) -> Vec<Value> {
    let (_, shown) = stack
        .send(stack.request(Method::GET, "/berth/v1/presets/shop"))
        .await
        .unwrap();
    let versions = shown["versions"].as_array().unwrap();
    assert_eq!(versions.len(), 3, "{shown}");
    assert!(
        versions
            .iter()
            .all(|v| v["state"] == "ready" && v["size_bytes"].as_i64().unwrap() > 0),
        "{shown}"
    );
    assert_eq!(versions[2]["created_by"], "alice");
    assert_eq!(versions[1]["description"], "three items");
    versions.clone()
}

/// Three instances from version 1 (the first restores the template, the others clone it; the app owns the
/// table), and one template database, for version 1. Returns the instances.
async fn three_instances_from_version_one(
    stack: &Stack,
    ids: &(String, String),
    versions: &[Value],
) -> Vec<String> {
    let mut made = Vec::new();
    for _ in 0..3 {
        let (instance, url) = provision(
            stack,
            ids,
            json!({"preset": {"name": "shop", "version": 1}}),
        )
        .await;
        assert_eq!(names(&url).await, ["a", "b"]);
        // The app owns what the preset brought: it can change the table.
        sql(&url, "ALTER TABLE items ADD COLUMN note text;").await;
        made.push(instance);
    }
    let v1_id = versions[2]["id"].as_str().unwrap().replace('-', "");
    let templates = databases_like(stack, &format!("{}tpl_%", stack.name_prefix)).await;
    assert_eq!(
        templates,
        [format!("{}tpl_{v1_id}", stack.name_prefix)],
        "one template, for version 1"
    );
    made
}

/// Selects version 1 of `shop` for the source (berth's endpoint), then version 2 (an OSB update); the source's
/// binding sees each.
async fn select_version_one_then_two(
    stack: &Stack,
    ids: &(String, String),
    source: &str,
    source_url: &str,
) {
    let (status, body) = stack
        .send(
            stack
                .request(
                    Method::POST,
                    &format!("/berth/v1/instances/{source}/select"),
                )
                .json(&json!({"preset": "shop", "version": 1})),
        )
        .await
        .unwrap();
    assert_eq!(status, 202, "{body}");
    stack
        .wait_succeeded(&format!("/v2/service_instances/{source}"), WAIT)
        .await;
    assert_eq!(names(source_url).await, ["a", "b"]);
    // And an OSB update naming a preset selects it too.
    let (status, body) = stack
        .send(
            stack
                .request(
                    Method::PATCH,
                    &format!("/v2/service_instances/{source}?accepts_incomplete=true"),
                )
                .json(&json!({
                    "service_id": ids.0, "parameters": {"preset": {"name": "shop", "version": 2}},
                })),
        )
        .await
        .unwrap();
    assert_eq!(status, 202, "{body}");
    stack
        .wait_succeeded(&format!("/v2/service_instances/{source}"), WAIT)
        .await;
    assert_eq!(names(source_url).await, ["a", "b", "c"]);
}

/// A provision naming an unknown preset, or a missing version, is 400 and makes nothing.
async fn assert_unknown_presets_are_refused(stack: &Stack, ids: &(String, String)) {
    for parameters in [
        json!({"preset": "nope"}),
        json!({"preset": {"name": "shop", "version": 9}}),
    ] {
        let id = uuid::Uuid::new_v4();
        let (status, body) = stack
            .send(stack.request(Method::PUT, &format!("/v2/service_instances/{id}?accepts_incomplete=true")).json(&json!({
                "service_id": ids.0, "plan_id": ids.1, "organization_guid": "o", "space_guid": "s", "parameters": parameters,
            })))
            .await
            .unwrap();
        assert_eq!(status, 400, "{body}");
        let (status, _) = stack
            .send(stack.request(Method::GET, &format!("/v2/service_instances/{id}")))
            .await
            .unwrap();
        assert_eq!(status, 404);
    }
}

#[tokio::test]
async fn presets_through_a_file_store() {
    let stack = Stack::start().await.unwrap();
    preset_round_trip(&stack).await;
    let objects = files_under(&stack.dir.join("snapshots"), ".bsnap");
    assert_eq!(
        objects.len(),
        4,
        "three versions of shop and one of race: {objects:?}"
    );
    assert!(files_under(&stack.dir.join("snapshots"), ".partial").is_empty());
    stack.stop().await;
}

#[tokio::test]
async fn presets_through_seaweedfs() {
    let url = std::env::var("BERTH_TEST_S3_COMPAT_URL").expect("scripts/test.sh starts SeaweedFS");
    let tag = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let stack = Stack::start_with(vec![
        (
            "SNAPSHOT_STORE_URL",
            format!("s3://berth-snapshots-{tag}/e2e"),
        ),
        ("SNAPSHOT_S3_ENDPOINT", url),
        (
            "SNAPSHOT_S3_ACCESS_KEY",
            std::env::var("BERTH_TEST_S3_COMPAT_ACCESS_KEY").unwrap(),
        ),
        (
            "SNAPSHOT_S3_SECRET_KEY",
            std::env::var("BERTH_TEST_S3_COMPAT_SECRET_KEY").unwrap(),
        ),
    ])
    .await
    .unwrap();
    preset_round_trip(&stack).await;
    assert!(
        files_under(&stack.dir.join("snapshots"), ".bsnap").is_empty(),
        "nothing went to the file store"
    );
    stack.stop().await;
}

/// A truncated object and a flipped byte each fail the select with a clear message and leave the instance's
/// database exactly as it was; a worker with a wrong snapshot key refuses to start.
#[tokio::test]
async fn a_wrong_key_or_a_damaged_object_changes_nothing() {
    let mut stack = Stack::start().await.unwrap();
    let ids = shared_ids(&stack).await;
    let (instance, url) = provision(&stack, &ids, json!({})).await;
    sql(&url, "CREATE TABLE items (id int PRIMARY KEY, name text); INSERT INTO items VALUES (1, 'preset');").await;
    // post_restore_sql runs once in the server's template, as the preset's objects' owner.
    let pushed = accepted(&stack, Method::POST, "/berth/v1/presets", json!({
        "name": "p", "instance_id": instance, "post_restore_sql": "UPDATE items SET name = name || ' (migrated)';",
    }))
    .await;
    stack.assert_task_succeeded(&pushed, WAIT).await;
    sql(&url, "UPDATE items SET name = 'live data';").await;

    let object = files_under(&stack.dir.join("snapshots"), ".bsnap")
        .pop()
        .expect("the preset's object");
    let original = std::fs::read(&object).unwrap();

    // A flipped byte in the middle.
    let mut flipped = original.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0x01;
    std::fs::write(&object, &flipped).unwrap();
    let last = select_preset(&stack, &instance, "p").await;
    assert_eq!(last["state"], "failed", "{last}");
    let why = last["description"].as_str().unwrap();
    assert!(
        why.contains("corrupted") || why.contains("SHA-256"),
        "{why}"
    );
    assert_eq!(names(&url).await, ["live data"]);

    // A truncated object.
    std::fs::write(&object, &original[..original.len() - 100]).unwrap();
    let last = select_preset(&stack, &instance, "p").await;
    assert_eq!(last["state"], "failed", "{last}");
    assert!(
        last["description"].as_str().unwrap().contains("damaged"),
        "{last}"
    );
    assert_eq!(names(&url).await, ["live data"]);

    // The right object, but a worker with another key: it refuses to start (the broker's database holds the
    // check value of the snapshot key the first worker used), naming the key file.
    std::fs::write(&object, &original).unwrap();
    stack.kill_worker().await;
    let other_key = stack.dir.join("other-snapshot.key");
    broker::crypto::generate_key_file(&other_key).unwrap();
    stack
        .restart_worker(vec![("SNAPSHOT_KEY_FILE", other_key.display().to_string())])
        .unwrap();
    let exited = stack
        .wait_worker_exit(Duration::from_secs(30))
        .await
        .expect("the worker refuses to start");
    assert!(!exited.success());
    let said = stack.log("worker-restarted.log");
    assert!(
        said.contains(&other_key.display().to_string()) && said.contains("SNAPSHOT_KEY_FILE"),
        "{said}"
    );
    assert_eq!(names(&url).await, ["live data"]);
    // Nothing was touched.
    assert!(
        databases_like(&stack, &format!("{}rs_%", stack.name_prefix))
            .await
            .is_empty()
    );

    // With its own key back, the same object restores.
    stack.kill_worker().await;
    stack
        .restart_worker(vec![(
            "SNAPSHOT_KEY_FILE",
            stack.dir.join("snapshot.key").display().to_string(),
        )])
        .unwrap();
    let last = select_preset(&stack, &instance, "p").await;
    assert_eq!(last["state"], "succeeded", "{last}\n{}", stack.logs());
    assert_eq!(names(&url).await, ["preset (migrated)"]);
    deprovision(&stack, &ids, &instance).await;
    stack.stop().await;
}

/// `POST /berth/v1/instances/{id}/select` and the instance's last_operation once it is finished.
async fn select_preset(stack: &Stack, instance: &str, preset: &str) -> Value {
    let request = stack
        .request(
            Method::POST,
            &format!("/berth/v1/instances/{instance}/select"),
        )
        .json(&json!({"preset": preset}));
    let (status, body) = stack.send(request).await.unwrap();
    assert_eq!(status, 202, "{body}");
    let (_, last) = stack
        .wait_operation(
            &format!("/v2/service_instances/{instance}/last_operation"),
            WAIT,
        )
        .await
        .unwrap();
    last
}

async fn backups(stack: &Stack, instance: &str) -> Vec<Value> {
    let (status, body) = stack
        .send(stack.request(
            Method::GET,
            &format!("/berth/v1/instances/{instance}/backups"),
        ))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    body["backups"].as_array().unwrap().clone()
}

/// Scheduled backups fire and are pruned to the retention; a backup restores data deleted after it, into the
/// same instance and into a new one.
#[tokio::test]
async fn backups_fire_prune_and_restore() {
    let stack = Stack::start_with(vec![("BACKUP_SCHEDULER_MS", "200".into())])
        .await
        .unwrap();
    let ids = shared_ids(&stack).await;
    let (instance, url) = provision(
        &stack,
        &ids,
        json!({"backups": {"schedule": "*/2 * * * * *", "retention": 2}}),
    )
    .await;
    sql(
        &url,
        "CREATE TABLE items (id int PRIMARY KEY, name text); INSERT INTO items VALUES (1, 'kept');",
    )
    .await;

    // The schedule fires every 2 s; retention keeps the newest 2. A backup prunes the old ones just after it
    // is ready, so a list read in between shows one more, never two more.
    let mut seen = std::collections::BTreeSet::new();
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let list = backups(&stack, &instance).await;
        for b in &list {
            if b["state"] == "ready" {
                seen.insert(b["id"].as_str().unwrap().to_string());
            }
        }
        let ready = list.iter().filter(|b| b["state"] == "ready").count();
        assert!(
            ready <= 3,
            "retention 2 but {ready} ready backups: {list:?}"
        );
        if seen.len() >= 4 && ready <= 2 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "backups did not fire, or were not pruned to 2: {list:?}\n{}",
            stack.logs()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Stop the schedule; pruned objects are gone from the store.
    let (status, body) = stack
        .send(
            stack
                .request(
                    Method::PATCH,
                    &format!("/v2/service_instances/{instance}?accepts_incomplete=true"),
                )
                .json(&json!({
                    "service_id": ids.0, "parameters": {"backups": null},
                })),
        )
        .await
        .unwrap();
    assert_eq!(status, 202, "{body}");
    stack
        .wait_operation(
            &format!("/v2/service_instances/{instance}/last_operation"),
            WAIT,
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ready: Vec<Value> = backups(&stack, &instance)
        .await
        .into_iter()
        .filter(|b| b["state"] == "ready")
        .collect();
    let objects = files_under(&stack.dir.join("snapshots").join("backups"), ".bsnap");
    assert_eq!(objects.len(), ready.len(), "{objects:?} vs {ready:?}");

    // Take one now, lose data, restore it.
    sql(&url, "INSERT INTO items VALUES (2, 'also kept');").await;
    let taken = accepted(
        &stack,
        Method::POST,
        &format!("/berth/v1/instances/{instance}/backups"),
        json!({}),
    )
    .await;
    stack.assert_task_succeeded(&taken, WAIT).await;
    let backup = taken["backup_id"].as_str().unwrap().to_string();
    sql(
        &url,
        "DELETE FROM items; INSERT INTO items VALUES (3, 'after the backup');",
    )
    .await;
    let restore = accepted(
        &stack,
        Method::POST,
        &format!("/berth/v1/instances/{instance}/backups/{backup}/restore"),
        json!({}),
    )
    .await;
    assert!(restore["operation"].is_string());
    stack
        .wait_succeeded(&format!("/v2/service_instances/{instance}"), WAIT)
        .await;
    assert_eq!(names(&url).await, ["kept", "also kept"]);

    // The Akkeris face lists the same backups.
    let (status, body) = stack
        .send(stack.request(
            Method::GET,
            &format!("/v2/service_instances/{instance}/actions/backups"),
        ))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(
        body["backups"]
            .as_array()
            .unwrap()
            .iter()
            .any(|b| b["id"] == backup.as_str())
    );

    // A new instance from the backup.
    let (copy, copy_url) = provision(
        &stack,
        &ids,
        json!({"restore_from": {"instance": instance, "backup": backup}}),
    )
    .await;
    assert_eq!(names(&copy_url).await, ["kept", "also kept"]);

    // Deprovision keeps the backups (the default): still listed after the instance is gone.
    deprovision(&stack, &ids, &instance).await;
    assert!(
        backups(&stack, &instance)
            .await
            .iter()
            .any(|b| b["id"] == backup.as_str())
    );
    deprovision(&stack, &ids, &copy).await;
    stack.stop().await;
}

/// A worker killed with SIGKILL in the middle of an upload leaves no object counted as a backup; the task is
/// picked up again once its lease runs out and the backup completes.
#[tokio::test]
async fn a_worker_killed_during_upload_leaves_no_half_backup() {
    let mut stack = Stack::start_with(vec![("WORKER_LEASE_SECS", "3".into())])
        .await
        .unwrap();
    let ids = shared_ids(&stack).await;
    let (instance, url) = provision(&stack, &ids, json!({})).await;
    // About 40 MB of text that compresses poorly, so the dump takes a while.
    sql(
        &url,
        "CREATE TABLE items (id int PRIMARY KEY, name text);
         INSERT INTO items SELECT g, md5(random()::text) || md5(random()::text) || md5(random()::text)
                                    || md5(random()::text) FROM generate_series(1, 300000) g;",
    )
    .await;
    let taken = accepted(
        &stack,
        Method::POST,
        &format!("/berth/v1/instances/{instance}/backups"),
        json!({}),
    )
    .await;
    let operation = taken["operation"].as_str().unwrap().to_string();
    let backup = taken["backup_id"].as_str().unwrap().to_string();
    // A second backup is refused while this one runs.
    let (status, body) = stack
        .send(stack.request(
            Method::POST,
            &format!("/berth/v1/instances/{instance}/backups"),
        ))
        .await
        .unwrap();
    assert_eq!(status, 409, "{body}");

    // Kill the worker once the upload is under way.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let (_, task) = stack
            .send(stack.request(Method::GET, &format!("/berth/v1/tasks/{operation}")))
            .await
            .unwrap();
        let uploading = !files_under(&stack.dir.join("snapshots"), ".partial").is_empty();
        if task["state"] == "running" && uploading {
            break;
        }
        assert_ne!(
            task["state"], "succeeded",
            "the backup finished before the worker could be killed"
        );
        assert!(std::time::Instant::now() < deadline, "{task}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stack.kill_worker().await;
    let listed = backups(&stack, &instance).await;
    let row = listed.iter().find(|b| b["id"] == backup.as_str()).unwrap();
    assert_eq!(row["state"], "pending", "{row}");
    assert!(
        files_under(&stack.dir.join("snapshots"), ".bsnap").is_empty(),
        "no complete object"
    );

    // Another worker finishes it: one object, no partial left, the backup restorable.
    stack.restart_worker(vec![]).unwrap();
    let task = stack.wait_task(&operation, WAIT).await.unwrap();
    assert_eq!(task["state"], "succeeded", "{task}\n{}", stack.logs());
    assert_eq!(files_under(&stack.dir.join("snapshots"), ".bsnap").len(), 1);
    assert!(files_under(&stack.dir.join("snapshots"), ".partial").is_empty());
    let listed = backups(&stack, &instance).await;
    assert_eq!(
        listed.iter().filter(|b| b["state"] == "ready").count(),
        1,
        "{listed:?}"
    );
    deprovision(&stack, &ids, &instance).await;
    stack.stop().await;
}
