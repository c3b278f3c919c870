//! The queue's SQL: claim, heartbeat, completion (always fenced by worker id, state and attempt), release
//! and the reclaim of expired leases. Enqueueing lives in `broker::db::tasks`.

use std::time::Duration;

use chrono::{DateTime, Utc};

use broker::{
    db::{
        tasks::{self, LOST_LEASE_FACTOR, NewTask, TaskRow},
        webhooks,
    },
    model::{Operation, TaskId, TaskState, WebhookBody, kinds},
    telemetry::names,
};
use sqlx::{PgExecutor, PgPool, Postgres, Transaction};
use uuid::Uuid;

/// Attempts of a `webhook.deliver` task.
pub const WEBHOOK_MAX_ATTEMPTS: i32 = 8;

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// Claims up to `limit` due tasks for `worker_id` in one statement. Walks the partial index
/// `tasks_pending_run_at` in `run_at` order, so the cost does not grow with the number queued.
///
/// `from` starts the walk at a `run_at` (the latest this worker claimed): claimed tasks leave dead entries
/// at the head of the index until vacuum gets there, and on a deep queue (where vacuum comes rarely) walking
/// over them would make every claim slower. The runner claims without `from` whenever a floored claim finds
/// too little, and at least once per poll interval, so a task enqueued with an older `run_at` (a released
/// task, a late-committing insert) waits at most that long.
///
/// The rows are found again by `ctid` (a TID scan) rather than by primary key, which saves a B-tree descent
/// per row: the row lock taken in the same statement keeps each locked row where it is. Should a row's
/// `ctid` not match any more, that row is simply not claimed this time; it is never claimed twice.
pub async fn claim(
    db: impl PgExecutor<'_>,
    worker_id: &str,
    limit: usize,
    lease: Duration,
    from: Option<DateTime<Utc>>,
) -> sqlx::Result<Vec<TaskRow>> {
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    sqlx::query_as(
        "WITH next AS (
             SELECT ctid FROM tasks
             WHERE state = 'pending' AND run_at <= now() AND run_at >= COALESCE($4, '-infinity'::timestamptz)
             ORDER BY run_at
             LIMIT $1
             FOR UPDATE SKIP LOCKED
         )
         UPDATE tasks
         SET state = 'running', attempts = attempts + 1, lease_until = now() + make_interval(secs => $2),
             worker_id = $3, updated_at = now()
         WHERE ctid = ANY(ARRAY(SELECT ctid FROM next))
         RETURNING *",
    )
    .bind(limit)
    .bind(secs(lease))
    .bind(worker_id)
    .bind(from)
    .fetch_all(db)
    .await
}

/// How long until the earliest pending task is due (zero when one is due now), if any is pending.
pub async fn next_due_in(db: impl PgExecutor<'_>) -> sqlx::Result<Option<Duration>> {
    let secs = sqlx::query_scalar!(
        r#"SELECT greatest(0, extract(epoch FROM (run_at - now())))::float8 AS "secs!"
           FROM tasks WHERE state = 'pending' ORDER BY run_at LIMIT 1"#
    )
    .fetch_optional(db)
    .await?;
    Ok(secs.map(|s| Duration::from_secs_f64(s.max(0.0))))
}

/// Extends the leases of this worker's running tasks; returns the ids it still holds.
pub async fn heartbeat(
    db: impl PgExecutor<'_>,
    worker_id: &str,
    ids: &[Uuid],
    lease: Duration,
) -> sqlx::Result<Vec<Uuid>> {
    sqlx::query_scalar!(
        "UPDATE tasks SET lease_until = now() + make_interval(secs => $3)
         WHERE worker_id = $1 AND state = 'running' AND id = ANY($2)
         RETURNING id",
        worker_id,
        ids,
        secs(lease),
    )
    .fetch_all(db)
    .await
}

pub async fn set_progress(
    db: impl PgExecutor<'_>,
    task: &TaskRow,
    worker_id: &str,
    text: &str,
) -> sqlx::Result<()> {
    sqlx::query!(
        "UPDATE tasks SET progress = $4, updated_at = now()
         WHERE id = $1 AND worker_id = $2 AND state = 'running' AND attempts = $3",
        task.id,
        worker_id,
        task.attempts,
        text,
    )
    .execute(db)
    .await?;
    Ok(())
}

/// How a run ended, as the queue records it.
#[derive(Debug, Clone)]
pub enum Outcome {
    Succeeded,
    Failed { error: String },
    Retry { after: Duration, error: String },
    Wait { after: Duration, progress: String },
}

impl Outcome {
    /// The word logs and metrics use: `succeeded`, `failed`, `retry`, `wait`.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Succeeded => "succeeded",
            Self::Failed { .. } => "failed",
            Self::Retry { .. } => "retry",
            Self::Wait { .. } => "wait",
        }
    }
}

/// Records the end of a run. Fenced: returns `false` (and changes nothing) when this worker no longer holds
/// the task. A finished operation with a webhook gets its delivery row and `webhook.deliver` task in the
/// same transaction.
pub async fn finish(
    pool: &PgPool,
    task: &TaskRow,
    worker_id: &str,
    outcome: &Outcome,
) -> sqlx::Result<bool> {
    if !owes_webhook(task) {
        // One statement, no explicit transaction: the common case stays at one round trip.
        return Ok(record_outcome(pool, task, worker_id, outcome)
            .await?
            .is_some());
    }
    let mut tx = pool.begin().await?;
    let Some(row) = record_outcome(&mut *tx, task, worker_id, outcome).await? else {
        tx.rollback().await?;
        return Ok(false);
    };
    if row.state().is_finished() {
        on_finished(&mut tx, &row).await?;
    }
    tx.commit().await?;
    Ok(true)
}

/// Whether recording this task's end does more than update its row (a webhook delivery is owed).
pub fn owes_webhook(task: &TaskRow) -> bool {
    task.operation.is_some() && task.webhook_url.is_some()
}

/// One finished run in a batch for [`finish_batch`]: the claim it ended (id and attempt) and, when it
/// failed, why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finished {
    pub id: Uuid,
    pub attempts: i32,
    /// `None`: succeeded; `Some(error)`: failed for good.
    pub error: Option<String>,
}

/// Records many `Succeeded`/`Failed` outcomes in one statement (one commit), each fenced exactly as
/// [`finish`] fences one: by worker id, state `running` and the attempt of the claim. Only for tasks that
/// owe nothing else on finishing (see [`owes_webhook`]). Returns the ids it recorded; the others were no
/// longer held by this worker and are left untouched.
///
/// The sorted subquery keeps the join linear: given `unnest` directly, a generic plan made from statistics
/// that saw few running tasks joins every running task against every batch entry (a 1,000-entry batch
/// took over a second with 3,000 tasks running); sorted, it is a merge join or a primary-key lookup per entry.
pub async fn finish_batch(
    db: impl PgExecutor<'_>,
    worker_id: &str,
    finished: &[Finished],
) -> sqlx::Result<Vec<Uuid>> {
    let ids: Vec<Uuid> = finished.iter().map(|f| f.id).collect();
    let attempts: Vec<i32> = finished.iter().map(|f| f.attempts).collect();
    let states: Vec<String> = finished
        .iter()
        .map(|f| {
            if f.error.is_some() {
                "failed"
            } else {
                "succeeded"
            }
            .to_string()
        })
        .collect();
    let errors: Vec<String> = finished
        .iter()
        .map(|f| f.error.clone().unwrap_or_default())
        .collect();
    sqlx::query_scalar!(
        "UPDATE tasks t
         SET state = f.state,
             last_error = CASE WHEN f.state = 'failed' THEN f.error ELSE t.last_error END,
             lease_until = NULL, finished_at = now(), updated_at = now()
         FROM (SELECT * FROM unnest($2::uuid[], $3::int4[], $4::text[], $5::text[]) AS u(id, attempts, state, error)
               ORDER BY id) AS f
         WHERE t.id = f.id AND t.worker_id = $1 AND t.state = 'running' AND t.attempts = f.attempts
         RETURNING t.id",
        worker_id,
        &ids,
        &attempts,
        &states,
        &errors,
    )
    .fetch_all(db)
    .await
}

/// The fenced UPDATE for an outcome; `None` when this worker no longer holds the task. Every statement takes
/// the task ($1), this worker ($2) and the claim's attempt ($3); then the error or progress text ($4) and the
/// delay in seconds ($5) where the outcome has them.
async fn record_outcome(
    db: impl PgExecutor<'_>,
    task: &TaskRow,
    worker_id: &str,
    outcome: &Outcome,
) -> sqlx::Result<Option<TaskRow>> {
    let (sql, text, after) = match outcome {
        Outcome::Succeeded => (
            "UPDATE tasks SET state = 'succeeded', lease_until = NULL, finished_at = now(), updated_at = now()
             WHERE id = $1 AND worker_id = $2 AND state = 'running' AND attempts = $3
             RETURNING *",
            None,
            None,
        ),
        Outcome::Failed { error } => (
            "UPDATE tasks SET state = 'failed', last_error = $4, lease_until = NULL, finished_at = now(),
                              updated_at = now()
             WHERE id = $1 AND worker_id = $2 AND state = 'running' AND attempts = $3
             RETURNING *",
            Some(error),
            None,
        ),
        Outcome::Retry { after, error } => (
            "UPDATE tasks SET state = 'pending', last_error = $4, run_at = now() + make_interval(secs => $5),
                              lease_until = NULL, worker_id = NULL, updated_at = now()
             WHERE id = $1 AND worker_id = $2 AND state = 'running' AND attempts = $3
             RETURNING *",
            Some(error),
            Some(secs(*after)),
        ),
        Outcome::Wait { after, progress } => (
            "UPDATE tasks SET state = 'pending', progress = $4, attempts = attempts - 1,
                              run_at = now() + make_interval(secs => $5),
                              lease_until = NULL, worker_id = NULL, updated_at = now()
             WHERE id = $1 AND worker_id = $2 AND state = 'running' AND attempts = $3
             RETURNING *",
            Some(progress),
            Some(secs(*after)),
        ),
    };
    let mut query = sqlx::query_as(sql)
        .bind(task.id)
        .bind(worker_id)
        .bind(task.attempts);
    if let Some(text) = text {
        query = query.bind(text);
    }
    if let Some(after) = after {
        query = query.bind(after);
    }
    query.fetch_optional(db).await
}

/// Hands a task back to the queue untouched (hard shutdown): the run did not count as an attempt.
pub async fn release(
    db: impl PgExecutor<'_>,
    task: &TaskRow,
    worker_id: &str,
) -> sqlx::Result<bool> {
    let done = sqlx::query!(
        "UPDATE tasks SET state = 'pending', attempts = attempts - 1, worker_id = NULL, lease_until = NULL,
                          updated_at = now()
         WHERE id = $1 AND worker_id = $2 AND state = 'running' AND attempts = $3",
        task.id,
        worker_id,
        task.attempts,
    )
    .execute(db)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// [`release`] for many claims (id, attempt) in one statement: tasks claimed but never started, handed back
/// on shutdown. Returns how many went back; when any did, other workers are woken to take them.
pub async fn release_many(
    pool: &PgPool,
    worker_id: &str,
    claims: &[(Uuid, i32)],
) -> sqlx::Result<u64> {
    let ids: Vec<Uuid> = claims.iter().map(|c| c.0).collect();
    let attempts: Vec<i32> = claims.iter().map(|c| c.1).collect();
    let released = sqlx::query!(
        "UPDATE tasks t
         SET state = 'pending', attempts = t.attempts - 1, worker_id = NULL, lease_until = NULL, updated_at = now()
         FROM (SELECT * FROM unnest($2::uuid[], $3::int4[]) AS u(id, attempts) ORDER BY id) AS f
         WHERE t.id = f.id AND t.worker_id = $1 AND t.state = 'running' AND t.attempts = f.attempts",
        worker_id,
        &ids,
        &attempts,
    )
    .execute(pool)
    .await?
    .rows_affected();
    if released > 0 {
        sqlx::query!("SELECT pg_notify('berth_tasks', '')")
            .execute(pool)
            .await?;
    }
    Ok(released)
}

/// Turns running tasks whose lease expired (their worker died or hung) back to pending. The lost run is counted
/// in `lost_leases`, not against `max_attempts` (a worker's death is not the task's error), until
/// [`LOST_LEASE_FACTOR`] × `max_attempts` lost runs fail it. Returns how many became pending again.
pub async fn reclaim_expired(pool: &PgPool) -> sqlx::Result<usize> {
    let mut tx = pool.begin().await?;
    let rows: Vec<TaskRow> = sqlx::query_as(
        "WITH lost AS (
             SELECT id, lost_leases + 1 >= $1 * max_attempts AS give_up FROM tasks
             WHERE state = 'running' AND lease_until < now()
             FOR UPDATE SKIP LOCKED
         )
         UPDATE tasks t
         SET state = CASE WHEN lost.give_up THEN 'failed' ELSE 'pending' END,
             lost_leases = t.lost_leases + 1,
             last_error = 'worker lost (lease expired) ' || (t.lost_leases + 1)
                 || CASE WHEN t.lost_leases = 0 THEN ' time' ELSE ' times' END,
             finished_at = CASE WHEN lost.give_up THEN now() END,
             run_at = CASE WHEN lost.give_up THEN t.run_at ELSE now() END,
             worker_id = NULL, lease_until = NULL, updated_at = now()
         FROM lost
         WHERE t.id = lost.id
         RETURNING t.*",
    )
    .bind(LOST_LEASE_FACTOR)
    .fetch_all(&mut *tx)
    .await?;
    let mut pending = 0;
    for row in &rows {
        metrics::counter!(names::TASK_LEASE_EXPIRIES, "kind" => row.kind.clone()).increment(1);
        if row.state().is_finished() {
            on_finished(&mut tx, row).await?;
        } else {
            pending += 1;
        }
    }
    if pending > 0 {
        sqlx::query!("SELECT pg_notify('berth_tasks', '')")
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(pending)
}

/// Before an unbind (deprovision) runs: fails the binding's (instance's) `creation` tasks (bind, provision) that
/// have not started, as cancelled, and says whether one is still running, in which case the caller waits and
/// tries again: undoing never runs beside the creation it undoes (a platform cleaning up after a synchronous
/// request that timed out sends it while the creation goes on), so a creation cannot leave a role or key behind.
/// A claim and the cancel both lock the row first, so a task is either claimed (then seen running) or cancelled.
pub async fn cancel_or_await_creation(
    pool: &PgPool,
    undoing: &TaskRow,
    creation: Operation,
) -> sqlx::Result<bool> {
    let mut tx = pool.begin().await?;
    let cancelled: Vec<Uuid> = sqlx::query_scalar(
        "UPDATE tasks SET state = 'failed', last_error = $5, finished_at = now(), updated_at = now()
         WHERE instance_id = $1 AND binding_id IS NOT DISTINCT FROM $2 AND operation = $3 AND state = 'pending'
           AND created_at <= $4
         RETURNING id",
    )
    .bind(&undoing.instance_id)
    .bind(&undoing.binding_id)
    .bind(creation.as_str())
    .bind(undoing.created_at)
    .bind(format!(
        "cancelled: {} was requested before it started",
        match undoing.operation {
            Some(Operation::Unbind) => "an unbind",
            Some(Operation::Deprovision) => "a deprovision",
            _ => "a deletion",
        }
    ))
    .fetch_all(&mut *tx)
    .await?;
    for id in cancelled {
        if let Some(row) = tasks::get(&mut *tx, TaskId(id)).await? {
            on_finished(&mut tx, &row).await?;
        }
    }
    let running: bool = sqlx::query_scalar(
        "SELECT EXISTS (
             SELECT 1 FROM tasks
             WHERE instance_id = $1 AND binding_id IS NOT DISTINCT FROM $2 AND operation = $3
               AND state IN ('pending', 'running') AND created_at <= $4
         )",
    )
    .bind(&undoing.instance_id)
    .bind(&undoing.binding_id)
    .bind(creation.as_str())
    .bind(undoing.created_at)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(running)
}

/// A finished operation with a webhook owes a delivery: the row plus the task that sends it.
async fn on_finished(tx: &mut Transaction<'_, Postgres>, row: &TaskRow) -> sqlx::Result<()> {
    let (Some(operation), Some(url), Some(secret)) =
        (&row.operation, &row.webhook_url, &row.webhook_secret)
    else {
        return Ok(());
    };
    let succeeded = row.state == TaskState::Succeeded;
    let description = if succeeded {
        row.progress
            .clone()
            .unwrap_or_else(|| format!("{operation} succeeded"))
    } else {
        row.last_error
            .clone()
            .unwrap_or_else(|| format!("{operation} failed"))
    };
    let body = WebhookBody {
        instance_id: row.instance_id.clone().unwrap_or_default(),
        binding_id: row.binding_id.clone(),
        operation: row.id.to_string(),
        state: row.state.to_string(),
        description,
    };
    let body = serde_json::to_value(&body).expect("a webhook body serializes");
    let delivery_id = Uuid::new_v4();
    webhooks::insert(&mut **tx, delivery_id, row.id, url, secret, &body).await?;
    let mut task = NewTask::new(
        kinds::DELIVER_WEBHOOK,
        serde_json::json!({ "delivery_id": delivery_id }),
    );
    task.max_attempts = WEBHOOK_MAX_ATTEMPTS;
    task.request_id = row.request_id.clone();
    tasks::enqueue(&mut **tx, task).await?;
    Ok(())
}

/// Counts of tasks by state (tests and benchmarks).
pub async fn unfinished_count(db: impl PgExecutor<'_>) -> sqlx::Result<i64> {
    sqlx::query_scalar!(
        r#"SELECT count(*) AS "n!" FROM tasks WHERE state IN ('pending', 'running')"#
    )
    .fetch_one(db)
    .await
}

/// Full-jitter exponential backoff: a random delay in `[0, min(cap, base * 2^(attempt-1))]`.
pub fn backoff(attempt: i32, base: Duration, cap: Duration) -> Duration {
    use rand::Rng;
    let ceiling = backoff_ceiling(attempt, base, cap);
    let millis = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(rand::thread_rng().gen_range(0..=millis))
}

/// The largest delay [`backoff`] picks for `attempt`.
pub fn backoff_ceiling(attempt: i32, base: Duration, cap: Duration) -> Duration {
    let exponent = u32::try_from(attempt.saturating_sub(1))
        .unwrap_or(0)
        .min(30);
    base.saturating_mul(1u32 << exponent).min(cap)
}
