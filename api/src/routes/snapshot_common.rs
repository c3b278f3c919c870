//! What backups and presets share: a snapshot as JSON, and the restore of one into an instance.

use broker::{
    db::{
        instances::InstanceRow,
        snapshots::{SnapshotRow, SnapshotState},
        tasks,
    },
    model::{Operation, TaskId, TaskState},
};
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Value, json};
use sqlx::PgConnection;
use utoipa::ToSchema;
use uuid::Uuid;

use super::{
    Origin,
    exclusive::{self, Again},
    instances::provisioned_instance,
};
use crate::{
    AppState,
    error::{ApiError, ApiResult},
};

/// A snapshot (backup or preset version) as the API shows it.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Snapshot {
    id: Uuid,
    /// A preset's version number (null for a backup).
    version: Option<i32>,
    state: SnapshotState,
    /// The instance it was taken of.
    instance_id: Option<String>,
    /// The task that makes it (`/berth/v1/tasks/{operation}`).
    operation: Uuid,
    description: Option<String>,
    created_by: Option<String>,
    created_at: DateTime<Utc>,
    completed_at: Option<DateTime<Utc>>,
    /// The stored object's size (compressed, encrypted).
    size_bytes: Option<i64>,
    /// The dump's size before compression.
    dump_bytes: Option<i64>,
    /// Of the stored object.
    sha256: Option<String>,
}

/// A snapshot as the API shows it. A pending snapshot whose task gave up is failed, whatever the row still
/// says.
pub(crate) async fn snapshot_json(conn: &mut PgConnection, s: &SnapshotRow) -> ApiResult<Snapshot> {
    let task_state = if s.state == SnapshotState::Pending {
        tasks::get(&mut *conn, TaskId(s.task_id))
            .await?
            .map(|t| t.state)
    } else {
        None
    };
    let state = match (s.state, task_state) {
        (SnapshotState::Pending, Some(TaskState::Failed)) => SnapshotState::Failed,
        (state, _) => state,
    };
    Ok(Snapshot {
        id: s.id,
        version: s.version,
        state,
        instance_id: s.instance_id.clone(),
        operation: s.task_id,
        description: s.description.clone(),
        created_by: s.created_by.clone(),
        created_at: s.created_at,
        completed_at: s.completed_at,
        size_bytes: s.size_bytes,
        dump_bytes: s.dump_bytes,
        sha256: s.sha256.clone(),
    })
}

/// The instance, provisioned (404 unknown, 422 `ConcurrencyError` while its provision runs, 422 when that failed)
/// and with a database (422 "has no database `to`..."). `lock` takes its row lock.
pub(crate) async fn instance_with_database(
    db: &mut PgConnection,
    state: &AppState,
    instance_id: &str,
    lock: bool,
    to: &str,
) -> ApiResult<InstanceRow> {
    let row = provisioned_instance(&mut *db, instance_id, lock).await?;
    if !state
        .catalog
        .plan_by_id(&row.plan_id)
        .is_some_and(|p| p.has_database())
    {
        return Err(ApiError::Unprocessable(format!(
            "service instance {instance_id} has no database {to}"
        )));
    }
    Ok(row)
}

/// Enqueues the restore of `snapshot` into the instance: an instance operation (OSB-visible), so refused while
/// another operation runs on it.
pub(crate) async fn enqueue_restore(
    tx: &mut PgConnection,
    state: &AppState,
    instance_id: &str,
    snapshot: &SnapshotRow,
    identity: Option<Value>,
) -> ApiResult<TaskId> {
    instance_with_database(&mut *tx, state, instance_id, true, "to restore into").await?;
    exclusive::check(&mut *tx, instance_id, Again::Never, exclusive::any).await?;
    exclusive::not_being_deleted(&mut *tx, instance_id).await?;
    let origin = Origin {
        identity,
        hook: None,
    };
    let payload = json!({ "snapshot_id": snapshot.id });
    let task = origin.task(Operation::Restore, instance_id, None, payload);
    Ok(tasks::enqueue(&mut *tx, task).await?)
}

/// Deletes snapshots (preset versions or backups) in the caller's transaction: refuses (409) while a task still
/// reads one of them or, for a whole preset, names `preset_name`; then forgets the rows, queues their objects and
/// enqueues the `snapshot.delete` task that deletes the objects from the store and drops the preset versions'
/// template databases. Returns that task's id.
pub(crate) async fn delete_snapshots(
    tx: &mut PgConnection,
    rows: &[SnapshotRow],
    preset_name: Option<&str>,
    what: &str,
) -> ApiResult<TaskId> {
    let ids: Vec<uuid::Uuid> = rows.iter().map(|s| s.id).collect();
    let users = broker::db::snapshots::active_users(&mut *tx, &ids, preset_name).await?;
    if let Some((task, kind, instance)) = users.first() {
        return Err(ApiError::Conflict(format!(
            "{what} is in use by a running {kind} task ({task}{}); delete it once that has finished",
            instance
                .as_deref()
                .map(|i| format!(", service instance {i}"))
                .unwrap_or_default()
        )));
    }
    broker::db::snapshots::forget_and_queue_objects(&mut *tx, rows).await?;
    let templates: Vec<uuid::Uuid> = rows
        .iter()
        .filter(|s| s.preset_id.is_some())
        .map(|s| s.id)
        .collect();
    // Warm pools' clones of these versions go with them (docs/pools.md).
    if !templates.is_empty() {
        broker::db::pools::drain_clones_of(&mut *tx, &templates).await?;
    }
    let task = tasks::NewTask::new(
        broker::model::kinds::DELETE_SNAPSHOTS,
        json!({ "template_snapshot_ids": templates }),
    );
    Ok(tasks::enqueue(&mut *tx, task).await?)
}
