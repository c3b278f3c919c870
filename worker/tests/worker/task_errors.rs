//! What the runner does with a failed step: a passing fault retries, a bug fails at once and says so.

use async_trait::async_trait;
use berth_worker::{
    Registry,
    context::TaskContext,
    registry::{Step, TaskError, TaskHandler},
};
use broker::model::TaskId;
use serde_json::json;
use sqlx::{
    PgPool,
    postgres::{PgConnectOptions, PgPoolOptions},
};

use crate::helpers::{config, drain, enqueue, pool, services};

/// Runs a statement that names a column that does not exist, through `?` on an anyhow error.
struct WrongStatement;

#[async_trait]
impl TaskHandler for WrongStatement {
    fn kind(&self) -> &'static str {
        "test.wrong_statement"
    }

    async fn run(&self, ctx: &TaskContext<'_>) -> Result<Step, TaskError> {
        use anyhow::Context as _;
        sqlx::query("SELECT no_such_column FROM tasks")
            .execute(ctx.pool)
            .await
            .context("reading the tasks")?;
        Ok(Step::Done)
    }
}

/// Reads a text column as an integer: the row does not decode, every time.
struct WrongDecode;

#[async_trait]
impl TaskHandler for WrongDecode {
    fn kind(&self) -> &'static str {
        "test.wrong_decode"
    }

    async fn run(&self, ctx: &TaskContext<'_>) -> Result<Step, TaskError> {
        let _: i64 = sqlx::query_scalar("SELECT kind FROM tasks LIMIT 1")
            .fetch_one(ctx.pool)
            .await
            .map_err(anyhow::Error::from)?;
        Ok(Step::Done)
    }
}

struct Panics;

#[async_trait]
impl TaskHandler for Panics {
    fn kind(&self) -> &'static str {
        "test.panics"
    }

    async fn run(&self, _ctx: &TaskContext<'_>) -> Result<Step, TaskError> {
        panic!("the invariant this step relies on broke")
    }
}

/// Panics with a formatted message holding a secret, as an `unwrap` on an error can.
struct PanicsWithAValue;

#[async_trait]
impl TaskHandler for PanicsWithAValue {
    fn kind(&self) -> &'static str {
        "test.panics_with_a_value"
    }

    async fn run(&self, _ctx: &TaskContext<'_>) -> Result<Step, TaskError> {
        let url = "postgres://app:hunter2-secret@db/app";
        panic!("could not use {url}")
    }
}

/// Cannot reach its peer: a connection refused is a passing fault and retries.
struct Unreachable;

#[async_trait]
impl TaskHandler for Unreachable {
    fn kind(&self) -> &'static str {
        "test.unreachable"
    }

    async fn run(&self, _ctx: &TaskContext<'_>) -> Result<Step, TaskError> {
        let port = broker::embedded::free_port()?;
        let url = format!("postgres://nobody@127.0.0.1:{port}/none?connect_timeout=2");
        use sqlx::Connection as _;
        sqlx::PgConnection::connect(&url)
            .await
            .map_err(anyhow::Error::from)?;
        Ok(Step::Done)
    }
}

async fn outcome(pool: &PgPool, id: TaskId) -> (String, i32, String) {
    sqlx::query_as(
        "SELECT state::text, attempts, coalesce(last_error, '') FROM tasks WHERE id = $1",
    )
    .bind(id.0)
    .fetch_one(pool)
    .await
    .expect("read the task")
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn bugs_fail_at_once_and_passing_faults_retry(_: PgPoolOptions, opts: PgConnectOptions) {
    let pool = pool(&opts, 8).await;
    let statement = enqueue(&pool, "test.wrong_statement", json!({})).await;
    let decode = enqueue(&pool, "test.wrong_decode", json!({})).await;
    let panics = enqueue(&pool, "test.panics", json!({})).await;
    let unreachable = enqueue(&pool, "test.unreachable", json!({})).await;
    let with_a_value = enqueue(&pool, "test.panics_with_a_value", json!({})).await;
    sqlx::query("UPDATE tasks SET max_attempts = 3 WHERE id = ANY($1)")
        .bind(vec![
            statement.0,
            decode.0,
            panics.0,
            unreachable.0,
            with_a_value.0,
        ])
        .execute(&pool)
        .await
        .unwrap();
    let registry = Registry::new()
        .with(WrongStatement)
        .with(WrongDecode)
        .with(Panics)
        .with(Unreachable)
        .with(PanicsWithAValue);
    let mut cfg = config("w");
    cfg.backoff_base = std::time::Duration::from_millis(10);
    cfg.backoff_cap = std::time::Duration::from_millis(20);
    drain(&pool, services(), registry, cfg).await;

    let (state, attempts, error) = outcome(&pool, statement).await;
    assert_eq!((state.as_str(), attempts), ("failed", 1), "{error}");
    assert!(
        error.starts_with("a bug in berth (a statement Postgres rejects)"),
        "{error}"
    );
    assert!(
        error.contains("reading the tasks") && error.contains("no_such_column"),
        "{error}"
    );

    let (state, attempts, error) = outcome(&pool, decode).await;
    assert_eq!((state.as_str(), attempts), ("failed", 1), "{error}");
    assert!(
        error.contains("a query does not match the rows it reads"),
        "{error}"
    );

    let (state, attempts, error) = outcome(&pool, panics).await;
    assert_eq!((state.as_str(), attempts), ("failed", 1), "{error}");
    assert!(
        error.contains("the task panicked: the invariant this step relies on broke"),
        "{error}"
    );

    // A formatted panic message is not recorded: it may hold a secret, and the error is shown to platforms.
    let (state, attempts, error) = outcome(&pool, with_a_value).await;
    assert_eq!((state.as_str(), attempts), ("failed", 1), "{error}");
    assert!(
        error.contains("the task panicked") && !error.contains("hunter2"),
        "{error}"
    );

    let (state, attempts, error) = outcome(&pool, unreachable).await;
    assert_eq!((state.as_str(), attempts), ("failed", 3), "{error}");
    assert!(!error.contains("a bug in berth"), "{error}");
}
