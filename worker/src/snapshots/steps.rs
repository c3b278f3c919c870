//! The snapshot steps tasks share: take a snapshot of an instance, put one into an instance, keep an instance's
//! backup schedule in line with its parameters, prune old backups.

use anyhow::Context as _;
use broker::{
    db::{
        backup_schedules, bindings,
        instances::InstanceRow,
        presets,
        snapshots::{self, Completed, SnapshotRow},
    },
    snapshots::{BackupPolicy, PresetRef, RestoreFrom},
};
use chrono::Utc;
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

use super::{DatabaseTarget, apply, pipeline};
use crate::{context::TaskContext, providers::Progress, registry::TaskError};

/// The instance's database as its provider sees it.
pub async fn target_of(
    ctx: &TaskContext<'_>,
    instance: &InstanceRow,
) -> Result<Progress<DatabaseTarget>, TaskError> {
    let bindings = bindings::list_for_instance(ctx.pool, &instance.id)
        .await
        .context("listing the instance's bindings")?;
    let provider = ctx.services.provider_for_plan(&instance.plan_id)?;
    provider.database_target(ctx, instance, &bindings).await
}

/// Dumps the instance's database into `snapshot`'s object and marks the row ready. A ready row is left alone
/// (the task ran before), so this can run any number of times.
pub async fn take(
    ctx: &TaskContext<'_>,
    instance: &InstanceRow,
    snapshot: &SnapshotRow,
) -> Result<Progress<()>, TaskError> {
    if snapshot.is_ready() {
        return Ok(Progress::Done(()));
    }
    let target = match target_of(ctx, instance).await? {
        Progress::Done(target) => target,
        Progress::Wait { after, progress } => return Ok(Progress::Wait { after, progress }),
    };
    let snaps = ctx.services.snapshots()?;
    ctx.progress("dumping, compressing and uploading the database")
        .await?;
    let roles = pipeline::roles_of(&target.login, &target.database).await?;
    let taken = snaps
        .take(&target.login, &target.database, &snapshot.object_key)
        .await?;
    snapshots::mark_ready(
        ctx.pool,
        snapshot.id,
        &Completed {
            size_bytes: taken.size_bytes as i64,
            sha256: &taken.sha256,
            dump_bytes: taken.dump_bytes as i64,
            key_id: &taken.key_id,
            roles: &roles,
        },
    )
    .await
    .context("recording the finished snapshot")?;
    tracing::info!(
        snapshot = %snapshot.id,
        kind = %snapshot.kind,
        dump_bytes = taken.dump_bytes,
        stored_bytes = taken.size_bytes,
        "snapshot stored"
    );
    Ok(Progress::Done(()))
}

/// Puts `snapshot` into the instance's database: a preset version by template clone, a backup by restore.
pub async fn put_into(
    ctx: &TaskContext<'_>,
    instance: &InstanceRow,
    snapshot: &SnapshotRow,
) -> Result<Progress<()>, TaskError> {
    if !snapshot.is_ready() {
        return Err(TaskError::fatal(format!(
            "snapshot {} is not complete (state {})",
            snapshot.id, snapshot.state
        )));
    }
    let target = match target_of(ctx, instance).await? {
        Progress::Done(target) => target,
        Progress::Wait { after, progress } => return Ok(Progress::Wait { after, progress }),
    };
    let snaps = ctx.services.snapshots()?;
    let prefix = ctx.services.name_prefix();
    match snapshot.preset_id {
        Some(preset_id) => {
            let preset = presets::get_by_id(ctx.pool, preset_id)
                .await
                .context("reading the preset")?
                .ok_or_else(|| TaskError::fatal("the preset was deleted"))?;
            ctx.progress(&format!(
                "resetting the database to preset {} version {}",
                preset.name,
                snapshot.version.unwrap_or(0)
            ))
            .await?;
            apply::select_preset(
                snaps,
                prefix,
                &target,
                snapshot,
                preset.post_restore_sql.as_deref(),
            )
            .await
        }
        None => {
            ctx.progress("restoring the backup").await?;
            apply::restore_into(snaps, prefix, &target, snapshot).await?;
            Ok(Progress::Done(()))
        }
    }
}

/// The snapshot the instance's `preset` or `restore_from` parameter names, if any.
pub async fn requested_snapshot(
    pool: &PgPool,
    parameters: &Value,
) -> Result<Option<SnapshotRow>, TaskError> {
    if let Some(preset) = PresetRef::of(parameters).map_err(TaskError::fatal)? {
        let row = presets::get(pool, &preset.namespace, &preset.name)
            .await
            .context("reading the preset")?
            .ok_or_else(|| TaskError::fatal(format!("there is no preset {:?}", preset.name)))?;
        let version = snapshots::ready_version(pool, row.id, preset.version)
            .await
            .context("reading the preset's versions")?
            .ok_or_else(|| {
                TaskError::fatal(format!(
                    "preset {:?} has no such ready version",
                    preset.name
                ))
            })?;
        return Ok(Some(version));
    }
    if let Some(from) = RestoreFrom::of(parameters).map_err(TaskError::fatal)? {
        let backup = snapshots::get(pool, from.backup_id)
            .await
            .context("reading the backup")?
            .filter(|b| {
                b.kind == snapshots::BACKUP
                    && b.instance_id.as_deref() == Some(from.instance_id.as_str())
            })
            .ok_or_else(|| TaskError::fatal("restore_from names no backup of that instance"))?;
        return Ok(Some(backup));
    }
    Ok(None)
}

/// Makes the instance's backup schedule match its parameters (adds, changes or removes it).
pub async fn sync_schedule(
    pool: &PgPool,
    instance_id: &str,
    parameters: &Value,
) -> Result<(), TaskError> {
    match BackupPolicy::of(parameters).map_err(TaskError::fatal)? {
        Some(policy) => {
            let next = policy
                .next_run(Utc::now())
                .ok_or_else(|| TaskError::fatal("backups.schedule never fires"))?;
            backup_schedules::upsert(pool, instance_id, &policy.schedule, policy.retention, next)
                .await
                .context("recording the backup schedule")?;
        }
        None => backup_schedules::delete(pool, instance_id)
            .await
            .context("removing the backup schedule")?,
    }
    Ok(())
}

/// Deletes the instance's ready backups beyond the newest `keep`: the object first, then the row.
pub async fn prune(
    ctx: &TaskContext<'_>,
    instance_id: &str,
    keep: i64,
) -> Result<usize, TaskError> {
    let old = snapshots::backups_beyond(ctx.pool, instance_id, keep)
        .await
        .context("listing old backups")?;
    let snaps = ctx.services.snapshots()?;
    for backup in &old {
        snaps
            .store
            .delete(&backup.object_key)
            .await
            .context("deleting an old backup")?;
        snapshots::delete(ctx.pool, backup.id)
            .await
            .context("forgetting an old backup")?;
    }
    Ok(old.len())
}

/// Deletes every backup of the instance (deprovision with `on_delete: delete`).
pub async fn delete_all_backups(ctx: &TaskContext<'_>, instance_id: &str) -> Result<(), TaskError> {
    prune(ctx, instance_id, 0).await?;
    Ok(())
}

/// Reads a snapshot row named by a task payload's `snapshot_id`.
pub async fn snapshot_of_payload(ctx: &TaskContext<'_>) -> Result<SnapshotRow, TaskError> {
    #[derive(serde::Deserialize)]
    struct Payload {
        snapshot_id: Uuid,
    }
    let payload: Payload = ctx.payload()?;
    snapshots::get(ctx.pool, payload.snapshot_id)
        .await
        .context("reading the snapshot")?
        .ok_or_else(|| TaskError::fatal("the snapshot row is gone"))
}
