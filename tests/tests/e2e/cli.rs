//! The `berth` command line against a running broker: pipe-friendly provisioning, presets, gen-key; every
//! instance, binding, backup and preset command with `--json`, piped output, errors and `--timeout`.

use std::{
    process::Output,
    time::{Duration, Instant},
};

use berth_tests::{Stack, bin_dir};
use reqwest::Method;
use serde_json::Value;
use sqlx::{Connection, PgConnection};

async fn berth(stack: &Stack, args: &[&str]) -> Output {
    tokio::process::Command::new(bin_dir().join("berth"))
        .args(args)
        .env("BERTH_URL", &stack.base_url)
        .env("BROKER_USERNAME", &stack.username)
        .env("BROKER_PASSWORD", &stack.password)
        .output()
        .await
        .expect("running berth")
}

/// The command exited 0; else its stderr and the broker's logs say why.
fn assert_succeeded(out: &Output, stack: &Stack) {
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        stack.logs()
    );
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs berth with `args` (and `--json`), asserts it succeeded, and parses its stdout.
async fn berth_json(stack: &Stack, args: &[&str]) -> Value {
    let mut args = args.to_vec();
    args.push("--json");
    let out = berth(stack, &args).await;
    assert_succeeded(&out, stack);
    serde_json::from_str(&stdout(&out))
        .unwrap_or_else(|e| panic!("berth {args:?} printed no JSON ({e}):\n{}", stdout(&out)))
}

/// The command failed with exit code 1 and said `needle` (the broker's description) on stderr.
fn assert_refused(out: &Output, needle: &str) {
    assert_eq!(out.status.code(), Some(1), "{}", stderr(out));
    assert!(
        stderr(out).contains(needle),
        "{needle:?} not in {}",
        stderr(out)
    );
}

/// Piped output has no escape sequences, carriage returns or other control characters but newlines.
fn assert_plain(text: &str) {
    assert!(
        !text.chars().any(|c| c.is_control() && c != '\n'),
        "control characters in piped output: {text:?}"
    );
}

#[tokio::test]
async fn provision_connstr_only_presets_and_deprovision() {
    let stack = Stack::start().await.unwrap();

    // stdout is exactly the connection string; progress goes to stderr.
    let out = berth(
        &stack,
        &[
            "provision",
            "postgres",
            "dedicated",
            "--name",
            "cli-db",
            "--wait",
            "--connstr-only",
        ],
    )
    .await;
    assert_succeeded(&out, &stack);
    let lines: Vec<String> = stdout(&out).lines().map(str::to_string).collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].starts_with("postgres://"), "{lines:?}");
    let mut conn = PgConnection::connect(&lines[0]).await.unwrap();
    sqlx::raw_sql("CREATE TABLE t (x int); INSERT INTO t VALUES (42);")
        .execute(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();

    // Presets from the command line.
    let out = berth(
        &stack,
        &[
            "presets",
            "push-new",
            "answer",
            "--instance",
            "cli-db",
            "--wait",
        ],
    )
    .await;
    assert_succeeded(&out, &stack);
    let out = berth(&stack, &["presets", "list", "--json"]).await;
    let listed: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(listed["presets"][0]["name"], "answer");
    assert_eq!(listed["presets"][0]["latest_version"], 1);
    let out = berth(&stack, &["presets", "lock", "answer", "--by", "ci"]).await;
    let key = stdout(&out).trim().to_string();
    assert!(key.starts_with("lk_"), "{key}");
    let out = berth(
        &stack,
        &["presets", "push", "answer", "--instance", "cli-db"],
    )
    .await;
    assert!(
        !out.status.success(),
        "a locked preset refuses a push without the key"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("locked"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = berth(
        &stack,
        &[
            "presets",
            "push",
            "answer",
            "--instance",
            "cli-db",
            "--lock-key",
            &key,
            "--wait",
        ],
    )
    .await;
    assert_succeeded(&out, &stack);

    // A failing provision exits non-zero and prints nothing on stdout.
    let out = berth(
        &stack,
        &[
            "provision",
            "postgres",
            "dedicated",
            "-p",
            "tuning_profile=turbo",
            "--wait",
            "--connstr-only",
        ],
    )
    .await;
    assert!(!out.status.success());
    assert!(stdout(&out).is_empty());

    let out = berth(&stack, &["deprovision", "cli-db", "--wait"]).await;
    assert_succeeded(&out, &stack);
    let (status, _) = stack
        .send(stack.request(Method::GET, "/v2/service_instances/cli-db"))
        .await
        .unwrap();
    assert_eq!(status, 404);

    // gen-key writes a key once and never overwrites it.
    let key_file = stack.dir.join("cli.key");
    let path = key_file.display().to_string();
    let out = berth(&stack, &["gen-key", "--out", &path]).await;
    assert!(out.status.success());
    let first = std::fs::read_to_string(&key_file).unwrap();
    let out = berth(&stack, &["gen-key", "--out", &path]).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("refusing to overwrite"));
    assert_eq!(std::fs::read_to_string(&key_file).unwrap(), first);
    stack.stop().await;
}

/// Object keys of the snapshots in the broker's database with `condition` (a SQL expression on `snapshots`).
async fn object_keys(stack: &Stack, condition: &str) -> Vec<(uuid::Uuid, String)> {
    let mut db = PgConnection::connect(&stack.broker_db_url).await.unwrap();
    let rows = sqlx::query_as(&format!(
        "SELECT id, object_key FROM snapshots WHERE {condition} ORDER BY created_at"
    ))
    .fetch_all(&mut db)
    .await
    .unwrap();
    db.close().await.unwrap();
    rows
}

async fn count(stack: &Stack, sql: &str) -> i64 {
    let mut db = PgConnection::connect(&stack.broker_db_url).await.unwrap();
    let n = sqlx::query_scalar(sql).fetch_one(&mut db).await.unwrap();
    db.close().await.unwrap();
    n
}

/// Whether a template database of preset version `snapshot` is on the shared server.
async fn template_exists(stack: &Stack, snapshot: uuid::Uuid) -> bool {
    let mut admin = stack.admin().await.unwrap();
    let name = format!("{}tpl_{}", stack.name_prefix, snapshot.simple());
    let exists = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
        .bind(&name)
        .fetch_one(&mut admin)
        .await
        .unwrap();
    admin.close().await.unwrap();
    exists
}

#[tokio::test]
async fn every_command_with_json_piped_output_errors_timeout_and_deletions() {
    let mut stack = Stack::start().await.unwrap();
    let store = stack.dir.join("snapshots");

    // provision --json: what a script reads.
    let made = berth_json(
        &stack,
        &[
            "provision",
            "postgres",
            "shared",
            "--name",
            "cli-s1",
            "--wait",
        ],
    )
    .await;
    assert_eq!(made["instance_id"], "cli-s1");
    assert_eq!(made["state"], "succeeded");

    // bind --json: the credentials work.
    let bound = berth_json(&stack, &["bind", "cli-s1", "--name", "app1"]).await;
    assert_eq!(bound["binding_id"], "app1");
    let url = bound["credentials"]["DATABASE_URL"]
        .as_str()
        .unwrap()
        .to_string();
    let mut conn = PgConnection::connect(&url).await.unwrap();
    sqlx::raw_sql("CREATE TABLE t (x int); INSERT INTO t VALUES (7);")
        .execute(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
    // Without --json, bind prints KEY=value lines.
    let out = berth(&stack, &["bind", "cli-s1", "--name", "app2"]).await;
    assert_succeeded(&out, &stack);
    assert!(
        stdout(&out)
            .lines()
            .any(|l| l.starts_with("DATABASE_URL=postgres://")),
        "{}",
        stdout(&out)
    );

    // list and status, as JSON and as tables on a pipe (no control characters on stdout or stderr).
    let listed = berth_json(&stack, &["list", "--page-size", "1"]).await;
    let ids: Vec<&str> = listed["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["cli-s1"]);
    assert_eq!(listed["instances"][0]["plan"], "shared");
    let status = berth_json(&stack, &["status", "cli-s1"]).await;
    assert_eq!(status["last_operation"]["type"], "provision");
    assert_eq!(status["last_operation"]["state"], "succeeded");
    for args in [
        &["list"][..],
        &["status", "cli-s1"],
        &["catalog"],
        &["backups", "list", "cli-s1"],
    ] {
        let out = berth(&stack, args).await;
        assert_succeeded(&out, &stack);
        assert_plain(&stdout(&out));
        assert_plain(&stderr(&out));
    }
    let out = berth(&stack, &["list"]).await;
    assert!(stdout(&out).starts_with("ID "), "{}", stdout(&out));
    assert!(stdout(&out).contains("cli-s1"), "{}", stdout(&out));

    // update waits, and the parameters show in status.
    let updated = berth_json(
        &stack,
        &[
            "update",
            "cli-s1",
            "-p",
            r#"extensions=["citext"]"#,
            "--wait",
        ],
    )
    .await;
    assert_eq!(updated["state"], "succeeded");
    let status = berth_json(&stack, &["status", "cli-s1"]).await;
    assert_eq!(status["parameters"]["extensions"][0], "citext");
    assert_eq!(status["last_operation"]["type"], "update");

    // unbind --wait (piped: plain progress lines only).
    let out = berth(&stack, &["unbind", "cli-s1", "app2", "--wait"]).await;
    assert_succeeded(&out, &stack);
    assert_plain(&stderr(&out));

    // Errors print the broker's description and exit 1.
    assert_refused(&berth(&stack, &["status", "nope"]).await, "does not exist");
    assert_refused(
        &berth(&stack, &["rotate-credentials", "cli-s1", "--wait"]).await,
        "cannot rotate credentials",
    );
    assert_refused(
        &berth(&stack, &["switchover", "cli-s1", "--wait"]).await,
        "not an HA cluster",
    );
    assert_refused(
        &berth(&stack, &["price-check", "cpu_min=2"]).await,
        "region",
    );

    // price-check answers from the offers workers cache.
    let pool = sqlx::PgPool::connect(&stack.broker_db_url).await.unwrap();
    let offer = broker::ec2::Offer {
        instance_type: "m5.large".into(),
        vcpus: 2,
        memory_mib: 8192,
        architectures: vec!["x86_64".into()],
        burstable: false,
        instance_storage_gb: 0,
        current_generation: true,
        spot_supported: true,
        spot_prices: [("eu-west-1a".to_string(), 0.04)].into_iter().collect(),
        on_demand_price: Some(0.096),
    };
    broker::db::ec2_offers::replace_region(&pool, "eu-west-1", &[offer])
        .await
        .unwrap();
    pool.close().await;
    let priced = berth_json(&stack, &["price-check", "region=eu-west-1", "cpu_min=2"]).await;
    assert_eq!(priced["candidates"][0]["instance_type"], "m5.large");
    let out = berth(&stack, &["price-check", "region=eu-west-1"]).await;
    assert_succeeded(&out, &stack);
    assert!(stdout(&out).contains("m5.large"), "{}", stdout(&out));

    // Backups: take one, then delete it: the object leaves the store and the row the database.
    let taken = berth_json(&stack, &["backups", "take", "cli-s1", "--wait"]).await;
    let backup = taken["backup_id"].as_str().unwrap().to_string();
    let listed = berth_json(&stack, &["backups", "list", "cli-s1"]).await;
    assert_eq!(listed["backups"][0]["id"], backup.as_str());
    assert_eq!(listed["backups"][0]["state"], "ready");
    let keys = object_keys(&stack, &format!("id = '{backup}'")).await;
    let backup_file = store.join(&keys[0].1);
    assert!(backup_file.exists(), "{}", backup_file.display());
    let deleted = berth_json(&stack, &["backups", "delete", "cli-s1", &backup, "--wait"]).await;
    assert_eq!(deleted["state"], "succeeded");
    assert!(!backup_file.exists(), "{}", backup_file.display());
    assert!(
        object_keys(&stack, &format!("id = '{backup}'"))
            .await
            .is_empty()
    );
    let listed = berth_json(&stack, &["backups", "list", "cli-s1"]).await;
    assert_eq!(listed["backups"], serde_json::json!([]));

    // Presets: two versions, and an instance made from version 1 (its template is cached on the server).
    for args in [
        &[
            "presets",
            "push-new",
            "shop",
            "--instance",
            "cli-s1",
            "--wait",
        ][..],
        &["presets", "push", "shop", "--instance", "cli-s1", "--wait"],
    ] {
        assert_succeeded(&berth(&stack, args).await, &stack);
    }
    let versions = object_keys(&stack, "kind = 'preset'").await;
    assert_eq!(versions.len(), 2);
    berth_json(
        &stack,
        &[
            "provision",
            "postgres",
            "shared",
            "--name",
            "cli-s2",
            "-p",
            r#"preset={"name":"shop","version":1}"#,
            "--wait",
        ],
    )
    .await;
    assert!(template_exists(&stack, versions[0].0).await);
    let out = berth(&stack, &["presets", "versions", "shop"]).await;
    assert_succeeded(&out, &stack);
    assert!(stdout(&out).starts_with("VERSION"), "{}", stdout(&out));
    assert_plain(&stdout(&out));

    // With the worker gone nothing finishes: --timeout gives up with exit code 124, and a preset an instance is
    // being provisioned from cannot be deleted.
    stack.kill_worker().await;
    let started = Instant::now();
    let out = berth(&stack, &["backups", "take", "cli-s1", "--timeout", "2s"]).await;
    assert_eq!(out.status.code(), Some(124), "{}", stderr(&out));
    assert!(stderr(&out).contains("--timeout"), "{}", stderr(&out));
    assert!(started.elapsed() < Duration::from_secs(20));
    let out = berth(
        &stack,
        &[
            "provision",
            "postgres",
            "shared",
            "--name",
            "cli-s3",
            "-p",
            "preset=shop",
        ],
    )
    .await;
    assert_succeeded(&out, &stack);
    assert_refused(
        &berth(&stack, &["presets", "delete", "shop", "--wait"]).await,
        "instance.provision",
    );
    stack.restart_worker(Vec::new()).unwrap();
    stack
        .wait_succeeded("/v2/service_instances/cli-s3", Duration::from_secs(120))
        .await;
    assert!(template_exists(&stack, versions[1].0).await);

    // Deleting version 1: its object and its template go, version 2 stays.
    let deleted = berth_json(
        &stack,
        &["presets", "delete", "shop", "--version", "1", "--wait"],
    )
    .await;
    assert_eq!(deleted["deleted_versions"], serde_json::json!([1]));
    assert!(!store.join(&versions[0].1).exists());
    assert!(store.join(&versions[1].1).exists());
    assert!(!template_exists(&stack, versions[0].0).await);
    assert!(template_exists(&stack, versions[1].0).await);
    let listed = berth_json(&stack, &["presets", "versions", "shop"]).await;
    assert_eq!(listed["versions"].as_array().unwrap().len(), 1);
    assert_eq!(listed["versions"][0]["version"], 2);

    // A locked preset is not deleted; unlocked, the whole preset goes: objects, template, rows.
    let out = berth(&stack, &["presets", "lock", "shop", "--by", "ci"]).await;
    let key = stdout(&out).trim().to_string();
    assert_refused(
        &berth(&stack, &["presets", "delete", "shop"]).await,
        "locked",
    );
    assert_succeeded(
        &berth(&stack, &["presets", "unlock", "shop", "--lock-key", &key]).await,
        &stack,
    );
    let deleted = berth_json(&stack, &["presets", "delete", "shop", "--wait"]).await;
    assert_eq!(deleted["deleted_versions"], serde_json::json!([2]));
    assert!(!store.join(&versions[1].1).exists());
    assert!(!template_exists(&stack, versions[1].0).await);
    assert_eq!(count(&stack, "SELECT count(*) FROM presets").await, 0);
    assert_eq!(
        count(
            &stack,
            "SELECT count(*) FROM snapshots WHERE kind = 'preset'"
        )
        .await,
        0
    );
    assert_eq!(
        count(&stack, "SELECT count(*) FROM snapshot_objects_to_delete").await,
        0
    );
    assert_refused(
        &berth(&stack, &["presets", "versions", "shop"]).await,
        "no preset",
    );
    // The instances made from it keep their data.
    let bound = berth_json(&stack, &["bind", "cli-s2"]).await;
    let mut conn = PgConnection::connect(bound["credentials"]["DATABASE_URL"].as_str().unwrap())
        .await
        .unwrap();
    let x: i32 = sqlx::query_scalar("SELECT x FROM t")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(x, 7);
    conn.close().await.unwrap();

    for instance in ["cli-s1", "cli-s2", "cli-s3"] {
        let gone = berth_json(&stack, &["deprovision", instance, "--wait"]).await;
        assert_eq!(gone["state"], "succeeded");
    }
    let listed = berth_json(&stack, &["list"]).await;
    assert_eq!(listed["instances"], serde_json::json!([]));
    stack.stop().await;
}
