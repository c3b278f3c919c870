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

/// SIGTERM to a real `berth-worker`: it claims nothing more, lets its running tasks finish, records them, and
/// exits cleanly; a task enqueued after the signal stays in the queue for another worker.
#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn sigterm_stops_claiming_and_finishes_running_tasks(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let pool = pool(&opts, 4).await;
    let dir = std::env::temp_dir().join(format!("berth-worker-test-{}", uuid::Uuid::new_v4()));
    let key_file = dir.join("master.key");
    broker::crypto::generate_key_file(&key_file).unwrap();

    let running = [
        enqueue(&pool, kinds::NOOP, json!({ "sleep_ms": 3000 })).await,
        enqueue(&pool, kinds::NOOP, json!({ "sleep_ms": 3000 })).await,
    ];
    let mut worker = spawn_worker(&opts, &key_file, "stopping");
    eventually(Duration::from_secs(30), "both tasks to run", || async {
        let mut all = true;
        for id in running {
            all &= task(&pool, id).await.state == "running";
        }
        all.then_some(())
    })
    .await;
    let pid = worker.id().expect("running").to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let late = enqueue(&pool, kinds::NOOP, json!({})).await;

    let status = tokio::time::timeout(Duration::from_secs(15), worker.wait())
        .await
        .expect("the worker exits once its tasks are done")
        .unwrap();
    let _ = std::fs::remove_dir_all(dir);
    assert!(status.success(), "exit status {status}");
    for id in running {
        let row = task(&pool, id).await;
        assert_eq!(
            row.state, "succeeded",
            "a running task finished and was recorded"
        );
        assert_eq!(row.attempts, 1);
        assert_eq!(row.worker_id.as_deref(), Some("stopping"));
    }
    let row = task(&pool, late).await;
    assert_eq!(
        (row.state.as_str(), row.attempts),
        ("pending", 0),
        "nothing claimed after SIGTERM"
    );
}
