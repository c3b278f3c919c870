//! `instance_events`: the audit trail of an instance (who asked for what, when, from which request, how it
//! ended). The rows are written by triggers on `tasks` (migration `20261207200000_audit_events.sql`); this module
//! reads and prunes them.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::PgExecutor;
use uuid::Uuid;

use crate::identity::Actor;

/// One audited action on an instance, as `/berth/v1/instances/{id}/events` and the dashboard show it.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Event {
    /// Increasing with time; the paging cursor.
    pub id: i64,
    pub instance_id: String,
    pub binding_id: Option<String>,
    /// The OSB operation (`provision`, `bind`, `switchover`, `restore`, ...) or, for berth's own tasks, the task
    /// kind (`instance.backup`, `preset.push`, `binding.expire`).
    pub action: String,
    /// Safe fields of the request: `snapshot_id`, `plan_id`.
    #[schema(value_type = Object)]
    pub detail: Value,
    /// The task that carries it out (the OSB `operation`).
    pub task_id: Uuid,
    pub request_id: Option<String>,
    /// Who asked; `None` when the platform did not say.
    pub actor: Option<Actor>,
    pub requested_at: DateTime<Utc>,
    /// `None` while the task runs; `succeeded` or `failed` after.
    pub outcome: Option<String>,
    /// The task's error when it failed.
    pub error: Option<String>,
    pub finished_at: Option<DateTime<Utc>>,
}

#[derive(sqlx::FromRow)]
struct EventRow {
    id: i64,
    instance_id: String,
    binding_id: Option<String>,
    action: String,
    detail: Value,
    task_id: Uuid,
    request_id: Option<String>,
    originating_identity: Option<Value>,
    requested_at: DateTime<Utc>,
    outcome: Option<String>,
    error: Option<String>,
    finished_at: Option<DateTime<Utc>>,
}

impl From<EventRow> for Event {
    fn from(row: EventRow) -> Self {
        Self {
            id: row.id,
            instance_id: row.instance_id,
            binding_id: row.binding_id,
            action: row.action,
            detail: row.detail,
            task_id: row.task_id,
            request_id: row.request_id,
            actor: row
                .originating_identity
                .as_ref()
                .and_then(Actor::from_identity),
            requested_at: row.requested_at,
            outcome: row.outcome,
            error: row.error,
            finished_at: row.finished_at,
        }
    }
}

/// Up to `limit` events of the instance, newest first, older than the event `before` when given.
pub async fn for_instance(
    db: impl PgExecutor<'_>,
    instance_id: &str,
    before: Option<i64>,
    limit: i64,
) -> sqlx::Result<Vec<Event>> {
    let rows: Vec<EventRow> = sqlx::query_as(
        "SELECT id, instance_id, binding_id, action, detail, task_id, request_id, originating_identity,
                requested_at, outcome, error, finished_at
         FROM instance_events
         WHERE instance_id = $1 AND ($2::int8 IS NULL OR id < $2)
         ORDER BY id DESC LIMIT $3",
    )
    .bind(instance_id)
    .bind(before)
    .bind(limit)
    .fetch_all(db)
    .await?;
    Ok(rows.into_iter().map(Event::from).collect())
}

/// Deletes the trails of instances that are gone and whose last event is older than `retention_days`; returns
/// how many events went.
pub async fn prune(db: impl PgExecutor<'_>, retention_days: u64) -> sqlx::Result<u64> {
    let days = i32::try_from(retention_days).unwrap_or(i32::MAX);
    let done = sqlx::query(
        "DELETE FROM instance_events e
         WHERE NOT EXISTS (SELECT 1 FROM service_instances i WHERE i.id = e.instance_id)
           AND NOT EXISTS (SELECT 1 FROM instance_events n
                           WHERE n.instance_id = e.instance_id
                             AND coalesce(n.finished_at, n.requested_at) > now() - make_interval(days => $1))",
    )
    .bind(days)
    .execute(db)
    .await?;
    Ok(done.rows_affected())
}
