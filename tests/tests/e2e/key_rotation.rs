//! Rotating the sealing keys under load (docs/keys.md): data sealed with master key A and snapshot key A2, the
//! broker restarted with [B, A] and [B2, A2], `berth-worker rekey` run while provisions, binds and reads go on,
//! then everything restarted with B and B2 alone: every binding, secret and snapshot still opens, and a process
//! with only the old key is refused at start. Prints the figures (re-seal rate, rekey time, API latency with
//! and without a rekey running).

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use berth_tests::{OsbClient, Stack, WebhookReceiver, free_port, plan_ids, run_to_end};
use broker::crypto::{Cipher, KeyId, read_key_file, seal_v1};
use reqwest::Method;
use serde_json::{Value, json};
use sqlx::{Connection, PgConnection};

const WAIT: Duration = Duration::from_secs(120);
/// Sealed rows written straight into the database (half in the old format 1), for a rate worth measuring.
const SYNTHETIC_BINDINGS: usize = 20_000;
const HOOK_SECRET: &str = "hook-secret";

#[tokio::test]
async fn keys_rotate_under_load_and_the_old_keys_can_go() {
    let mut stack = Stack::start().await.unwrap();
    let ids = plan_ids(&stack.catalog().await.unwrap(), "postgres", "shared");
    let hooks = WebhookReceiver::start().await.unwrap();
    let key_a = stack.dir.join("master.key");
    let snapshot_a = stack.dir.join("snapshot.key");

    // Sealed with A: instances with webhook secrets, bindings, a preset (and with A2, made on first use).
    let mut bindings = Vec::new();
    for _ in 0..3 {
        bindings.push(provision_and_bind(&stack.client, &ids, Some(&hooks.url)).await);
    }
    let source_url = stack.fetch_credentials(&bindings[0].1).await["DATABASE_URL"]
        .as_str()
        .unwrap()
        .to_string();
    sql(
        &source_url,
        "CREATE TABLE items (id int PRIMARY KEY, name text); INSERT INTO items VALUES (1, 'a');",
    )
    .await;
    let pushed = post(
        &stack,
        "/berth/v1/presets",
        json!({"name": "keys", "instance_id": bindings[0].0}),
    )
    .await;
    stack.assert_task_succeeded(&pushed, WAIT).await;
    let a = read_key_file(&key_a).unwrap();
    insert_synthetic(&stack, &a).await;

    // [B, A] and [B2, A2] everywhere.
    let (key_b, snapshot_b) = (
        stack.dir.join("master-b.key"),
        stack.dir.join("snapshot-b.key"),
    );
    broker::crypto::generate_key_file(&key_b).unwrap();
    broker::crypto::generate_key_file(&snapshot_b).unwrap();
    let both = keys_env(&[&key_b, &key_a], &[&snapshot_b, &snapshot_a]);
    restart_both(&mut stack, both.clone()).await;

    // The same load without and with a rekey running.
    let baseline = run_load(&stack, &ids, &bindings, None).await;
    let rekey_cmd = stack.command("berth-worker", &both);
    let during = run_load(&stack, &ids, &bindings, Some(rekey_cmd)).await;
    let summary = during.rekey_output.clone().unwrap();
    assert!(during.rekey_ok, "rekey failed: {summary}\n{}", stack.logs());
    println!("rekey summary:\n{summary}");
    println!(
        "API latency without rekey: {}\nAPI latency during rekey:  {}\nrekey wall time {:.2} s; load made {} + {} bindings",
        baseline.latency(),
        during.latency(),
        during.rekey_seconds,
        baseline.made.len(),
        during.made.len()
    );
    assert!(
        summary.contains("retired master keys") && summary.contains(&KeyId::of(&a).to_string()),
        "{summary}"
    );

    // Nothing is sealed with A any more; a second run finds nothing to do.
    let b = read_key_file(&key_b).unwrap();
    assert_eq!(values_not_sealed_with(&stack, &b).await, 0);
    let again = run_rekey(stack.command("berth-worker", &both)).await;
    assert!(again.0, "{}", again.1);
    assert!(
        again.1.contains("secrets: 0 re-sealed") && again.1.contains("snapshots: 0 re-sealed"),
        "{}",
        again.1
    );
    assert_snapshot_objects_resealed(&stack).await;

    // B and B2 alone: everything opens.
    let only_new = keys_env(&[&key_b], &[&snapshot_b]);
    restart_both(&mut stack, only_new.clone()).await;
    let all: Vec<_> = bindings
        .iter()
        .chain(&baseline.made)
        .chain(&during.made)
        .collect();
    for (_, path) in &all {
        let credentials = stack.fetch_credentials(path).await;
        assert!(
            credentials["DATABASE_URL"]
                .as_str()
                .is_some_and(|u| u.starts_with("postgres")),
            "{credentials}"
        );
    }
    assert_synthetic_open_with(&stack, &b).await;
    let restored =
        provision_and_bind_with(&stack.client, &ids, json!({"preset": {"name": "keys"}})).await;
    let url = stack.fetch_credentials(&restored.1).await["DATABASE_URL"]
        .as_str()
        .unwrap()
        .to_string();
    let mut conn = PgConnection::connect(&url).await.unwrap();
    let name: String = sqlx::query_scalar("SELECT name FROM items")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(name, "a");
    conn.close().await.unwrap();

    // A process with only the old keys is refused, naming the key it lacks and the setting.
    assert_refused(
        &stack,
        "berth-api",
        keys_env(&[&key_a], &[&snapshot_b]),
        &KeyId::of(&b).to_string(),
        "BERTH_KEY_FILES",
    )
    .await;
    let b2_id = snapshot_key_in_use(&stack).await;
    assert_refused(
        &stack,
        "berth-worker",
        keys_env(&[&key_b], &[&snapshot_a]),
        &b2_id,
        "SNAPSHOT_KEY_FILES",
    )
    .await;
    // The old key first again is refused too: it was retired.
    assert_refused(
        &stack,
        "berth-api",
        keys_env(&[&key_a, &key_b], &[&snapshot_b]),
        &KeyId::of(&a).to_string(),
        "retired",
    )
    .await;
    stack.stop().await;
}

fn keys_env(
    master: &[&std::path::Path],
    snapshot: &[&std::path::Path],
) -> Vec<(&'static str, String)> {
    let list = |paths: &[&std::path::Path]| {
        paths
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    vec![
        ("BERTH_KEY_FILE", String::new()),
        ("BERTH_KEY_FILES", list(master)),
        ("SNAPSHOT_KEY_FILES", list(snapshot)),
    ]
}

async fn restart_both(stack: &mut Stack, env: Vec<(&'static str, String)>) {
    stack.kill_worker().await;
    stack.restart_worker(env.clone()).unwrap();
    stack.restart_api(env).await.unwrap();
}

/// Provisions a `shared` instance (with a webhook when `hook` is given) and binds it; (instance, binding path).
async fn provision_and_bind(
    client: &OsbClient,
    ids: &(String, String),
    hook: Option<&str>,
) -> (String, String) {
    let parameters = match hook {
        Some(url) => json!({"webhook": {"url": url, "secret": HOOK_SECRET}}),
        None => json!({}),
    };
    provision_and_bind_with(client, ids, parameters).await
}

async fn provision_and_bind_with(
    client: &OsbClient,
    ids: &(String, String),
    parameters: Value,
) -> (String, String) {
    let instance = uuid::Uuid::new_v4().to_string();
    let path = format!("/v2/service_instances/{instance}");
    let body = json!({"service_id": ids.0, "plan_id": ids.1, "organization_guid": "o", "space_guid": "s",
                      "parameters": parameters});
    put_and_wait(client, &path, &body).await;
    let binding = format!("{path}/service_bindings/b-{instance}");
    let body = json!({"service_id": ids.0, "plan_id": ids.1, "app_guid": "app"});
    put_and_wait(client, &binding, &body).await;
    (instance, binding)
}

async fn put_and_wait(client: &OsbClient, path: &str, body: &Value) {
    let (status, answer) = client
        .send(
            client
                .request(Method::PUT, &format!("{path}?accepts_incomplete=true"))
                .json(body),
        )
        .await
        .unwrap();
    assert_eq!(status, 202, "{path}: {answer}");
    let (status, last) = client
        .wait_operation(&format!("{path}/last_operation"), WAIT)
        .await
        .unwrap();
    assert_eq!(
        (status, last["state"].as_str()),
        (200, Some("succeeded")),
        "{path}: {last}"
    );
}

async fn post(stack: &Stack, path: &str, body: Value) -> Value {
    let (status, answer) = stack
        .send(stack.request(Method::POST, path).json(&body))
        .await
        .unwrap();
    assert_eq!(status, 202, "{path}: {answer}");
    answer
}

async fn sql(url: &str, statements: &str) {
    let mut conn = PgConnection::connect(url).await.unwrap();
    sqlx::raw_sql(statements).execute(&mut conn).await.unwrap();
    conn.close().await.unwrap();
}

/// One instance row with sealed secrets (format 1) and many binding rows of it, half format 1, half format 2.
async fn insert_synthetic(stack: &Stack, key: &[u8; 32]) {
    let cipher = Cipher::from_key(key);
    let mut db = PgConnection::connect(&stack.broker_db_url).await.unwrap();
    sqlx::query(
        "INSERT INTO service_instances (id, service_id, plan_id, organization_guid, space_guid, secrets)
         VALUES ('synthetic', 's', 'p', 'o', 's', $1)",
    )
    .bind(seal_v1(key, br#"{"admin":"secret"}"#))
    .execute(&mut db)
    .await
    .unwrap();
    let (ids, sealed): (Vec<String>, Vec<Vec<u8>>) = (0..SYNTHETIC_BINDINGS)
        .map(|i| {
            let value = synthetic_credentials(i);
            let sealed = if i % 2 == 0 {
                cipher.seal(value.as_bytes())
            } else {
                seal_v1(key, value.as_bytes())
            };
            (format!("synthetic-{i:06}"), sealed)
        })
        .unzip();
    sqlx::query(
        "INSERT INTO service_bindings (id, instance_id, service_id, plan_id, credentials)
         SELECT id, 'synthetic', 's', 'p', c FROM unnest($1::text[], $2::bytea[]) AS v(id, c)",
    )
    .bind(&ids)
    .bind(&sealed)
    .execute(&mut db)
    .await
    .unwrap();
    db.close().await.unwrap();
}

fn synthetic_credentials(i: usize) -> String {
    format!(r#"{{"DATABASE_URL":"postgres://u{i}:p{i}@db.example/d{i}"}}"#)
}

async fn assert_synthetic_open_with(stack: &Stack, key: &[u8; 32]) {
    let cipher = Cipher::from_key(key);
    let mut db = PgConnection::connect(&stack.broker_db_url).await.unwrap();
    let rows: Vec<(String, Vec<u8>)> = sqlx::query_as(
        "SELECT id, credentials FROM service_bindings WHERE instance_id = 'synthetic' ORDER BY id",
    )
    .fetch_all(&mut db)
    .await
    .unwrap();
    assert_eq!(rows.len(), SYNTHETIC_BINDINGS);
    for (i, (_, sealed)) in rows.iter().enumerate() {
        assert_eq!(
            cipher.open(sealed).unwrap(),
            synthetic_credentials(i).as_bytes()
        );
    }
    let secrets: Vec<u8> =
        sqlx::query_scalar("SELECT secrets FROM service_instances WHERE id = 'synthetic'")
            .fetch_one(&mut db)
            .await
            .unwrap();
    assert_eq!(cipher.open(&secrets).unwrap(), br#"{"admin":"secret"}"#);
    let hook_secrets: Vec<Vec<u8>> = sqlx::query_scalar(
        "SELECT secret FROM webhook_deliveries UNION ALL SELECT webhook_secret FROM tasks WHERE webhook_secret IS NOT NULL",
    )
    .fetch_all(&mut db)
    .await
    .unwrap();
    assert!(!hook_secrets.is_empty(), "the webhooks left sealed secrets");
    for sealed in hook_secrets {
        assert_eq!(cipher.open(&sealed).unwrap(), HOOK_SECRET.as_bytes());
    }
    db.close().await.unwrap();
}

/// Sealed values in the broker's database not sealed with `key` in the current format.
async fn values_not_sealed_with(stack: &Stack, key: &[u8; 32]) -> i64 {
    let mut header = vec![2u8];
    header.extend_from_slice(KeyId::of(key).as_bytes());
    let mut db = PgConnection::connect(&stack.broker_db_url).await.unwrap();
    let count: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM service_bindings WHERE substring(credentials from 1 for 9) <> $1)
              + (SELECT count(*) FROM service_instances WHERE substring(secrets from 1 for 9) <> $1)
              + (SELECT count(*) FROM tasks WHERE substring(webhook_secret from 1 for 9) <> $1)
              + (SELECT count(*) FROM webhook_deliveries WHERE substring(secret from 1 for 9) <> $1)",
    )
    .bind(header)
    .fetch_one(&mut db)
    .await
    .unwrap();
    db.close().await.unwrap();
    count
}

/// The id of the one snapshot key not retired (B2 once the rekey ran).
async fn snapshot_key_in_use(stack: &Stack) -> String {
    let mut db = PgConnection::connect(&stack.broker_db_url).await.unwrap();
    let ids: Vec<String> = sqlx::query_scalar(
        "SELECT key_id FROM sealing_keys WHERE purpose = 'snapshot' AND retired_at IS NULL",
    )
    .fetch_all(&mut db)
    .await
    .unwrap();
    db.close().await.unwrap();
    assert_eq!(ids.len(), 1, "{ids:?}");
    ids[0].clone()
}

/// Every ready snapshot names B2 and its object (and only those: no orphans) is in the store.
async fn assert_snapshot_objects_resealed(stack: &Stack) {
    let b2 = snapshot_key_in_use(stack).await;
    let mut db = PgConnection::connect(&stack.broker_db_url).await.unwrap();
    let rows: Vec<(String, Option<String>)> = sqlx::query_as(
        "SELECT object_key, key_id FROM snapshots WHERE state = 'ready' ORDER BY object_key",
    )
    .fetch_all(&mut db)
    .await
    .unwrap();
    db.close().await.unwrap();
    assert!(!rows.is_empty());
    let store = stack.dir.join("snapshots");
    let mut expected: Vec<std::path::PathBuf> = rows.iter().map(|(k, _)| store.join(k)).collect();
    for (object, key_id) in &rows {
        assert_eq!(key_id.as_deref(), Some(b2.as_str()), "{object}");
        assert!(object.contains(&format!(".k{b2}.")), "{object}");
    }
    let mut found = files(&store);
    found.sort();
    expected.sort();
    assert_eq!(
        found, expected,
        "the store holds exactly the re-sealed objects"
    );
}

fn files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files(&path));
        } else {
            out.push(path);
        }
    }
    out
}

async fn assert_refused(
    stack: &Stack,
    binary: &str,
    mut env: Vec<(&'static str, String)>,
    names: &str,
    and: &str,
) {
    env.push(("PORT", free_port().unwrap().to_string()));
    let (ok, said) = run_to_end(stack.command(binary, &env), Duration::from_secs(60)).await;
    assert!(!ok, "{binary} started: {said}");
    assert!(
        said.contains(names) && said.contains(and),
        "{binary} said: {said}"
    );
}

async fn run_rekey(mut cmd: std::process::Command) -> (bool, String) {
    cmd.arg("rekey");
    run_to_end(cmd, Duration::from_secs(60)).await
}

/// What one load period measured.
struct Load {
    /// Latencies of binding reads (each opens sealed credentials).
    reads: Vec<Duration>,
    /// Bindings made meanwhile: (instance, binding path).
    made: Vec<(String, String)>,
    rekey_ok: bool,
    rekey_output: Option<String>,
    rekey_seconds: f64,
}

impl Load {
    fn latency(&self) -> String {
        let mut sorted = self.reads.clone();
        sorted.sort();
        let at = |q: f64| sorted[((sorted.len() as f64 - 1.0) * q) as usize].as_secs_f64() * 1000.0;
        format!(
            "{} binding reads, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            sorted.len(),
            at(0.5),
            at(0.99),
            at(1.0)
        )
    }
}

/// Four readers of existing bindings and two provision-and-bind loops, for 4 s, or while `rekey` runs.
async fn run_load(
    stack: &Stack,
    ids: &(String, String),
    bindings: &[(String, String)],
    rekey: Option<std::process::Command>,
) -> Load {
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(Mutex::new(Vec::new()));
    let made = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..4 {
        let (client, stop, reads) = (stack.client.clone(), stop.clone(), reads.clone());
        let path = bindings[i % bindings.len()].1.clone();
        tasks.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                let (status, body) = client
                    .send(client.request(Method::GET, &path))
                    .await
                    .unwrap();
                assert_eq!(status, 200, "{body}");
                reads.lock().unwrap().push(started.elapsed());
            }
        });
    }
    for _ in 0..2 {
        let (client, stop, made, ids) = (
            stack.client.clone(),
            stop.clone(),
            made.clone(),
            ids.clone(),
        );
        tasks.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let pair = provision_and_bind(&client, &ids, None).await;
                made.lock().unwrap().push(pair);
            }
        });
    }
    let (mut rekey_ok, mut rekey_output, mut rekey_seconds) = (true, None, 0.0);
    match rekey {
        Some(cmd) => {
            // Let the load reach its pace first.
            tokio::time::sleep(Duration::from_millis(500)).await;
            let started = Instant::now();
            let (ok, said) = run_rekey(cmd).await;
            rekey_seconds = started.elapsed().as_secs_f64();
            rekey_ok = ok;
            rekey_output = Some(said);
        }
        None => tokio::time::sleep(Duration::from_secs(4)).await,
    }
    stop.store(true, Ordering::Relaxed);
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    let reads = std::mem::take(&mut *reads.lock().unwrap());
    let made = std::mem::take(&mut *made.lock().unwrap());
    Load {
        reads,
        made,
        rekey_ok,
        rekey_output,
        rekey_seconds,
    }
}
