//! kill -9 of a real `berth-worker` process mid-task: the task comes back and runs to the end exactly once.

use std::{process::Stdio, time::Duration};

use broker::model::kinds;
use serde_json::json;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::process::{Child, Command};

use crate::helpers::*;

fn spawn_worker(opts: &PgConnectOptions, key_file: &std::path::Path, id: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_berth-worker"))
        .env("DATABASE_URL", database_url(opts))
        .env("BERTH_KEY_FILE", key_file)
        .env("PLANS_DIR", plans_dir())
        .env("SHARED_POSTGRES_URL", admin_url())
        .env("WORKER_LEASE_SECS", "2")
        .env("WORKER_POLL_MS", "200")
        .env("WORKER_CONCURRENCY", "2")
        .env("DATABASE_POOL_SIZE", "6")
        .env("WORKER_ID", id)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("starting berth-worker")
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn kill_9_mid_task_loses_nothing_and_runs_once_more(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let pool = pool(&opts, 4).await;
    let dir = std::env::temp_dir().join(format!("berth-worker-test-{}", uuid::Uuid::new_v4()));
    let key_file = dir.join("master.key");
    broker::crypto::generate_key_file(&key_file).unwrap();

    let id = enqueue(&pool, kinds::NOOP, json!({ "sleep_ms": 3000 })).await;
    let mut first = spawn_worker(&opts, &key_file, "victim");
    eventually(
        Duration::from_secs(30),
        "the first worker to run the task",
        || async {
            let row = task(&pool, id).await;
            (row.state == "running" && row.worker_id.as_deref() == Some("victim")).then_some(())
        },
    )
    .await;
    first.start_kill().unwrap(); // SIGKILL
    first.wait().await.unwrap();
    assert_eq!(
        task(&pool, id).await.state,
        "running",
        "killed mid-task, before it could finish"
    );

    let mut second = spawn_worker(&opts, &key_file, "rescuer");
    let row = eventually(
        Duration::from_secs(60),
        "the second worker to finish the task",
        || async {
            let row = task(&pool, id).await;
            row.state().is_finished().then_some(row)
        },
    )
    .await;
    second.start_kill().unwrap();
    second.wait().await.unwrap();
    let _ = std::fs::remove_dir_all(dir);

    assert_eq!(row.state, "succeeded");
    assert_eq!(row.attempts, 2);
    assert_eq!(row.worker_id.as_deref(), Some("rescuer"));
    let tasks: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(tasks, 1, "nothing was duplicated");
}
