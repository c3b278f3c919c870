//! `tasks`: the durable queue. The API enqueues here in the same transaction as the row it changes;
//! the worker's claim, heartbeat and completion queries live in the worker.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgExecutor;
use uuid::Uuid;

use crate::model::{Operation, TaskId, TaskState};

/// A row of `tasks`. Read with runtime queries (`sqlx::FromRow`), so `state` and `operation` are checked as
/// they are decoded: a word berth does not know is a decode error naming it, never a state it guessed.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct TaskRow {
    pub id: Uuid,
    pub kind: String,
    pub instance_id: Option<String>,
    pub binding_id: Option<String>,
    pub operation: Option<Operation>,
    pub payload: Value,
    pub state: TaskState,
    pub attempts: i32,
    pub max_attempts: i32,
    pub run_at: DateTime<Utc>,
    pub lease_until: Option<DateTime<Utc>>,
    pub worker_id: Option<String>,
    pub progress: Option<String>,
    pub last_error: Option<String>,
    pub originating_identity: Option<Value>,
    pub webhook_url: Option<String>,
    pub webhook_secret: Option<Vec<u8>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    /// Runs lost with their worker (lease expired); they do not count against `max_attempts`.
    #[sqlx(default)]
    pub lost_leases: i32,
    /// The API request that wrote the task (see [`crate::request_context`]); on the task's log lines.
    #[sqlx(default)]
    pub request_id: Option<String>,
}

/// How many lost runs (lease expired) a task may have per attempt it is allowed: past
/// `LOST_LEASE_FACTOR × max_attempts` it fails, so a task that kills each worker running it does not do so forever.
pub const LOST_LEASE_FACTOR: i32 = 3;

impl TaskRow {
    /// Runs that ended in an error (or are running now): the claims, less those lost with their worker.
    pub fn attempts_spent(&self) -> i32 {
        self.attempts - self.lost_leases
    }

    pub fn task_id(&self) -> TaskId {
        TaskId(self.id)
    }

    pub fn state(&self) -> TaskState {
        self.state
    }

    /// Whether this task is `operation` on the instance itself (not on one of its bindings).
    pub fn is_instance(&self, operation: Operation) -> bool {
        self.binding_id.is_none() && self.operation == Some(operation)
    }
}

/// A task to enqueue.
#[derive(Debug, Clone)]
pub struct NewTask {
    pub id: TaskId,
    pub kind: &'static str,
    pub instance_id: Option<String>,
    pub binding_id: Option<String>,
    pub operation: Option<Operation>,
    pub payload: Value,
    pub max_attempts: i32,
    pub originating_identity: Option<Value>,
    /// URL and sealed secret of the webhook to call when the task ends.
    pub webhook: Option<(String, Vec<u8>)>,
    /// The request that asked for it; [`NewTask::new`] takes the current one ([`crate::request_context`]).
    pub request_id: Option<String>,
}

impl NewTask {
    pub fn new(kind: &'static str, payload: Value) -> Self {
        Self {
            id: TaskId::new(),
            kind,
            instance_id: None,
            binding_id: None,
            operation: None,
            payload,
            max_attempts: 10,
            originating_identity: None,
            webhook: None,
            request_id: crate::request_context::current_id(),
        }
    }
}

/// Adds a task; workers hear of it through the insert trigger's NOTIFY once the transaction commits.
pub async fn enqueue(db: impl PgExecutor<'_>, task: NewTask) -> sqlx::Result<TaskId> {
    let (webhook_url, webhook_secret) = match task.webhook {
        Some((url, secret)) => (Some(url), Some(secret)),
        None => (None, None),
    };
    sqlx::query!(
        "INSERT INTO tasks (id, kind, instance_id, binding_id, operation, payload, max_attempts,
                            originating_identity, webhook_url, webhook_secret, request_id)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        task.id.0,
        task.kind,
        task.instance_id,
        task.binding_id,
        task.operation.map(Operation::as_str),
        task.payload,
        task.max_attempts,
        task.originating_identity,
        webhook_url,
        webhook_secret,
        task.request_id,
    )
    .execute(db)
    .await?;
    Ok(task.id)
}

pub async fn get(db: impl PgExecutor<'_>, id: TaskId) -> sqlx::Result<Option<TaskRow>> {
    sqlx::query_as("SELECT * FROM tasks WHERE id = $1")
        .bind(id.0)
        .fetch_optional(db)
        .await
}

/// The newest instance-level operation (provision, update, deprovision) on an instance.
pub async fn latest_instance_operation(
    db: impl PgExecutor<'_>,
    instance_id: &str,
) -> sqlx::Result<Option<TaskRow>> {
    sqlx::query_as(
        "SELECT * FROM tasks
         WHERE instance_id = $1 AND binding_id IS NULL AND operation IS NOT NULL
         ORDER BY created_at DESC LIMIT 1",
    )
    .bind(instance_id)
    .fetch_optional(db)
    .await
}

/// The newest operation (bind, unbind) on a binding.
pub async fn latest_binding_operation(
    db: impl PgExecutor<'_>,
    binding_id: &str,
) -> sqlx::Result<Option<TaskRow>> {
    sqlx::query_as(
        "SELECT * FROM tasks
         WHERE binding_id = $1 AND operation IS NOT NULL
         ORDER BY created_at DESC LIMIT 1",
    )
    .bind(binding_id)
    .fetch_optional(db)
    .await
}

/// Unfinished operations on an instance or any of its bindings, newest first.
pub async fn active_operations(
    db: impl PgExecutor<'_>,
    instance_id: &str,
) -> sqlx::Result<Vec<TaskRow>> {
    sqlx::query_as(
        "SELECT * FROM tasks
         WHERE instance_id = $1 AND operation IS NOT NULL AND state IN ('pending', 'running')
         ORDER BY created_at DESC",
    )
    .bind(instance_id)
    .fetch_all(db)
    .await
}

/// Whether `operation` succeeded on the instance (`binding_id` `None`) or on the binding, counting only tasks
/// created at or after `since` (the row's `created_at`, so an id reused after a delete starts afresh).
pub async fn has_succeeded_since(
    db: impl PgExecutor<'_>,
    instance_id: &str,
    binding_id: Option<&str>,
    operation: Operation,
    since: DateTime<Utc>,
) -> sqlx::Result<bool> {
    sqlx::query_scalar!(
        r#"SELECT EXISTS (
               SELECT 1 FROM tasks
               WHERE instance_id = $1 AND binding_id IS NOT DISTINCT FROM $2 AND operation = $3
                 AND state = 'succeeded' AND created_at >= $4
           ) AS "exists!""#,
        instance_id,
        binding_id,
        operation.as_str(),
        since,
    )
    .fetch_one(db)
    .await
}

/// Whether the binding has a task of `kind` that is unfinished, or that failed after `failed_since` (a task
/// that keeps failing is not queued again at once).
pub async fn binding_task_active_or_failed_since(
    db: impl PgExecutor<'_>,
    binding_id: &str,
    kind: &str,
    failed_since: DateTime<Utc>,
) -> sqlx::Result<bool> {
    sqlx::query_scalar!(
        r#"SELECT EXISTS (
               SELECT 1 FROM tasks
               WHERE binding_id = $1 AND kind = $2
                 AND (state IN ('pending', 'running') OR (state = 'failed' AND finished_at > $3))
           ) AS "exists!""#,
        binding_id,
        kind,
        failed_since,
    )
    .fetch_one(db)
    .await
}
