//! `pool_items` and `pool_stats` (docs/pools.md): warm-pool items, the claim that hands one to a provision, and
//! the counts `/metrics` shows. Runtime queries: the rows are small and the table is new.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{FromRow, PgExecutor};

use super::tasks::NewTask;
use crate::model::{TaskId, kinds};

#[derive(Debug, Clone, FromRow)]
pub struct PoolItem {
    pub id: String,
    pub plan_id: String,
    pub state: String,
    pub details: Value,
    pub secrets: Option<Vec<u8>>,
    pub task_id: Option<uuid::Uuid>,
    pub created_at: DateTime<Utc>,
    pub ready_at: Option<DateTime<Utc>>,
    /// A preset clone's pool (`name` or `name@version`) and the version's snapshot; `None` for the plan's own.
    pub preset_target: Option<String>,
    pub preset_snapshot_id: Option<uuid::Uuid>,
}

pub const FILLING: &str = "filling";
pub const READY: &str = "ready";
pub const REMOVING: &str = "removing";

/// An item a provision took: its details and sealed secrets become the instance's.
#[derive(Debug, Clone, FromRow)]
pub struct ClaimedItem {
    pub id: String,
    pub details: Value,
    pub secrets: Option<Vec<u8>>,
}

/// Takes the oldest ready item of `plan_id`, if any, for the caller's transaction: the row is deleted, so
/// the item is the caller's once it commits and back in the pool if it rolls back. `SKIP LOCKED`: two
/// provisions never wait for each other nor get the same item. `preset_snapshot`: a clone of that preset
/// version; `None`: an item made with the plan's defaults (never a clone).
pub async fn claim(
    db: impl PgExecutor<'_>,
    plan_id: &str,
    preset_snapshot: Option<uuid::Uuid>,
) -> sqlx::Result<Option<ClaimedItem>> {
    sqlx::query_as(
        "DELETE FROM pool_items WHERE id = (
             SELECT id FROM pool_items
             WHERE plan_id = $1 AND state = 'ready' AND preset_snapshot_id IS NOT DISTINCT FROM $2
             ORDER BY ready_at LIMIT 1 FOR UPDATE SKIP LOCKED)
         RETURNING id, details, secrets",
    )
    .bind(plan_id)
    .bind(preset_snapshot)
    .fetch_optional(db)
    .await
}

/// Counts a provision of a pooled plan as a hit or a miss.
pub async fn count(db: impl PgExecutor<'_>, plan_id: &str, hit: bool) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO pool_stats (plan_id, hits, misses) VALUES ($1, $2, $3)
         ON CONFLICT (plan_id) DO UPDATE
         SET hits = pool_stats.hits + $2, misses = pool_stats.misses + $3",
    )
    .bind(plan_id)
    .bind(i64::from(hit))
    .bind(i64::from(!hit))
    .execute(db)
    .await?;
    Ok(())
}

pub async fn get(db: impl PgExecutor<'_>, id: &str) -> sqlx::Result<Option<PoolItem>> {
    sqlx::query_as("SELECT * FROM pool_items WHERE id = $1")
        .bind(id)
        .fetch_optional(db)
        .await
}

pub async fn list(db: impl PgExecutor<'_>) -> sqlx::Result<Vec<PoolItem>> {
    sqlx::query_as("SELECT * FROM pool_items ORDER BY plan_id, created_at")
        .fetch_all(db)
        .await
}

/// A filling item's details before its engine makes anything (the host whose worker fills it).
pub async fn set_filling_details(
    db: impl PgExecutor<'_>,
    id: &str,
    details: &Value,
) -> sqlx::Result<()> {
    sqlx::query("UPDATE pool_items SET details = $2 WHERE id = $1 AND state = 'filling'")
        .bind(id)
        .bind(details)
        .execute(db)
        .await?;
    Ok(())
}

/// Merges `patch` into a filling item's details: what its engine's steps made so far, so a fill run again
/// (after a `Wait`, or by another worker) goes on where the last run stopped.
pub async fn merge_filling_details(
    db: impl PgExecutor<'_>,
    id: &str,
    patch: &Value,
) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE pool_items SET details = details || $2 WHERE id = $1 AND state = 'filling'",
    )
    .bind(id)
    .bind(patch)
    .execute(db)
    .await?;
    Ok(())
}

/// A filling item's sealed secrets, kept before its engine makes anything with them (a retry uses the same).
pub async fn set_filling_secrets(
    db: impl PgExecutor<'_>,
    id: &str,
    secrets: &[u8],
) -> sqlx::Result<()> {
    sqlx::query("UPDATE pool_items SET secrets = $2 WHERE id = $1 AND state = 'filling'")
        .bind(id)
        .bind(secrets)
        .execute(db)
        .await?;
    Ok(())
}

/// Records what the fill made and offers the item. `false` when the item is no longer filling (being removed).
pub async fn mark_ready(
    db: impl PgExecutor<'_>,
    id: &str,
    details: &Value,
    secrets: Option<&[u8]>,
) -> sqlx::Result<bool> {
    let done = sqlx::query(
        "UPDATE pool_items SET state = 'ready', details = $2, secrets = $3, ready_at = now()
         WHERE id = $1 AND state = 'filling'",
    )
    .bind(id)
    .bind(details)
    .bind(secrets)
    .execute(db)
    .await?;
    Ok(done.rows_affected() == 1)
}

pub async fn delete(db: impl PgExecutor<'_>, id: &str) -> sqlx::Result<()> {
    sqlx::query("DELETE FROM pool_items WHERE id = $1")
        .bind(id)
        .execute(db)
        .await?;
    Ok(())
}

/// What a pool.fill clones into its item: the pool's `POOL_TARGETS` entry and the preset version's snapshot.
#[derive(Debug, Clone, Copy)]
pub struct CloneOf<'a> {
    pub target: &'a str,
    pub snapshot_id: uuid::Uuid,
}

/// Inserts a filling item of `plan_id` (a clone of `clone`'s version, if given) and its `pool.fill` task, due
/// after `delay_ms` (user tasks enqueued meanwhile go first: claims take tasks in `run_at` order).
pub async fn start_fill(
    db: &mut sqlx::PgConnection,
    plan_id: &str,
    id: &str,
    clone: Option<CloneOf<'_>>,
    delay_ms: i64,
) -> sqlx::Result<TaskId> {
    let task = enqueue(db, kinds::POOL_FILL, id, delay_ms).await?;
    sqlx::query(
        "INSERT INTO pool_items (id, plan_id, task_id, preset_target, preset_snapshot_id)
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(id)
    .bind(plan_id)
    .bind(task.0)
    .bind(clone.map(|c| c.target))
    .bind(clone.map(|c| c.snapshot_id))
    .execute(&mut *db)
    .await?;
    Ok(task)
}

/// Starts removing the ready clones of the given preset versions (their preset or version was deleted). A
/// clone still filling fails to find its version, and the pool check removes what it made. Returns how many.
pub async fn drain_clones_of(
    db: &mut sqlx::PgConnection,
    snapshot_ids: &[uuid::Uuid],
) -> sqlx::Result<usize> {
    let ids: Vec<String> = sqlx::query_scalar(
        "SELECT id FROM pool_items WHERE state = 'ready' AND preset_snapshot_id = ANY($1)
         ORDER BY id FOR UPDATE",
    )
    .bind(snapshot_ids)
    .fetch_all(&mut *db)
    .await?;
    let mut started = 0;
    for id in &ids {
        if start_remove(db, id).await? {
            started += 1;
        }
    }
    Ok(started)
}

/// Marks an item `removing` and enqueues its `pool.remove` task (unless it is being removed already).
pub async fn start_remove(db: &mut sqlx::PgConnection, id: &str) -> sqlx::Result<bool> {
    let done = sqlx::query(
        "UPDATE pool_items SET state = 'removing' WHERE id = $1 AND state <> 'removing'",
    )
    .bind(id)
    .execute(&mut *db)
    .await?;
    if done.rows_affected() == 0 {
        return Ok(false);
    }
    enqueue_remove(db, id).await?;
    Ok(true)
}

/// A `pool.remove` task for an item already `removing` (and the item's task from now on).
pub async fn enqueue_remove(db: &mut sqlx::PgConnection, id: &str) -> sqlx::Result<TaskId> {
    let task = enqueue(db, kinds::POOL_REMOVE, id, 0).await?;
    sqlx::query("UPDATE pool_items SET task_id = $2 WHERE id = $1")
        .bind(id)
        .bind(task.0)
        .execute(&mut *db)
        .await?;
    Ok(task)
}

async fn enqueue(
    db: &mut sqlx::PgConnection,
    kind: &'static str,
    item: &str,
    delay_ms: i64,
) -> sqlx::Result<TaskId> {
    let task = NewTask::new(kind, serde_json::json!({ "item": item }));
    sqlx::query(
        "INSERT INTO tasks (id, kind, payload, max_attempts, run_at)
         VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5::float8 / 1000))",
    )
    .bind(task.id.0)
    .bind(task.kind)
    .bind(&task.payload)
    .bind(task.max_attempts)
    .bind(delay_ms as f64)
    .execute(db)
    .await?;
    Ok(task.id)
}

/// Filling items whose `pool.fill` task failed for good (or is gone): what is left of them must be removed.
pub async fn abandoned_fills(db: impl PgExecutor<'_>) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar(
        "SELECT i.id FROM pool_items i LEFT JOIN tasks t ON t.id = i.task_id
         WHERE i.state = 'filling' AND (t.id IS NULL OR t.state IN ('failed', 'succeeded'))",
    )
    .fetch_all(db)
    .await
}

/// Removing items whose `pool.remove` task failed for good at least ten minutes ago (or is gone): they get
/// another one, so a removal that keeps failing is tried again every ten minutes, not at every check.
pub async fn stalled_removals(db: impl PgExecutor<'_>) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar(
        "SELECT i.id FROM pool_items i LEFT JOIN tasks t ON t.id = i.task_id
         WHERE i.state = 'removing'
           AND (t.id IS NULL OR (t.state = 'failed' AND t.finished_at < now() - interval '10 minutes'))",
    )
    .fetch_all(db)
    .await
}

/// Per pool: ready, filling and removing items, and per plan hits and misses (every plan with items or counts).
/// `pool` is `""` for the plan's own items (and the plan's hits and misses, which count every provision of it),
/// or the `POOL_TARGETS` preset (`name` or `name@version`) whose clones the row counts.
#[derive(Debug, Clone, FromRow, PartialEq, Eq)]
pub struct PoolStats {
    pub plan_id: String,
    pub pool: String,
    pub ready: i64,
    pub filling: i64,
    pub removing: i64,
    pub hits: i64,
    pub misses: i64,
}

pub async fn stats(db: impl PgExecutor<'_>) -> sqlx::Result<Vec<PoolStats>> {
    sqlx::query_as(
        "SELECT plan_id, pool,
                coalesce(sum(ready), 0)::int8 AS ready, coalesce(sum(filling), 0)::int8 AS filling,
                coalesce(sum(removing), 0)::int8 AS removing,
                coalesce(sum(hits), 0)::int8 AS hits, coalesce(sum(misses), 0)::int8 AS misses
         FROM (
             SELECT plan_id, coalesce(preset_target, '') AS pool,
                    count(*) FILTER (WHERE state = 'ready') AS ready,
                    count(*) FILTER (WHERE state = 'filling') AS filling,
                    count(*) FILTER (WHERE state = 'removing') AS removing, 0 AS hits, 0 AS misses
             FROM pool_items GROUP BY 1, 2
             UNION ALL
             SELECT plan_id, '', 0, 0, 0, hits, misses FROM pool_stats
         ) s
         GROUP BY plan_id, pool ORDER BY plan_id, pool",
    )
    .fetch_all(db)
    .await
}
