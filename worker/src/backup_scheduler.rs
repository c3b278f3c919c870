//! The backup scheduler: every `BACKUP_SCHEDULER_MS`, due schedules are claimed (`FOR UPDATE SKIP LOCKED`),
//! each gets a backup task and its next run time in the same transaction. So a due backup is enqueued exactly
//! once whatever the number of workers; one missed while every worker was down fires once when one is back.
//! A backup still running when the next is due is not doubled: the unique index on active backup tasks
//! refuses the second, and the schedule simply moves on.

use std::{sync::Arc, time::Duration};

use anyhow::Context as _;
use broker::{
    db::{backup_schedules, snapshots},
    snapshots::next_run,
};
use chrono::Utc;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::context::Services;

/// Runs until `stop` is cancelled.
pub async fn run(pool: PgPool, services: Arc<Services>, stop: CancellationToken) {
    let every = Duration::from_millis(services.settings.backup_scheduler_ms.max(100));
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = stop.cancelled() => return,
        }
        match once(&pool).await {
            Ok(0) => {}
            Ok(n) => info!(backups = n, "scheduled backups enqueued"),
            Err(e) => {
                warn!(error = %format!("{e:#}"), "the backup scheduler failed; trying again next tick")
            }
        }
    }
}

/// One pass: enqueues a backup for every due schedule. Returns how many were enqueued.
pub async fn once(pool: &PgPool) -> anyhow::Result<usize> {
    let mut tx = pool
        .begin()
        .await
        .context("starting the scheduler transaction")?;
    let due = backup_schedules::claim_due(&mut *tx, 100)
        .await
        .context("reading due schedules")?;
    let mut enqueued = 0;
    for schedule in &due {
        let now = Utc::now();
        // Savepoint per instance: a refused insert (a backup still running) must not undo the others.
        let mut sp = sqlx::Acquire::begin(&mut *tx)
            .await
            .context("starting a savepoint")?;
        match snapshots::enqueue_backup(&mut sp, &schedule.instance_id, "scheduler").await {
            Ok(_) => {
                sp.commit().await.context("releasing the savepoint")?;
                enqueued += 1;
            }
            Err(e) if broker::db::is_unique_violation(&e) => {
                sp.rollback().await.context("rolling back the savepoint")?;
            }
            Err(e) => return Err(e).context("enqueueing a scheduled backup"),
        }
        let next = next_run(&schedule.cron, now).unwrap_or(now + chrono::Duration::days(1));
        backup_schedules::set_next(&mut *tx, &schedule.instance_id, next)
            .await
            .context("moving the schedule on")?;
    }
    tx.commit()
        .await
        .context("committing the scheduled backups")?;
    Ok(enqueued)
}
