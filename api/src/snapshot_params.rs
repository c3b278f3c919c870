//! Checks of the snapshot parameters an instance may carry (`preset`, `restore_from`, `backups`) that a JSON
//! schema cannot make: the cron expression parses, the preset version and the backup exist and are complete.
//! Run before anything is written, so a bad one is a 400 that changes nothing.

use broker::{
    db::{presets, snapshots},
    snapshots::{BackupPolicy, PresetRef, RestoreFrom},
};
use serde_json::Value;
use sqlx::PgConnection;

use crate::error::{ApiError, ApiResult};

/// When the request is a provision (`restore_from` is only for new instances).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum At {
    Provision,
    Update,
}

pub async fn check(db: &mut PgConnection, parameters: &Value, at: At) -> ApiResult<()> {
    BackupPolicy::of(parameters).map_err(ApiError::BadRequest)?;
    let preset = PresetRef::of(parameters).map_err(ApiError::BadRequest)?;
    let restore_from = RestoreFrom::of(parameters).map_err(ApiError::BadRequest)?;
    if preset.is_some() && restore_from.is_some() {
        return Err(ApiError::bad_request(
            "give either `preset` or `restore_from`, not both",
        ));
    }
    if let Some(preset) = preset {
        let row = presets::get(&mut *db, &preset.namespace, &preset.name)
            .await?
            .ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "parameter preset: there is no preset {:?}",
                    preset.name
                ))
            })?;
        if snapshots::ready_version(&mut *db, row.id, preset.version)
            .await?
            .is_none()
        {
            return Err(ApiError::BadRequest(match preset.version {
                Some(v) => format!(
                    "parameter preset: preset {:?} has no ready version {v}",
                    preset.name
                ),
                None => format!(
                    "parameter preset: preset {:?} has no ready version yet",
                    preset.name
                ),
            }));
        }
    }
    if let Some(from) = restore_from {
        if at == At::Update {
            return Err(ApiError::bad_request(
                "parameter restore_from applies when an instance is made; to restore an existing instance use \
                 POST /berth/v1/instances/{id}/backups/{backup}/restore",
            ));
        }
        let backup = snapshots::get(&mut *db, from.backup_id).await?;
        let belongs = backup.as_ref().is_some_and(|b| {
            b.kind == snapshots::BACKUP
                && b.instance_id.as_deref() == Some(from.instance_id.as_str())
        });
        if !belongs {
            return Err(ApiError::BadRequest(format!(
                "parameter restore_from: instance {} has no backup {}",
                from.instance_id, from.backup_id
            )));
        }
        if !backup.is_some_and(|b| b.is_ready()) {
            return Err(ApiError::BadRequest(format!(
                "parameter restore_from: backup {} is not complete",
                from.backup_id
            )));
        }
    }
    Ok(())
}

/// Whether the parameters name anything [`check`] has to look up.
pub fn any(parameters: &Value) -> bool {
    ["preset", "restore_from", "backups"]
        .iter()
        .any(|k| parameters.get(k).is_some_and(|v| !v.is_null()))
}
