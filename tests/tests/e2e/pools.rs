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
        "SELECT id, state, details, secrets FROM pool_items WHERE plan_id = $1 ORDER BY created_at",
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
    assert_eq!(status, 410);
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
        let (status, _) = stack
            .delete_until_done(&format!("/v2/service_instances/{id}"), &ids, WAIT)
            .await;
        assert_eq!(status, 410);
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
    stack.kill_worker().await;
    stack
        .restart_worker(vec![("POOL_TARGETS", "dedicated=0".into())])
        .unwrap();
    let deadline = Instant::now() + WAIT;
    while !pool_items(&stack, &ids.1).await.is_empty() {
        assert!(
            Instant::now() < deadline,
            "the pool never drained\n{}",
            stack.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
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
