//! What the dashboard pages read: an instance's operations, snapshots and bindings, and the operator overview
//! (instances per plan and state, the queue by kind, recent failures). Runtime queries, so task and snapshot
//! states are checked as they are decoded, as everywhere else.

use sqlx::PgExecutor;

use super::{snapshots::SnapshotRow, tasks::TaskRow};
use crate::model::{Operation, TaskState};

/// The newest `limit` tasks of an instance (its operations, its bindings' and its snapshots'), newest first.
pub async fn instance_tasks(
    db: impl PgExecutor<'_>,
    instance_id: &str,
    limit: i64,
) -> sqlx::Result<Vec<TaskRow>> {
    sqlx::query_as("SELECT * FROM tasks WHERE instance_id = $1 ORDER BY created_at DESC LIMIT $2")
        .bind(instance_id)
        .bind(limit)
        .fetch_all(db)
        .await
}

/// A snapshot of an instance, with its preset's name when it is a preset version.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct InstanceSnapshot {
    #[sqlx(flatten)]
    pub snapshot: SnapshotRow,
    pub preset_name: Option<String>,
}

/// The backups of an instance and the preset versions pushed from it, newest first.
pub async fn instance_snapshots(
    db: impl PgExecutor<'_>,
    instance_id: &str,
    limit: i64,
) -> sqlx::Result<Vec<InstanceSnapshot>> {
    sqlx::query_as(
        "SELECT s.*, p.name AS preset_name FROM snapshots s LEFT JOIN presets p ON p.id = s.preset_id
         WHERE s.instance_id = $1 ORDER BY s.created_at DESC LIMIT $2",
    )
    .bind(instance_id)
    .bind(limit)
    .fetch_all(db)
    .await
}

/// How many instances of a plan are in one state (see [`instance_state`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanStateCount {
    pub plan_id: String,
    pub state: &'static str,
    pub instances: i64,
}

/// Instances per plan and state, by each instance's newest instance operation.
pub async fn instances_per_plan_and_state(
    db: impl PgExecutor<'_>,
) -> sqlx::Result<Vec<PlanStateCount>> {
    let rows: Vec<(String, Option<Operation>, Option<TaskState>, i64)> = sqlx::query_as(
        "SELECT i.plan_id, t.operation, t.state, count(*)
         FROM service_instances i
         LEFT JOIN LATERAL (
             SELECT operation, state FROM tasks
             WHERE instance_id = i.id AND binding_id IS NULL AND operation IS NOT NULL
               AND created_at >= i.created_at
             ORDER BY created_at DESC LIMIT 1
         ) t ON true
         GROUP BY 1, 2, 3",
    )
    .fetch_all(db)
    .await?;
    let mut counts: Vec<PlanStateCount> = Vec::new();
    for (plan_id, operation, state, instances) in rows {
        let state = instance_state(operation.zip(state));
        match counts
            .iter_mut()
            .find(|c| c.plan_id == plan_id && c.state == state)
        {
            Some(count) => count.instances += instances,
            None => counts.push(PlanStateCount {
                plan_id,
                state,
                instances,
            }),
        }
    }
    counts.sort_by(|a, b| (&a.plan_id, a.state).cmp(&(&b.plan_id, b.state)));
    Ok(counts)
}

/// An instance's state in a word, from its newest instance operation and that operation's state.
pub fn instance_state(latest: Option<(Operation, TaskState)>) -> &'static str {
    use Operation::*;
    use TaskState::*;
    match latest {
        None => "unknown",
        Some((Provision, Pending | Running)) => "provisioning",
        Some((Provision, Failed)) => "provision failed",
        Some((Deprovision, Pending | Running)) => "deprovisioning",
        Some((Deprovision, Failed)) => "deprovision failed",
        Some((Update, Pending | Running)) => "updating",
        Some((_, Pending | Running)) => "changing",
        Some((Update, Failed)) => "ready (last update failed)",
        Some((_, Failed)) => "ready (last operation failed)",
        Some((_, Succeeded)) => "ready",
    }
}

/// The queue's tasks of one kind.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct QueueKind {
    pub kind: String,
    pub pending: i64,
    /// Pending and due now.
    pub due: i64,
    pub running: i64,
    /// Seconds the longest-waiting due task has waited (0 with none due).
    pub oldest_due_secs: f64,
    /// Failed within the last 24 hours.
    pub failed_24h: i64,
}

/// The queue by kind: unfinished tasks and the failures of the last day (each part read through its index).
pub async fn queue_by_kind(db: impl PgExecutor<'_>) -> sqlx::Result<Vec<QueueKind>> {
    sqlx::query_as(
        "SELECT kind, sum(pending)::int8 AS pending, sum(due)::int8 AS due, sum(running)::int8 AS running,
                coalesce(max(oldest_due), 0)::float8 AS oldest_due_secs, sum(failed)::int8 AS failed_24h
         FROM (
             SELECT kind, count(*) AS pending, count(*) FILTER (WHERE run_at <= now()) AS due, 0::int8 AS running,
                    extract(epoch FROM now() - min(run_at) FILTER (WHERE run_at <= now())) AS oldest_due,
                    0::int8 AS failed
             FROM tasks WHERE state = 'pending' GROUP BY kind
             UNION ALL
             SELECT kind, 0, 0, count(*), NULL, 0 FROM tasks WHERE state = 'running' GROUP BY kind
             UNION ALL
             SELECT kind, 0, 0, 0, NULL, count(*) FROM tasks
             WHERE state = 'failed' AND finished_at > now() - interval '24 hours' GROUP BY kind
         ) q
         GROUP BY kind ORDER BY kind",
    )
    .fetch_all(db)
    .await
}

/// The newest failed tasks, newest first.
pub async fn recent_failures(db: impl PgExecutor<'_>, limit: i64) -> sqlx::Result<Vec<TaskRow>> {
    sqlx::query_as(
        "SELECT * FROM tasks WHERE state = 'failed' AND finished_at IS NOT NULL
         ORDER BY finished_at DESC LIMIT $1",
    )
    .bind(limit)
    .fetch_all(db)
    .await
}
