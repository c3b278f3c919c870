//! Warm pools (docs/pools.md) with the real binaries: a hit answered at once and finished as the instance
//! (new names, every password replaced), a miss taking the ordinary path, concurrent provisions never sharing
//! an item, a filler killed midway leaving nothing behind, recycling, draining, and the pool metrics.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use berth_tests::{PG_SERVICE, PG_SHARED, Stack, plan_ids, processes_under};
use reqwest::Method;
use serde_json::{Value, json};
use sqlx::{Connection, PgConnection};

/// initdb and the first start take seconds on a busy 2-core machine; leave room.
const WAIT: Duration = Duration::from_secs(180);

#[derive(Debug, Clone)]
pub(crate) struct Item {
    pub(crate) id: String,
    pub(crate) state: String,
    pub(crate) details: Value,
    pub(crate) secrets: Option<Vec<u8>>,
}

pub(crate) async fn pool_items(stack: &Stack, plan_id: &str) -> Vec<Item> {
    let mut db = PgConnection::connect(&stack.broker_db_url).await.unwrap();
    let rows: Vec<(String, String, Value, Option<Vec<u8>>)> = sqlx::query_as(
        "SELECT id, state, details, secrets FROM pool_items WHERE plan_id = $1
         ORDER BY ready_at NULLS LAST, created_at",
    )
    .bind(plan_id)
    .fetch_all(&mut db)
    .await
    .unwrap();
    db.close().await.unwrap();
    rows.into_iter()
        .map(|(id, state, details, secrets)| Item {
            id,
            state,
            details,
            secrets,
        })
        .collect()
}

/// Waits until `plan_id`'s pool holds exactly `count` items, all ready; returns them.
pub(crate) async fn wait_pool(
    stack: &Stack,
    plan_id: &str,
    count: usize,
    timeout: Duration,
) -> Vec<Item> {
    let deadline = Instant::now() + timeout;
    loop {
        let items = pool_items(stack, plan_id).await;
        if items.len() == count && items.iter().all(|i| i.state == "ready") {
            return items;
        }
        assert!(
            Instant::now() < deadline,
            "the pool of {plan_id} never held {count} ready items: {items:?}\n{}",
            stack.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Restarts the worker with `POOL_TARGETS` = `targets` (a target of 0) and waits until `plan_id`'s pool is empty.
pub(crate) async fn drain_by_restart(
    stack: &mut Stack,
    plan_id: &str,
    targets: &str,
    timeout: Duration,
) {
    stack.kill_worker().await;
    stack
        .restart_worker(vec![("POOL_TARGETS", targets.to_string())])
        .unwrap();
    let deadline = Instant::now() + timeout;
    while !pool_items(stack, plan_id).await.is_empty() {
        assert!(
            Instant::now() < deadline,
            "the pool never drained\n{}",
            stack.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// PUT without `accepts_incomplete` (a platform that cannot poll).
pub(crate) async fn provision_sync(stack: &Stack, instance: &str, body: &Value) -> (u16, Value) {
    stack
        .send(
            stack
                .request(Method::PUT, &format!("/v2/service_instances/{instance}"))
                .json(body),
        )
        .await
        .unwrap()
}

pub(crate) fn body(ids: &(String, String), parameters: Value) -> Value {
    json!({
        "service_id": ids.0, "plan_id": ids.1, "organization_guid": "org", "space_guid": "space",
        "parameters": parameters,
    })
}

pub(crate) async fn metrics(stack: &Stack) -> String {
    stack
        .request(Method::GET, "/metrics")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The value of the sample of `name` whose labels include `plan="<plan>"` (and `extra`, if given).
pub(crate) fn sample(text: &str, name: &str, plan: &str, extra: &str) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter(|l| l.contains(&format!("plan=\"{plan}\"")) && l.contains(extra))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
}

async fn database_exists(stack: &Stack, database: &str) -> bool {
    let mut admin = stack.admin().await.unwrap();
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
        .bind(database)
        .fetch_one(&mut admin)
        .await
        .unwrap()
}

#[tokio::test]
async fn shared_pool_hit_is_answered_at_once_renamed_and_refilled() {
    let stack = Stack::start_with(vec![
        ("POOL_TARGETS", "shared=2".into()),
        ("POOL_CHECK_MS", "200".into()),
    ])
    .await
    .unwrap();
    let ids = (PG_SERVICE.to_string(), PG_SHARED.to_string());
    let items = wait_pool(&stack, PG_SHARED, 2, WAIT).await;
    let pooled_db = items[0].details["database"].as_str().unwrap().to_string();
    assert!(database_exists(&stack, &pooled_db).await);

    // A hit: 201 without accepts_incomplete, the oldest item taken, its database renamed for the instance.
    let instance = uuid::Uuid::new_v4().to_string();
    let started = Instant::now();
    let (status, answer) = provision_sync(&stack, &instance, &body(&ids, json!({}))).await;
    let took = started.elapsed();
    assert_eq!(status, 201, "{answer}\n{}", stack.logs());
    let details = stack.instance_details(&instance).await;
    assert_eq!(details["pool_item"], json!(items[0].id), "{details}");
    let database = broker::names::instance_database(&stack.name_prefix, &instance);
    assert_eq!(details["database"], json!(database));
    assert!(database_exists(&stack, &database).await);
    assert!(
        !database_exists(&stack, &pooled_db).await,
        "the item's name survived"
    );
    println!("shared provision from the pool answered in {took:?}");

    // The instance works like any other: a binding connects to its database.
    let binding = format!("/v2/service_instances/{instance}/service_bindings/b1");
    stack
        .put_until_done(
            &binding,
            &json!({"service_id": ids.0, "plan_id": ids.1}),
            WAIT,
        )
        .await;
    let url = stack.fetch_credentials(&binding).await["DATABASE_URL"]
        .as_str()
        .unwrap()
        .to_string();
    let mut conn = PgConnection::connect(&url).await.unwrap();
    sqlx::raw_sql("CREATE TABLE t (id int)")
        .execute(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();

    // Refilled to its target; the metrics count the hit and the items apart from the instances.
    wait_pool(&stack, PG_SHARED, 2, WAIT).await;
    let text = metrics(&stack).await;
    assert_eq!(
        sample(&text, "berth_pool_hits_total", "shared", ""),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "berth_pool_items", "shared", "state=\"ready\""),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "berth_service_instances", "shared", ""),
        Some(1.0),
        "{text}"
    );

    // Deprovisioned like any instance: its database goes.
    let (status, _) = stack
        .delete_until_done(&format!("/v2/service_instances/{instance}"), &ids, WAIT)
        .await;
    assert_eq!(status, 410, "{}", stack.logs());
    assert!(!database_exists(&stack, &database).await);
    stack.stop().await;
}

#[tokio::test]
async fn dedicated_pool_hit_renames_and_replaces_every_password_and_a_miss_falls_back() {
    let stack = Stack::start_with(vec![
        ("POOL_TARGETS", "dedicated=1".into()),
        ("POOL_CHECK_MS", "200".into()),
    ])
    .await
    .unwrap();
    let ids = plan_ids(&stack.catalog().await.unwrap(), "postgres", "dedicated");
    let item = wait_pool(&stack, &ids.1, 1, WAIT).await.remove(0);
    let port = item.details["port"].as_u64().unwrap();
    let server_dir = std::path::PathBuf::from(item.details["server_dir"].as_str().unwrap());
    let cipher = broker::crypto::Cipher::from_key_files(&[stack.dir.join("master.key")]).unwrap();
    let pooled: Value = cipher.open_json(item.secrets.as_ref().unwrap()).unwrap();
    let pooled_admin_password = pooled["admin_password"].as_str().unwrap().to_string();
    let pooled_superuser_password =
        std::fs::read_to_string(server_dir.join("superuser-password")).unwrap();
    let old_admin_url = |user: &str, db: &str| {
        format!("postgres://{user}:{pooled_admin_password}@127.0.0.1:{port}/{db}?sslmode=require")
    };
    // The item works with what it was made with, before it is taken.
    PgConnection::connect(&old_admin_url("app_admin", "app"))
        .await
        .expect("the pooled admin logs in before the item is taken")
        .close()
        .await
        .unwrap();

    // A hit, with names the finishing step applies: 201 at once without accepts_incomplete.
    let instance = uuid::Uuid::new_v4().to_string();
    let parameters =
        json!({"app_db_name": "orders", "admin_user": "boss", "extensions": ["pgcrypto"]});
    let started = Instant::now();
    let (status, answer) = provision_sync(&stack, &instance, &body(&ids, parameters)).await;
    let took = started.elapsed();
    assert_eq!(status, 201, "{answer}\n{}", stack.logs());
    println!("dedicated provision from the pool answered in {took:?}");
    for line in stack
        .log("worker.log")
        .lines()
        .filter(|l| l.contains("adopted"))
    {
        println!("{line}");
    }
    let details = stack.instance_details(&instance).await;
    assert_eq!(details["pool_item"], json!(item.id));
    assert_eq!(details["port"], json!(port));
    assert_eq!(details["app_db_name"], json!("orders"));
    assert_eq!(details["admin_user"], json!("boss"));

    // No credential made while pooled survives: the old admin (under either name) and the old superuser
    // password are refused.
    for url in [
        old_admin_url("app_admin", "app"),
        old_admin_url("boss", "orders"),
    ] {
        assert!(
            PgConnection::connect(&url).await.is_err(),
            "a pooled credential still logs in: {url}"
        );
    }
    let superuser = format!(
        "postgres://postgres:{}@127.0.0.1:{port}/postgres?sslmode=require",
        pooled_superuser_password.trim()
    );
    assert!(
        PgConnection::connect(&superuser).await.is_err(),
        "the pooled superuser password still logs in"
    );
    // The instance's own admin password works, on the renamed database, with the extension.
    let secrets: Value = {
        let mut db = PgConnection::connect(&stack.broker_db_url).await.unwrap();
        let sealed: Vec<u8> =
            sqlx::query_scalar("SELECT secrets FROM service_instances WHERE id = $1")
                .bind(&instance)
                .fetch_one(&mut db)
                .await
                .unwrap();
        cipher.open_json(&sealed).unwrap()
    };
    let admin_url = format!(
        "postgres://boss:{}@127.0.0.1:{port}/orders?sslmode=require",
        secrets["admin_password"].as_str().unwrap()
    );
    let mut conn = PgConnection::connect(&admin_url).await.unwrap();
    let digest: String = sqlx::query_scalar("SELECT encode(digest('x', 'sha256'), 'hex')")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(digest.len(), 64);
    conn.close().await.unwrap();

    // A binding works on the renamed database.
    let binding = format!("/v2/service_instances/{instance}/service_bindings/b1");
    stack
        .put_until_done(
            &binding,
            &json!({"service_id": ids.0, "plan_id": ids.1}),
            WAIT,
        )
        .await;
    let url = stack.fetch_credentials(&binding).await["DATABASE_URL"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(url.contains("/orders?"), "{url}");
    PgConnection::connect(&url)
        .await
        .unwrap()
        .close()
        .await
        .unwrap();

    // A miss: a tuning profile the pool cannot serve. Without accepts_incomplete it is 422 AsyncRequired
    // (nothing written); with it, the ordinary path builds a server of its own.
    let other = uuid::Uuid::new_v4().to_string();
    let miss = body(&ids, json!({"tuning_profile": "web"}));
    let (status, answer) = provision_sync(&stack, &other, &miss).await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (422, Some("AsyncRequired")),
        "{answer}"
    );
    let path = format!("/v2/service_instances/{other}");
    stack.put_until_done(&path, &miss, WAIT).await;
    let details = stack.instance_details(&other).await;
    assert!(details.get("pool_item").is_none(), "{details}");
    let text = metrics(&stack).await;
    assert_eq!(
        sample(&text, "berth_pool_hits_total", "dedicated", ""),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "berth_pool_misses_total", "dedicated", ""),
        Some(2.0),
        "{text}"
    );

    // Deprovisioning removes the pooled server's folder (named after the item) like any other.
    for id in [&instance, &other] {
        let (status, last) = stack
            .delete_until_done(&format!("/v2/service_instances/{id}"), &ids, WAIT)
            .await;
        assert_eq!(status, 410, "deprovision of {id}: {last}\n{}", stack.logs());
    }
    assert!(
        !server_dir.exists(),
        "{} survived deprovision",
        server_dir.display()
    );
    stack.stop().await;
}

#[tokio::test]
async fn concurrent_provisions_never_get_the_same_item() {
    let stack = Stack::start_with(vec![
        ("POOL_TARGETS", "shared=3".into()),
        ("POOL_CHECK_MS", "200".into()),
    ])
    .await
    .unwrap();
    let ids = (PG_SERVICE.to_string(), PG_SHARED.to_string());
    wait_pool(&stack, PG_SHARED, 3, WAIT).await;
    let stack = Arc::new(stack);
    const REQUESTS: usize = 8;
    let barrier = Arc::new(tokio::sync::Barrier::new(REQUESTS));
    let mut handles = Vec::new();
    for _ in 0..REQUESTS {
        let (stack, barrier, ids) = (stack.clone(), barrier.clone(), ids.clone());
        handles.push(tokio::spawn(async move {
            let instance = uuid::Uuid::new_v4().to_string();
            let body = body(&ids, json!({}));
            barrier.wait().await;
            let (status, answer) = provision_sync(&stack, &instance, &body).await;
            assert_eq!(status, 201, "{answer}");
            instance
        }));
    }
    let mut taken = Vec::new();
    for handle in handles {
        let instance = handle.await.unwrap();
        if let Some(item) = stack.instance_details(&instance).await["pool_item"].as_str() {
            taken.push(item.to_string());
        }
    }
    let hits = taken.len();
    taken.sort();
    taken.dedup();
    assert_eq!(taken.len(), hits, "two provisions got the same item");
    // At least the three items waiting; a refill finished during the burst may serve more.
    assert!(hits >= 3, "{hits} hits from a pool of 3");
    let text = metrics(&stack).await;
    assert_eq!(
        sample(&text, "berth_pool_hits_total", "shared", ""),
        Some(hits as f64)
    );
    assert_eq!(
        sample(&text, "berth_pool_misses_total", "shared", ""),
        Some((REQUESTS - hits) as f64)
    );
    Arc::try_unwrap(stack).ok().unwrap().stop().await;
}

#[tokio::test]
async fn a_filler_killed_midway_leaves_nothing_and_a_drained_pool_leaves_nothing() {
    // A short lease: the killed worker's fill comes back to the queue soon.
    let mut stack = Stack::start_with(vec![
        ("POOL_TARGETS", "dedicated=1".into()),
        ("POOL_CHECK_MS", "100".into()),
        ("WORKER_LEASE_SECS", "3".into()),
    ])
    .await
    .unwrap();
    let ids = plan_ids(&stack.catalog().await.unwrap(), "postgres", "dedicated");
    // Kill the worker while the item's server is being made (its folder exists, the item is not ready).
    let deadline = Instant::now() + WAIT;
    let item = loop {
        let items = pool_items(&stack, &ids.1).await;
        let partly_made = items.iter().find(|i| {
            i.state == "filling"
                && std::fs::read_dir(&stack.servers_dir).is_ok_and(|mut d| d.next().is_some())
        });
        if let Some(item) = partly_made {
            break item.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no fill seen under way: {items:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    stack.kill_worker().await;
    // Another worker finishes the same item (the same idempotent steps), and only it exists.
    stack.restart_worker(Vec::new()).unwrap();
    let ready = wait_pool(&stack, &ids.1, 1, WAIT).await;
    assert_eq!(ready[0].id, item.id, "the killed fill was not finished");
    let folders: Vec<_> = std::fs::read_dir(&stack.servers_dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(folders.len(), 1, "{folders:?}");

    // The target drops to zero: the pool drains, and nothing of the item is left.
    drain_by_restart(&mut stack, &ids.1, "dedicated=0", WAIT).await;
    let left: Vec<_> = std::fs::read_dir(&stack.servers_dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "{left:?}");
    assert!(processes_under(&stack.servers_dir).is_empty());
    stack.stop().await;
}

#[tokio::test]
async fn old_items_are_recycled() {
    let stack = Stack::start_with(vec![
        ("POOL_TARGETS", "shared=1".into()),
        ("POOL_CHECK_MS", "200".into()),
        ("POOL_MAX_AGE_SECS", "2".into()),
    ])
    .await
    .unwrap();
    let first = wait_pool(&stack, PG_SHARED, 1, WAIT).await.remove(0);
    let first_db = first.details["database"].as_str().unwrap().to_string();
    // Older than 2 s: removed (its database with it) and replaced by a new item.
    let deadline = Instant::now() + WAIT;
    loop {
        let items = pool_items(&stack, PG_SHARED).await;
        if items.len() == 1 && items[0].state == "ready" && items[0].id != first.id {
            break;
        }
        assert!(Instant::now() < deadline, "never recycled: {items:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let deadline = Instant::now() + WAIT;
    while database_exists(&stack, &first_db).await {
        assert!(
            Instant::now() < deadline,
            "the recycled item's database survived"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stack.stop().await;
}

/// The broker database's pool items of `plan_id` as (id, state, preset_target, preset_snapshot_id, details).
async fn clone_rows(
    stack: &Stack,
    plan_id: &str,
) -> Vec<(String, String, Option<String>, Option<uuid::Uuid>, Value)> {
    let mut db = PgConnection::connect(&stack.broker_db_url).await.unwrap();
    let rows = sqlx::query_as(
        "SELECT id, state, preset_target, preset_snapshot_id, details FROM pool_items
         WHERE plan_id = $1 ORDER BY created_at",
    )
    .bind(plan_id)
    .fetch_all(&mut db)
    .await
    .unwrap();
    db.close().await.unwrap();
    rows
}

/// Waits until the pool of `plan_id` holds exactly `plain` ready items of its defaults and `clones` ready
/// clones of `snapshot`, and nothing else; returns the clones' ids and databases.
async fn wait_clones(
    stack: &Stack,
    plan_id: &str,
    plain: usize,
    clones: usize,
    snapshot: Option<uuid::Uuid>,
) -> Vec<(String, String)> {
    let deadline = Instant::now() + WAIT;
    loop {
        let rows = clone_rows(stack, plan_id).await;
        let ready_plain = rows
            .iter()
            .filter(|r| r.1 == "ready" && r.3.is_none())
            .count();
        let ready_clones: Vec<_> = rows
            .iter()
            .filter(|r| r.1 == "ready" && r.3.is_some() && r.3 == snapshot)
            .map(|r| {
                (
                    r.0.clone(),
                    r.4["database"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect();
        if ready_plain == plain && ready_clones.len() == clones && rows.len() == plain + clones {
            return ready_clones;
        }
        assert!(
            Instant::now() < deadline,
            "the pools never held {plain} plain items and {clones} clones of {snapshot:?}: {rows:?}\n{}",
            stack.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The snapshot of version `version` of preset `name`.
async fn preset_snapshot(stack: &Stack, name: &str, version: i32) -> uuid::Uuid {
    let mut db = PgConnection::connect(&stack.broker_db_url).await.unwrap();
    let id = sqlx::query_scalar(
        "SELECT s.id FROM snapshots s JOIN presets p ON p.id = s.preset_id
         WHERE p.name = $1 AND s.version = $2",
    )
    .bind(name)
    .bind(version)
    .fetch_one(&mut db)
    .await
    .unwrap();
    db.close().await.unwrap();
    id
}

/// POSTs to a `/berth/v1` preset route and waits for its task to succeed.
async fn push_preset(stack: &Stack, path: &str, body: Value) {
    let (status, answer) = stack
        .send(stack.request(Method::POST, path).json(&body))
        .await
        .unwrap();
    assert_eq!(status, 202, "{path}: {answer}\n{}", stack.logs());
    stack.assert_task_succeeded(&answer, WAIT).await;
}

/// Provisions with `accepts_incomplete` and polls `last_operation` every 5 ms; returns the instance id and the
/// time from the PUT to `succeeded`.
async fn provision_timed(
    stack: &Stack,
    ids: &(String, String),
    parameters: Value,
) -> (String, Duration) {
    let instance = uuid::Uuid::new_v4().to_string();
    let path = format!("/v2/service_instances/{instance}");
    let started = Instant::now();
    let (status, answer) = stack
        .send(
            stack
                .request(Method::PUT, &format!("{path}?accepts_incomplete=true"))
                .json(&body(ids, parameters)),
        )
        .await
        .unwrap();
    assert!(
        status == 202 || status == 201,
        "{status} {answer}\n{}",
        stack.logs()
    );
    loop {
        let (status, last) = stack
            .send(stack.request(Method::GET, &format!("{path}/last_operation")))
            .await
            .unwrap();
        assert_eq!(status, 200, "{last}");
        match last["state"].as_str() {
            Some("succeeded") => return (instance, started.elapsed()),
            Some("failed") => panic!("provision failed: {last}\n{}", stack.logs()),
            _ => {}
        }
        assert!(started.elapsed() < WAIT, "provision never finished: {last}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A new binding's DATABASE_URL.
async fn bind_url(stack: &Stack, ids: &(String, String), instance: &str) -> String {
    let path = format!("/v2/service_instances/{instance}/service_bindings/b-{instance}");
    let bind = json!({ "service_id": ids.0, "plan_id": ids.1, "app_guid": "app" });
    stack.put_until_done(&path, &bind, WAIT).await;
    stack.fetch_credentials(&path).await["DATABASE_URL"]
        .as_str()
        .unwrap()
        .to_string()
}

/// The names in the table `items` of the database at `url` (`None`: no such table).
async fn item_names(url: &str) -> Option<Vec<String>> {
    let mut db = PgConnection::connect(url).await.unwrap();
    let exists: bool = sqlx::query_scalar("SELECT to_regclass('items') IS NOT NULL")
        .fetch_one(&mut db)
        .await
        .unwrap();
    let names = if exists {
        Some(
            sqlx::query_scalar("SELECT name FROM items ORDER BY id")
                .fetch_all(&mut db)
                .await
                .unwrap(),
        )
    } else {
        None
    };
    db.close().await.unwrap();
    names
}

async fn wait_databases_gone(stack: &Stack, databases: &[(String, String)]) {
    let deadline = Instant::now() + WAIT;
    for (_, database) in databases {
        while database_exists(stack, database).await {
            assert!(
                Instant::now() < deadline,
                "the removed clone's database {database} survived\n{}",
                stack.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[tokio::test]
async fn preset_clone_pools_serve_their_preset_follow_new_versions_and_drain_on_delete() {
    let stack = Stack::start_with(vec![
        ("POOL_TARGETS", "shared=1,shared/pooled-shop=2".into()),
        ("POOL_CHECK_MS", "200".into()),
    ])
    .await
    .unwrap();
    let ids = (PG_SERVICE.to_string(), PG_SHARED.to_string());
    // The preset does not exist yet: only the plan's own pool fills.
    wait_clones(&stack, PG_SHARED, 1, 0, None).await;

    // A source database with two items, published as version 1.
    let (source, _) = provision_timed(&stack, &ids, json!({})).await;
    let source_url = bind_url(&stack, &ids, &source).await;
    let mut db = PgConnection::connect(&source_url).await.unwrap();
    sqlx::raw_sql("CREATE TABLE items (id int PRIMARY KEY, name text); INSERT INTO items VALUES (1, 'a'), (2, 'b');")
        .execute(&mut db)
        .await
        .unwrap();
    push_preset(
        &stack,
        "/berth/v1/presets",
        json!({"name": "pooled-shop", "instance_id": source}),
    )
    .await;
    let v1 = preset_snapshot(&stack, "pooled-shop", 1).await;
    let clones_v1 = wait_clones(&stack, PG_SHARED, 1, 2, Some(v1)).await;
    // The metrics count the clones apart from the plan's own items.
    let text = metrics(&stack).await;
    assert_eq!(
        sample(
            &text,
            "berth_pool_items",
            "shared",
            "state=\"ready\",pool=\"pooled-shop\""
        ),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "berth_pool_items",
            "shared",
            "state=\"ready\",pool=\"\""
        ),
        Some(1.0),
        "{text}"
    );

    // A hit: the oldest clone becomes the instance, with the preset's data, and the version recorded.
    let (hit, hit_v1_took) = provision_timed(&stack, &ids, json!({"preset": "pooled-shop"})).await;
    let details = stack.instance_details(&hit).await;
    assert_eq!(details["pool_item"], json!(clones_v1[0].0), "{details}");
    assert_eq!(
        details["preset"],
        json!({"namespace": "", "name": "pooled-shop", "version": 1, "snapshot_id": v1}),
        "{details}"
    );
    assert!(
        !database_exists(&stack, &clones_v1[0].1).await,
        "the clone's name survived"
    );
    let hit_url = bind_url(&stack, &ids, &hit).await;
    assert_eq!(
        item_names(&hit_url).await,
        Some(vec!["a".into(), "b".into()])
    );

    // The plan's defaults take the plan's own item, never a clone.
    let plain_item = clone_rows(&stack, PG_SHARED)
        .await
        .into_iter()
        .find(|r| r.1 == "ready" && r.3.is_none())
        .expect("the plan's own item")
        .0;
    let (plain, _) = provision_timed(&stack, &ids, json!({})).await;
    assert_eq!(
        stack.instance_details(&plain).await["pool_item"],
        json!(plain_item)
    );
    let plain_url = bind_url(&stack, &ids, &plain).await;
    assert_eq!(
        item_names(&plain_url).await,
        None,
        "a plain provision got a clone"
    );

    // Another preset is not served by the clones: the ordinary path, which records its version the same way.
    push_preset(
        &stack,
        "/berth/v1/presets",
        json!({"name": "other-shop", "instance_id": source}),
    )
    .await;
    let (other, _) = provision_timed(&stack, &ids, json!({"preset": "other-shop"})).await;
    let details = stack.instance_details(&other).await;
    assert!(details.get("pool_item").is_none(), "{details}");
    assert_eq!(details["preset"]["name"], "other-shop", "{details}");
    assert_eq!(details["preset"]["version"], 1, "{details}");

    // Version 2: the pooled clones of version 1 are recycled (their databases dropped) and replaced.
    sqlx::raw_sql("INSERT INTO items VALUES (3, 'c');")
        .execute(&mut db)
        .await
        .unwrap();
    db.close().await.unwrap();
    push_preset(
        &stack,
        "/berth/v1/presets/pooled-shop/versions",
        json!({"instance_id": source}),
    )
    .await;
    let v2 = preset_snapshot(&stack, "pooled-shop", 2).await;
    let clones_v2 = wait_clones(&stack, PG_SHARED, 1, 2, Some(v2)).await;
    wait_databases_gone(&stack, &clones_v1[1..]).await;

    // The newest version from the pool, beside a miss of the same preset (version 1, no longer pooled, cloned
    // from the template cached on the server by the ordinary path).
    let (hit_v2, hit_took) = provision_timed(&stack, &ids, json!({"preset": "pooled-shop"})).await;
    let details = stack.instance_details(&hit_v2).await;
    assert_eq!(details["pool_item"], json!(clones_v2[0].0), "{details}");
    assert_eq!(details["preset"]["version"], 2, "{details}");
    let url = bind_url(&stack, &ids, &hit_v2).await;
    assert_eq!(
        item_names(&url).await,
        Some(vec!["a".into(), "b".into(), "c".into()])
    );
    let (miss, miss_took) = provision_timed(
        &stack,
        &ids,
        json!({"preset": {"name": "pooled-shop", "version": 1}}),
    )
    .await;
    let details = stack.instance_details(&miss).await;
    assert!(details.get("pool_item").is_none(), "{details}");
    assert_eq!(details["preset"]["snapshot_id"], json!(v1), "{details}");
    let url = bind_url(&stack, &ids, &miss).await;
    assert_eq!(item_names(&url).await, Some(vec!["a".into(), "b".into()]));
    println!(
        "preset provision→succeeded: pool hit {hit_took:?} (first hit {hit_v1_took:?}), miss (template clone) {miss_took:?}"
    );

    // Deleting the preset drains its clones (their databases too), and none are made again.
    wait_clones(&stack, PG_SHARED, 1, 2, Some(v2)).await;
    let pooled: Vec<(String, String)> = clone_rows(&stack, PG_SHARED)
        .await
        .into_iter()
        .filter(|r| r.3.is_some())
        .map(|r| (r.0, r.4["database"].as_str().unwrap().to_string()))
        .collect();
    let (status, answer) = stack
        .send(stack.request(Method::DELETE, "/berth/v1/presets/pooled-shop"))
        .await
        .unwrap();
    assert_eq!(status, 202, "{answer}");
    let deadline = Instant::now() + WAIT;
    while clone_rows(&stack, PG_SHARED)
        .await
        .iter()
        .any(|r| r.2.is_some())
    {
        assert!(
            Instant::now() < deadline,
            "the clones never drained\n{}",
            stack.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_databases_gone(&stack, &pooled).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rows = clone_rows(&stack, PG_SHARED).await;
    assert!(rows.iter().all(|r| r.2.is_none()), "refilled: {rows:?}");
    stack.stop().await;
}
