//! `backup_schedules`: the instances with a `backups` parameter and when each is next due.

use chrono::{DateTime, Utc};
use sqlx::PgExecutor;

#[derive(Debug, Clone)]
pub struct ScheduleRow {
    pub instance_id: String,
    pub cron: String,
    pub retention: i32,
    pub next_run_at: DateTime<Utc>,
}

/// Sets (or replaces) an instance's schedule.
pub async fn upsert(
    db: impl PgExecutor<'_>,
    instance_id: &str,
    cron: &str,
    retention: i32,
    next_run_at: DateTime<Utc>,
) -> sqlx::Result<()> {
    sqlx::query!(
        "INSERT INTO backup_schedules (instance_id, cron, retention, next_run_at) VALUES ($1, $2, $3, $4)
         ON CONFLICT (instance_id) DO UPDATE
         SET cron = EXCLUDED.cron, retention = EXCLUDED.retention,
             next_run_at = CASE WHEN backup_schedules.cron = EXCLUDED.cron THEN backup_schedules.next_run_at
                                ELSE EXCLUDED.next_run_at END",
        instance_id,
        cron,
        retention,
        next_run_at,
    )
    .execute(db)
    .await?;
    Ok(())
}

pub async fn delete(db: impl PgExecutor<'_>, instance_id: &str) -> sqlx::Result<()> {
    sqlx::query!(
        "DELETE FROM backup_schedules WHERE instance_id = $1",
        instance_id
    )
    .execute(db)
    .await?;
    Ok(())
}

pub async fn get(db: impl PgExecutor<'_>, instance_id: &str) -> sqlx::Result<Option<ScheduleRow>> {
    sqlx::query_as!(
        ScheduleRow,
        "SELECT * FROM backup_schedules WHERE instance_id = $1",
        instance_id
    )
    .fetch_optional(db)
    .await
}

/// Due schedules, locked for this transaction; other schedulers skip them.
pub async fn claim_due(db: impl PgExecutor<'_>, limit: i64) -> sqlx::Result<Vec<ScheduleRow>> {
    sqlx::query_as!(
        ScheduleRow,
        "SELECT * FROM backup_schedules WHERE next_run_at <= now()
         ORDER BY next_run_at LIMIT $1 FOR UPDATE SKIP LOCKED",
        limit
    )
    .fetch_all(db)
    .await
}

pub async fn set_next(
    db: impl PgExecutor<'_>,
    instance_id: &str,
    next_run_at: DateTime<Utc>,
) -> sqlx::Result<()> {
    sqlx::query!(
        "UPDATE backup_schedules SET next_run_at = $2 WHERE instance_id = $1",
        instance_id,
        next_run_at
    )
    .execute(db)
    .await?;
    Ok(())
}
