//! Shared test plumbing: settings and services pointing at the test server, worker configs, test task kinds.

use std::{
    collections::HashSet,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use berth_worker::{Registry, Services, Step, TaskContext, TaskError, TaskHandler, WorkerConfig};
use broker::{
    config::Settings,
    crypto::Cipher,
    db::{
        bindings::{self, NewBinding},
        instances::{self, NewInstance},
        tasks::{self, NewTask, TaskRow},
    },
    model::{Operation, TaskId, UpdatePayload},
};
use serde_json::{Map, Value, json};
use sqlx::{
    PgPool,
    postgres::{PgConnectOptions, PgPoolOptions},
};
use uuid::Uuid;

pub const KEY: [u8; 32] = [7; 32];

/// `DATABASE_URL` of the test run (the server `#[sqlx::test]` makes its databases on).
pub fn server_url() -> url::Url {
    let raw =
        std::env::var("DATABASE_URL").expect("DATABASE_URL must point at the test Postgres server");
    url::Url::parse(&raw).expect("DATABASE_URL is a URL")
}

/// The server's admin URL (its `postgres` database): the `shared` engine's registered server in tests.
pub fn admin_url() -> String {
    let mut url = server_url();
    url.set_path("postgres");
    url.into()
}

/// A URL for the test database behind `opts` (for child processes).
pub fn database_url(opts: &PgConnectOptions) -> String {
    let mut url = server_url();
    url.set_path(opts.get_database().expect("the test database has a name"));
    url.into()
}

pub fn plans_dir() -> String {
    concat!(env!("CARGO_MANIFEST_DIR"), "/../plans").to_string()
}

pub fn settings() -> Settings {
    serde_json::from_value(json!({
        "plans_dir": plans_dir(),
        "name_prefix": "bt_",
        "shared_postgres_url": admin_url(),
        // The webhook receivers of the tests listen on 127.0.0.1.
        "webhook_allow_loopback": true,
    }))
    .expect("test settings deserialize")
}

pub fn cipher() -> Cipher {
    Cipher::from_key(&KEY)
}

pub fn services() -> Arc<Services> {
    Arc::new(Services::new(settings(), cipher()).expect("services"))
}

/// Quick backoff and short grace so tests finish fast.
pub fn config(id: &str) -> WorkerConfig {
    WorkerConfig {
        concurrency: 4,
        lease: Duration::from_secs(5),
        poll_interval: Duration::from_millis(500),
        backoff_base: Duration::from_millis(20),
        backoff_cap: Duration::from_millis(200),
        shutdown_grace: Duration::from_secs(5),
        ..WorkerConfig::new(id)
    }
}

pub async fn pool(opts: &PgConnectOptions, max: u32) -> PgPool {
    PgPoolOptions::new()
        .max_connections(max)
        .connect_with(opts.clone())
        .await
        .expect("test pool")
}

pub async fn enqueue(pool: &PgPool, kind: &'static str, payload: Value) -> TaskId {
    tasks::enqueue(pool, NewTask::new(kind, payload))
        .await
        .expect("enqueue")
}

pub async fn enqueue_with(pool: &PgPool, task: NewTask) -> TaskId {
    tasks::enqueue(pool, task).await.expect("enqueue")
}

pub async fn task(pool: &PgPool, id: TaskId) -> TaskRow {
    tasks::get(pool, id)
        .await
        .expect("read task")
        .expect("task exists")
}

/// Runs a worker until the queue is idle (60 s at most).
pub async fn drain(
    pool: &PgPool,
    services: Arc<Services>,
    registry: Registry,
    config: WorkerConfig,
) {
    berth_worker::run_until_idle(
        pool.clone(),
        services,
        Arc::new(registry),
        config,
        Duration::from_secs(60),
    )
    .await
    .expect("the queue drains");
}

/// Polls `check` every 20 ms until it returns `Some`, or panics with `what` after `limit`.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---- test task kinds ----

/// Records each task id it runs; counts duplicates.
#[derive(Clone, Default)]
pub struct Record {
    pub seen: Arc<Mutex<HashSet<Uuid>>>,
    pub duplicates: Arc<AtomicUsize>,
}

pub const RECORD: &str = "test.record";

#[async_trait]
impl TaskHandler for Record {
    fn kind(&self) -> &'static str {
        RECORD
    }

    async fn run(&self, ctx: &TaskContext<'_>) -> Result<Step, TaskError> {
        if !self.seen.lock().unwrap().insert(ctx.task.id) {
            self.duplicates.fetch_add(1, Ordering::SeqCst);
            return Err(TaskError::fatal("ran twice"));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
        Ok(Step::Done)
    }
}

/// Counts how many of its tasks run at once; keeps the highest count seen. Each run takes 20 ms.
#[derive(Clone, Default)]
pub struct Gauge {
    pub now: Arc<AtomicUsize>,
    pub most: Arc<AtomicUsize>,
}

pub const GAUGE: &str = "test.gauge";

#[async_trait]
impl TaskHandler for Gauge {
    fn kind(&self) -> &'static str {
        GAUGE
    }

    async fn run(&self, _ctx: &TaskContext<'_>) -> Result<Step, TaskError> {
        let running = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.most.fetch_max(running, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(20)).await;
        self.now.fetch_sub(1, Ordering::SeqCst);
        Ok(Step::Done)
    }
}

/// One run of [`Flaky`]: (attempt, the run_at it was scheduled for, when it failed or finished).
pub type FlakyRun = (
    i32,
    chrono::DateTime<chrono::Utc>,
    chrono::DateTime<chrono::Utc>,
);

/// Fails (Retryable) while `attempts <= fail_times`, then succeeds. Records (attempt, run_at, now) per run.
#[derive(Clone, Default)]
pub struct Flaky {
    pub fail_times: i32,
    pub runs: Arc<Mutex<Vec<FlakyRun>>>,
}

pub const FLAKY: &str = "test.flaky";

#[async_trait]
impl TaskHandler for Flaky {
    fn kind(&self) -> &'static str {
        FLAKY
    }

    async fn run(&self, ctx: &TaskContext<'_>) -> Result<Step, TaskError> {
        self.runs
            .lock()
            .unwrap()
            .push((ctx.task.attempts, ctx.task.run_at, chrono::Utc::now()));
        if ctx.task.attempts <= self.fail_times {
            return Err(anyhow::anyhow!("flaky failure {}", ctx.task.attempts)
                .context("doing the flaky thing")
                .into());
        }
        Ok(Step::Done)
    }
}

/// Always Fatal.
pub struct Doomed;

pub const DOOMED: &str = "test.doomed";

#[async_trait]
impl TaskHandler for Doomed {
    fn kind(&self) -> &'static str {
        DOOMED
    }

    async fn run(&self, _ctx: &TaskContext<'_>) -> Result<Step, TaskError> {
        Err(TaskError::fatal("this cannot work: fix the input"))
    }
}

/// Waits `waits` times (200 ms, with a progress text), then Done.
#[derive(Clone, Default)]
pub struct Waiter {
    pub waits: usize,
    pub runs: Arc<AtomicUsize>,
}

pub const WAITER: &str = "test.waiter";

#[async_trait]
impl TaskHandler for Waiter {
    fn kind(&self) -> &'static str {
        WAITER
    }

    async fn run(&self, ctx: &TaskContext<'_>) -> Result<Step, TaskError> {
        let run = self.runs.fetch_add(1, Ordering::SeqCst);
        if run < self.waits {
            ctx.progress(&format!("run {run} started")).await?;
            return Ok(Step::Wait {
                after: Duration::from_millis(200),
                progress: format!("waiting ({})", run + 1),
            });
        }
        Ok(Step::Done)
    }
}

/// Runs until it is stopped from outside (the runner drops it); counts starts and stops.
#[derive(Clone, Default)]
pub struct Hang {
    pub started: Arc<AtomicUsize>,
    pub stopped: Arc<AtomicUsize>,
}

pub const HANG: &str = "test.hang";

struct CountOnDrop(Arc<AtomicUsize>);

impl Drop for CountOnDrop {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[async_trait]
impl TaskHandler for Hang {
    fn kind(&self) -> &'static str {
        HANG
    }

    async fn run(&self, _ctx: &TaskContext<'_>) -> Result<Step, TaskError> {
        self.started.fetch_add(1, Ordering::SeqCst);
        let _guard = CountOnDrop(self.stopped.clone());
        std::future::pending::<()>().await;
        Ok(Step::Done)
    }
}

/// Inserts an instance row with a fresh id, as the API would (org/space from `context`, else "org"/"space").
pub async fn insert_instance(
    pool: &PgPool,
    service: &str,
    plan: &str,
    context: Value,
    parameters: Value,
) -> String {
    let id = Uuid::new_v4().to_string();
    let guid =
        |key: &str, default: &'static str| context[key].as_str().unwrap_or(default).to_string();
    let (organization_guid, space_guid) = (
        guid("organization_guid", "org"),
        guid("space_guid", "space"),
    );
    let new = NewInstance {
        id: &id,
        service_id: service,
        plan_id: plan,
        organization_guid: &organization_guid,
        space_guid: &space_guid,
        context: &context,
        parameters: &parameters,
        maintenance_version: None,
    };
    assert!(instances::insert(pool, &new).await.unwrap());
    id
}

/// Inserts a binding row with a fresh id, as the API would.
pub async fn insert_binding(
    pool: &PgPool,
    instance_id: &str,
    service: &str,
    plan: &str,
    parameters: Value,
) -> String {
    let id = Uuid::new_v4().to_string();
    let empty = json!({});
    let new = NewBinding {
        id: &id,
        instance_id,
        service_id: service,
        plan_id: plan,
        app_guid: Some("app"),
        bind_resource: &empty,
        context: &empty,
        parameters: &parameters,
        expires_at: None,
        renew_before: None,
    };
    assert!(bindings::insert(pool, &new).await.unwrap());
    id
}

/// The catalog's Postgres service, and the plans of it the tests use.
pub const POSTGRES: &str = "3bdd3b6c-801f-470b-a45f-bc1849fa2124";
pub const SHARED_PLAN: &str = "707a3e6f-f8db-4339-88da-1533837a9810";
/// The `name_prefix` of the tests' settings.
pub const PREFIX: &str = "bt_";

/// Inserts an instance of a Postgres plan (no context), as the API would.
pub async fn new_instance(pool: &PgPool, plan: &str, parameters: Value) -> String {
    insert_instance(pool, POSTGRES, plan, json!({}), parameters).await
}

/// Inserts a binding of an instance of a Postgres plan, as the API would.
pub async fn new_binding(
    pool: &PgPool,
    instance_id: &str,
    plan: &str,
    parameters: Value,
) -> String {
    insert_binding(pool, instance_id, POSTGRES, plan, parameters).await
}

/// An OSB operation's task, as the API enqueues it (without the API's attempt limit).
pub fn operation_task(
    op: Operation,
    instance_id: &str,
    binding_id: Option<&str>,
    payload: Value,
) -> NewTask {
    let mut new = NewTask::new(op.task_kind(), payload);
    new.instance_id = Some(instance_id.to_string());
    new.binding_id = binding_id.map(str::to_string);
    new.operation = Some(op);
    new
}

/// Enqueues an OSB operation's task (empty payload, 3 attempts at most) without running it.
pub async fn enqueue_operation(
    pool: &PgPool,
    op: Operation,
    instance_id: &str,
    binding_id: Option<&str>,
) -> TaskId {
    let mut new = operation_task(op, instance_id, binding_id, json!({}));
    new.max_attempts = 3;
    enqueue_with(pool, new).await
}

/// Runs a worker with the real registry until the queue is idle.
pub async fn drain_all(pool: &PgPool, services: &Arc<Services>) {
    drain(
        pool,
        services.clone(),
        berth_worker::tasks::registry(),
        config("w"),
    )
    .await;
}

/// Enqueues an OSB operation's task (3 attempts at most), drains the queue with the real registry, and
/// returns the finished task.
pub async fn operate(
    pool: &PgPool,
    services: &Arc<Services>,
    op: Operation,
    instance_id: &str,
    binding_id: Option<&str>,
    payload: Value,
) -> TaskRow {
    let mut new = operation_task(op, instance_id, binding_id, payload);
    new.max_attempts = 3;
    let id = enqueue_with(pool, new).await;
    drain_all(pool, services).await;
    task(pool, id).await
}

/// [`operate`] with an empty payload, asserting that the task succeeded.
pub async fn operate_ok(
    pool: &PgPool,
    services: &Arc<Services>,
    op: Operation,
    instance_id: &str,
    binding_id: Option<&str>,
) -> TaskRow {
    let row = operate(pool, services, op, instance_id, binding_id, json!({})).await;
    succeeded(&row);
    row
}

/// Runs an update with `payload`, asserting that it succeeded.
pub async fn update_ok(
    pool: &PgPool,
    services: &Arc<Services>,
    instance_id: &str,
    payload: Value,
) -> TaskRow {
    let row = operate(
        pool,
        services,
        Operation::Update,
        instance_id,
        None,
        payload,
    )
    .await;
    succeeded(&row);
    row
}

/// An update's payload: `plan_id` and `parameters` as given, the rest empty.
pub fn update_payload(plan_id: &str, parameters: Value, context: Value) -> Value {
    let update = UpdatePayload {
        plan_id: plan_id.into(),
        parameters,
        context,
        maintenance_version: None,
        select_preset: false,
    };
    serde_json::to_value(&update).unwrap()
}

/// A binding's credentials, unsealed.
pub async fn credentials(pool: &PgPool, binding_id: &str) -> Map<String, Value> {
    let row = bindings::get(pool, binding_id).await.unwrap().unwrap();
    cipher()
        .open_json(&row.credentials.expect("credentials stored"))
        .unwrap()
}

/// The `DATABASE_URL` of a Postgres binding's credentials.
pub fn url_of(creds: &Map<String, Value>) -> String {
    creds["DATABASE_URL"].as_str().unwrap().to_string()
}

/// An instance's details.
pub async fn details(pool: &PgPool, instance_id: &str) -> Value {
    instances::get(pool, instance_id)
        .await
        .unwrap()
        .unwrap()
        .details
}

/// The admin password an engine stored in the instance's sealed secrets.
pub async fn admin_password(pool: &PgPool, instance_id: &str) -> String {
    let row = instances::get(pool, instance_id).await.unwrap().unwrap();
    let secrets: Value = cipher()
        .open_json(&row.secrets.expect("secrets stored"))
        .unwrap();
    secrets["admin_password"].as_str().unwrap().to_string()
}

/// Makes a binding expired a second ago.
pub async fn expire_now(pool: &PgPool, binding_id: &str) {
    sqlx::query(
        "UPDATE service_bindings SET expires_at = now() - interval '1 second' WHERE id = $1",
    )
    .bind(binding_id)
    .execute(pool)
    .await
    .unwrap();
}

/// A connection to the test server's `postgres` database as its superuser.
pub async fn admin_connection() -> sqlx::PgConnection {
    use sqlx::Connection;
    sqlx::PgConnection::connect(&admin_url()).await.unwrap()
}

/// Whether a role exists on the test server.
pub async fn role_exists(role: &str) -> bool {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)")
        .bind(role)
        .fetch_one(&mut admin_connection().await)
        .await
        .unwrap()
}

/// Whether a database exists on the test server.
pub async fn database_exists(database: &str) -> bool {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
        .bind(database)
        .fetch_one(&mut admin_connection().await)
        .await
        .unwrap()
}

/// Turns on `log_statement = 'all'` on the server under `root` (a `broker::embedded::PgServer`, which logs
/// to `root/postgres.log`), so a test can read every statement berth sends it.
pub async fn log_every_statement(server: &broker::embedded::PgServer) {
    use secrecy::ExposeSecret;
    use sqlx::Connection;
    let mut su = sqlx::PgConnection::connect(server.url("postgres").expose_secret())
        .await
        .expect("superuser connects");
    for sql in [
        "ALTER SYSTEM SET log_statement = 'all'",
        "SELECT pg_reload_conf()",
    ] {
        sqlx::raw_sql(sql).execute(&mut su).await.unwrap();
    }
    // The reload is asynchronous: wait until a new session sees it.
    eventually(Duration::from_secs(10), "log_statement = all", || async {
        let mut conn = sqlx::PgConnection::connect(server.url("postgres").expose_secret())
            .await
            .ok()?;
        let value: String = sqlx::query_scalar("SHOW log_statement")
            .fetch_one(&mut conn)
            .await
            .ok()?;
        (value == "all").then_some(())
    })
    .await;
}

/// The server's log (`root/postgres.log`) as text.
pub fn server_log(server: &broker::embedded::PgServer) -> String {
    String::from_utf8_lossy(&std::fs::read(server.root().join("postgres.log")).unwrap())
        .into_owned()
}

/// Asserts that a task succeeded, showing its error when it did not.
#[track_caller]
pub fn succeeded(row: &TaskRow) {
    assert_eq!(
        row.state, "succeeded",
        "{} failed: {:?} (progress {:?})",
        row.kind, row.last_error, row.progress
    );
}
