//! `snapshots`: one row per object in the snapshot store (a preset version or a backup). Only `ready` rows
//! are complete, checked objects; restore trusts nothing else.

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use sqlx::PgExecutor;
use uuid::Uuid;

use super::tasks::NewTask;
use crate::{model::kinds, snapshots::backup_object_key};

text_enum! {
    /// Where a snapshot is: `pending` while its task makes it, `ready` once the object is complete and checked,
    /// `failed` when its task gave up. Stored as text in `snapshots.state`.
    pub enum SnapshotState ("snapshot state") {
        Pending = "pending",
        Ready = "ready",
        Failed = "failed",
    }
}

/// A row of `snapshots`, read with runtime queries so that `state` is checked as it is decoded.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct SnapshotRow {
    pub id: Uuid,
    pub kind: String,
    pub preset_id: Option<Uuid>,
    pub version: Option<i32>,
    pub instance_id: Option<String>,
    pub task_id: Uuid,
    pub state: SnapshotState,
    pub object_key: String,
    pub size_bytes: Option<i64>,
    pub sha256: Option<String>,
    pub dump_bytes: Option<i64>,
    pub key_id: Option<String>,
    pub roles: Option<Value>,
    pub description: Option<String>,
    pub created_by: Option<String>,
    pub created_at: DateTime<Utc>,
    pub completed_at: Option<DateTime<Utc>>,
}

impl SnapshotRow {
    pub fn is_ready(&self) -> bool {
        self.state == SnapshotState::Ready
    }
}

pub const PRESET: &str = "preset";
pub const BACKUP: &str = "backup";

#[derive(Debug, Clone)]
pub struct NewSnapshot<'a> {
    pub id: Uuid,
    pub kind: &'static str,
    pub preset_id: Option<Uuid>,
    pub version: Option<i32>,
    pub instance_id: &'a str,
    pub task_id: Uuid,
    pub object_key: &'a str,
    pub description: Option<&'a str>,
    pub created_by: Option<&'a str>,
}

pub async fn insert(db: impl PgExecutor<'_>, new: &NewSnapshot<'_>) -> sqlx::Result<()> {
    sqlx::query!(
        "INSERT INTO snapshots (id, kind, preset_id, version, instance_id, task_id, object_key, description, created_by)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        new.id,
        new.kind,
        new.preset_id,
        new.version,
        new.instance_id,
        new.task_id,
        new.object_key,
        new.description,
        new.created_by,
    )
    .execute(db)
    .await?;
    Ok(())
}

/// The version number the next push of a preset gets. Call with the preset row locked (`FOR UPDATE`).
pub async fn next_version(db: impl PgExecutor<'_>, preset_id: Uuid) -> sqlx::Result<i32> {
    sqlx::query_scalar!(
        r#"SELECT coalesce(max(version), 0) + 1 AS "next!" FROM snapshots WHERE preset_id = $1"#,
        preset_id
    )
    .fetch_one(db)
    .await
}

pub async fn get(db: impl PgExecutor<'_>, id: Uuid) -> sqlx::Result<Option<SnapshotRow>> {
    sqlx::query_as("SELECT * FROM snapshots WHERE id = $1")
        .bind(id)
        .fetch_optional(db)
        .await
}

/// Every version of a preset, newest first (pending and failed ones too: the change log).
pub async fn versions(db: impl PgExecutor<'_>, preset_id: Uuid) -> sqlx::Result<Vec<SnapshotRow>> {
    sqlx::query_as("SELECT * FROM snapshots WHERE preset_id = $1 ORDER BY version DESC")
        .bind(preset_id)
        .fetch_all(db)
        .await
}

/// A ready version of a preset: `version`, or the newest.
pub async fn ready_version(
    db: impl PgExecutor<'_>,
    preset_id: Uuid,
    version: Option<i32>,
) -> sqlx::Result<Option<SnapshotRow>> {
    sqlx::query_as(
        "SELECT * FROM snapshots WHERE preset_id = $1 AND state = 'ready' AND ($2::int IS NULL OR version = $2)
         ORDER BY version DESC LIMIT 1",
    )
    .bind(preset_id)
    .bind(version)
    .fetch_optional(db)
    .await
}

/// Backups of an instance, newest first.
pub async fn backups_of(
    db: impl PgExecutor<'_>,
    instance_id: &str,
) -> sqlx::Result<Vec<SnapshotRow>> {
    sqlx::query_as(
        "SELECT * FROM snapshots WHERE kind = 'backup' AND instance_id = $1 ORDER BY created_at DESC",
    )
    .bind(instance_id)
    .fetch_all(db)
    .await
}

/// The snapshot a task is making (a retried task finds its row again).
pub async fn of_task(db: impl PgExecutor<'_>, task_id: Uuid) -> sqlx::Result<Option<SnapshotRow>> {
    sqlx::query_as("SELECT * FROM snapshots WHERE task_id = $1")
        .bind(task_id)
        .fetch_optional(db)
        .await
}

/// What the pipeline measured once the object is complete in the store.
#[derive(Debug, Clone)]
pub struct Completed<'a> {
    pub size_bytes: i64,
    pub sha256: &'a str,
    pub dump_bytes: i64,
    pub key_id: &'a str,
    pub roles: &'a Value,
}

pub async fn mark_ready(
    db: impl PgExecutor<'_>,
    id: Uuid,
    done: &Completed<'_>,
) -> sqlx::Result<()> {
    sqlx::query!(
        "UPDATE snapshots SET state = 'ready', size_bytes = $2, sha256 = $3, dump_bytes = $4, key_id = $5,
                roles = $6, completed_at = now()
         WHERE id = $1",
        id,
        done.size_bytes,
        done.sha256,
        done.dump_bytes,
        done.key_id,
        done.roles,
    )
    .execute(db)
    .await?;
    Ok(())
}

pub async fn mark_failed(db: impl PgExecutor<'_>, id: Uuid) -> sqlx::Result<()> {
    sqlx::query!(
        "UPDATE snapshots SET state = 'failed' WHERE id = $1 AND state = 'pending'",
        id
    )
    .execute(db)
    .await?;
    Ok(())
}

/// Ready backups of an instance beyond the newest `keep`, oldest first: what retention deletes.
pub async fn backups_beyond(
    db: impl PgExecutor<'_>,
    instance_id: &str,
    keep: i64,
) -> sqlx::Result<Vec<SnapshotRow>> {
    sqlx::query_as(
        "SELECT * FROM snapshots WHERE kind = 'backup' AND instance_id = $1 AND state = 'ready'
         ORDER BY created_at DESC OFFSET $2",
    )
    .bind(instance_id)
    .bind(keep)
    .fetch_all(db)
    .await
}

pub async fn delete(db: impl PgExecutor<'_>, id: Uuid) -> sqlx::Result<()> {
    sqlx::query!("DELETE FROM snapshots WHERE id = $1", id)
        .execute(db)
        .await?;
    Ok(())
}

/// Writes a backup row and its task. Fails with a unique violation while another backup of the instance is
/// pending or running. Returns (backup id, task id).
pub async fn enqueue_backup(
    conn: &mut sqlx::PgConnection,
    instance_id: &str,
    created_by: &str,
) -> Result<(Uuid, Uuid), sqlx::Error> {
    let (id, now) = (Uuid::new_v4(), Utc::now());
    let key = backup_object_key(instance_id, now, id);
    let mut task = NewTask::new(kinds::BACKUP, json!({ "snapshot_id": id }));
    task.instance_id = Some(instance_id.to_string());
    let task_id = task.id.0;
    super::tasks::enqueue(&mut *conn, task).await?;
    insert(
        &mut *conn,
        &NewSnapshot {
            id,
            kind: BACKUP,
            preset_id: None,
            version: None,
            instance_id,
            task_id,
            object_key: &key,
            description: None,
            created_by: Some(created_by),
        },
    )
    .await?;
    Ok((id, task_id))
}

/// Active tasks (pending or running) that would read one of `snapshot_ids`, or the preset `preset_name` by name:
/// a push or backup still making it, a restore or select putting it into an instance, a provision or update whose
/// `preset` or `restore_from` parameter names it. Deleting the snapshots under them would fail them, so deletion
/// is refused while any runs. Returns (task id, kind, instance id).
pub async fn active_users(
    db: impl PgExecutor<'_>,
    snapshot_ids: &[Uuid],
    preset_name: Option<&str>,
) -> sqlx::Result<Vec<(Uuid, String, Option<String>)>> {
    let ids: Vec<String> = snapshot_ids.iter().map(Uuid::to_string).collect();
    sqlx::query_as(
        "SELECT t.id, t.kind, t.instance_id FROM tasks t LEFT JOIN service_instances i ON i.id = t.instance_id
         WHERE t.state IN ('pending', 'running') AND (
             (t.kind IN ('instance.restore', 'preset.push', 'instance.backup')
                 AND t.payload->>'snapshot_id' = ANY($1))
             OR (t.kind IN ('instance.provision', 'instance.update') AND (
                 i.parameters->'restore_from'->>'backup' = ANY($1)
                 OR t.payload->'parameters'->'restore_from'->>'backup' = ANY($1)
                 OR coalesce(i.parameters->'preset'->>'name', i.parameters->>'preset') = $2
                 OR coalesce(t.payload->'parameters'->'preset'->>'name', t.payload->'parameters'->>'preset') = $2)))
         ORDER BY t.created_at",
    )
    .bind(&ids)
    .bind(preset_name)
    .fetch_all(db)
    .await
}

/// Forgets the snapshots and queues their objects for deletion from the store, in the caller's transaction, so a
/// row is never gone while its object is neither deleted nor queued. A worker's `snapshot.delete` task then
/// deletes the queued objects (see `snapshot_objects_to_delete`).
pub async fn forget_and_queue_objects(
    conn: &mut sqlx::PgConnection,
    snapshots: &[SnapshotRow],
) -> sqlx::Result<()> {
    let ids: Vec<Uuid> = snapshots.iter().map(|s| s.id).collect();
    let keys: Vec<&str> = snapshots.iter().map(|s| s.object_key.as_str()).collect();
    sqlx::query(
        "INSERT INTO snapshot_objects_to_delete (object_key) SELECT unnest($1::text[]) ON CONFLICT DO NOTHING",
    )
    .bind(&keys)
    .execute(&mut *conn)
    .await?;
    sqlx::query("DELETE FROM snapshots WHERE id = ANY($1)")
        .bind(&ids)
        .execute(&mut *conn)
        .await?;
    Ok(())
}
