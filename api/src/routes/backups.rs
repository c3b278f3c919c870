//! Backups of an instance, and the generic task status route.
//!
//! - `GET  /berth/v1/instances/{id}/backups`                    list (also after the instance is gone)
//! - `POST /berth/v1/instances/{id}/backups`                    take one now → 202 `{backup_id, operation}`
//! - `GET  /berth/v1/instances/{id}/backups/{backup}`           one backup
//! - `POST /berth/v1/instances/{id}/backups/{backup}/restore`   reset the instance to it → 202 `{operation}`
//! - `DELETE /berth/v1/instances/{id}/backups/{backup}`         delete it (the row now, the object by a task) → 202
//! - `GET  /berth/v1/tasks/{operation}`                         state of any task berth answered with
//!
//! Akkeris clients find the same under `/v2/service_instances/{id}/actions/backups` (GET list, PUT take,
//! GET `/{backup}` one, PUT `/{backup}` restore).

use axum::{
    Json, Router,
    extract::State,
    response::{IntoResponse, Response},
    routing::{get, post},
};
use broker::{
    db::{
        instances,
        snapshots::{self, SnapshotRow, SnapshotState},
        tasks,
    },
    model::TaskState,
};
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgConnection;
use utoipa::ToSchema;
use uuid::Uuid;

use super::{
    Accepted, accepted_with, check_id,
    params::{BackupIdPath, InstanceIdPath},
    parse_operation,
    snapshot_common::{
        Snapshot, delete_snapshots, enqueue_restore, instance_with_database, snapshot_json,
    },
};
use crate::{
    AppState,
    error::{ApiError, ApiResult, ErrorBody},
    extract::OsbPath,
    identity::OriginatingIdentity,
};

pub fn router() -> Router<AppState> {
    Router::new()
        .route(
            "/berth/v1/instances/{instance_id}/backups",
            get(list).post(take),
        )
        .route(
            "/berth/v1/instances/{instance_id}/backups/{backup_id}",
            get(show).delete(delete_backup),
        )
        .route(
            "/berth/v1/instances/{instance_id}/backups/{backup_id}/restore",
            post(restore),
        )
        .route("/berth/v1/tasks/{task_id}", get(task))
}

/// The Akkeris `actions/backups` routes (under `/v2`, with its version check and auth).
pub fn akkeris_router() -> Router<AppState> {
    Router::new()
        .route(
            "/v2/service_instances/{instance_id}/actions/backups",
            get(akkeris_list).put(akkeris_take),
        )
        .route(
            "/v2/service_instances/{instance_id}/actions/backups/{backup_id}",
            get(akkeris_show).put(akkeris_restore),
        )
}

/// The backups of an instance.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct BackupList {
    /// Newest first.
    backups: Vec<Snapshot>,
}

/// A backup started.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct BackupStarted {
    backup_id: Uuid,
    /// Its task (`/berth/v1/tasks/{operation}`).
    #[schema(format = Uuid)]
    operation: String,
}

/// Any task berth answered with an operation.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct TaskStatus {
    id: Uuid,
    /// What the task does (`provision`, `backup`, `push_preset`, ...).
    kind: String,
    state: TaskState,
    instance_id: Option<String>,
    binding_id: Option<String>,
    /// The worker's progress.
    description: Option<String>,
    /// Why the last attempt failed.
    error: Option<String>,
    attempts: i32,
    created_at: DateTime<Utc>,
    finished_at: Option<DateTime<Utc>>,
}

/// The Akkeris form of [`list`].
#[utoipa::path(
    get,
    path = "/v2/service_instances/{instance_id}/actions/backups",
    tag = "backups",
    operation_id = "akkeris_list_backups",
    params(InstanceIdPath),
    responses(
        (status = 200, description = "The instance's backups (also after the instance is gone)", body = BackupList),
        (status = 400, description = "A malformed instance id", body = ErrorBody),
        (status = 404, description = "No such instance, and no backups of one", body = ErrorBody),
    )
)]
pub(crate) async fn akkeris_list(
    state: State<AppState>,
    path: OsbPath<String>,
) -> ApiResult<Response> {
    list(state, path).await
}

/// The Akkeris form of [`take`].
#[utoipa::path(
    put,
    path = "/v2/service_instances/{instance_id}/actions/backups",
    tag = "backups",
    operation_id = "akkeris_take_backup",
    params(InstanceIdPath),
    responses(
        (status = 202, description = "Started", body = BackupStarted),
        (status = 400, description = "A malformed instance id", body = ErrorBody),
        (status = 404, description = "No such instance", body = ErrorBody),
        (status = 409, description = "A backup of the instance is already running", body = ErrorBody),
        (status = 422, description = "`ConcurrencyError`, a failed provision, or an instance without a database", body = ErrorBody),
    )
)]
pub(crate) async fn akkeris_take(
    state: State<AppState>,
    path: OsbPath<String>,
) -> ApiResult<Response> {
    take(state, path).await
}

/// The Akkeris form of [`show`].
#[utoipa::path(
    get,
    path = "/v2/service_instances/{instance_id}/actions/backups/{backup_id}",
    tag = "backups",
    operation_id = "akkeris_show_backup",
    params(BackupIdPath),
    responses(
        (status = 200, description = "The backup", body = Snapshot),
        (status = 400, description = "A backup id that is not a UUID", body = ErrorBody),
        (status = 404, description = "The instance has no such backup", body = ErrorBody),
    )
)]
pub(crate) async fn akkeris_show(
    state: State<AppState>,
    path: OsbPath<(String, String)>,
) -> ApiResult<Response> {
    show(state, path).await
}

/// The Akkeris form of [`restore`].
#[utoipa::path(
    put,
    path = "/v2/service_instances/{instance_id}/actions/backups/{backup_id}",
    tag = "backups",
    operation_id = "akkeris_restore_backup",
    params(BackupIdPath),
    responses(
        (status = 202, description = "Accepted: poll the instance's `last_operation` with this operation", body = Accepted),
        (status = 400, description = "A backup id that is not a UUID", body = ErrorBody),
        (status = 404, description = "No such instance, or it has no such backup", body = ErrorBody),
        (status = 422, description = "`ConcurrencyError`, a backup that is not complete, or an instance without a database", body = ErrorBody),
    )
)]
pub(crate) async fn akkeris_restore(
    state: State<AppState>,
    path: OsbPath<(String, String)>,
    identity: OriginatingIdentity,
) -> ApiResult<Response> {
    restore(state, path, identity).await
}

/// List the backups of an instance.
#[utoipa::path(
    get,
    path = "/berth/v1/instances/{instance_id}/backups",
    tag = "backups",
    operation_id = "list_backups",
    params(InstanceIdPath),
    responses(
        (status = 200, description = "The instance's backups (also after the instance is gone)", body = BackupList),
        (status = 400, description = "A malformed instance id", body = ErrorBody),
        (status = 404, description = "No such instance, and no backups of one", body = ErrorBody),
    )
)]
pub(crate) async fn list(
    State(state): State<AppState>,
    OsbPath(instance_id): OsbPath<String>,
) -> ApiResult<Response> {
    check_id("instance_id", &instance_id)?;
    let mut conn = state.db.acquire().await?;
    let rows = snapshots::backups_of(&mut *conn, &instance_id).await?;
    if rows.is_empty() && instances::get(&mut *conn, &instance_id).await?.is_none() {
        return Err(ApiError::NotFound(format!(
            "service instance {instance_id} does not exist and has no backups"
        )));
    }
    let mut backups = Vec::with_capacity(rows.len());
    for row in &rows {
        backups.push(snapshot_json(&mut conn, row).await?);
    }
    Ok(Json(BackupList { backups }).into_response())
}

async fn backup_of(
    conn: &mut PgConnection,
    instance_id: &str,
    backup_id: &str,
) -> ApiResult<SnapshotRow> {
    let id = Uuid::parse_str(backup_id)
        .map_err(|_| ApiError::bad_request(format!("backup id {backup_id:?} is not a UUID")))?;
    snapshots::get(&mut *conn, id)
        .await?
        .filter(|b| b.kind == snapshots::BACKUP && b.instance_id.as_deref() == Some(instance_id))
        .ok_or_else(|| {
            ApiError::NotFound(format!(
                "service instance {instance_id} has no backup {backup_id}"
            ))
        })
}

/// One backup of an instance.
#[utoipa::path(
    get,
    path = "/berth/v1/instances/{instance_id}/backups/{backup_id}",
    tag = "backups",
    operation_id = "show_backup",
    params(BackupIdPath),
    responses(
        (status = 200, description = "The backup", body = Snapshot),
        (status = 400, description = "A backup id that is not a UUID", body = ErrorBody),
        (status = 404, description = "The instance has no such backup", body = ErrorBody),
    )
)]
pub(crate) async fn show(
    State(state): State<AppState>,
    OsbPath((instance_id, backup_id)): OsbPath<(String, String)>,
) -> ApiResult<Response> {
    check_id("instance_id", &instance_id)?;
    let mut conn = state.db.acquire().await?;
    let row = backup_of(&mut conn, &instance_id, &backup_id).await?;
    Ok(Json(snapshot_json(&mut conn, &row).await?).into_response())
}

/// Take a backup of an instance now.
#[utoipa::path(
    post,
    path = "/berth/v1/instances/{instance_id}/backups",
    tag = "backups",
    operation_id = "take_backup",
    params(InstanceIdPath),
    responses(
        (status = 202, description = "Started", body = BackupStarted),
        (status = 400, description = "A malformed instance id", body = ErrorBody),
        (status = 404, description = "No such instance", body = ErrorBody),
        (status = 409, description = "A backup of the instance is already running", body = ErrorBody),
        (status = 422, description = "`ConcurrencyError`, a failed provision, or an instance without a database", body = ErrorBody),
    )
)]
pub(crate) async fn take(
    State(state): State<AppState>,
    OsbPath(instance_id): OsbPath<String>,
) -> ApiResult<Response> {
    check_id("instance_id", &instance_id)?;
    let mut tx = state.db.begin().await?;
    instance_with_database(&mut tx, &state, &instance_id, false, "to back up").await?;
    let mut sp = sqlx::Acquire::begin(&mut *tx).await?;
    match snapshots::enqueue_backup(&mut sp, &instance_id, "api").await {
        Ok((backup_id, task_id)) => {
            sp.commit().await?;
            tx.commit().await?;
            Ok(accepted_with(BackupStarted {
                backup_id,
                operation: task_id.to_string(),
            }))
        }
        Err(e) if broker::db::is_unique_violation(&e) => {
            sp.rollback().await?;
            let running = snapshots::backups_of(&mut *tx, &instance_id)
                .await?
                .into_iter()
                .find(|b| b.state == SnapshotState::Pending);
            Err(ApiError::Conflict(format!(
                "a backup of service instance {instance_id} is already running{}; wait for it",
                running
                    .map(|b| format!(" (backup {}, operation {})", b.id, b.task_id))
                    .unwrap_or_default()
            )))
        }
        Err(e) => Err(e.into()),
    }
}

/// Reset an instance's database to one of its backups.
#[utoipa::path(
    post,
    path = "/berth/v1/instances/{instance_id}/backups/{backup_id}/restore",
    tag = "backups",
    operation_id = "restore_backup",
    params(BackupIdPath),
    responses(
        (status = 202, description = "Accepted: poll the instance's `last_operation` with this operation", body = Accepted),
        (status = 400, description = "A backup id that is not a UUID", body = ErrorBody),
        (status = 404, description = "No such instance, or it has no such backup", body = ErrorBody),
        (status = 422, description = "`ConcurrencyError`, a backup that is not complete, or an instance without a database", body = ErrorBody),
    )
)]
pub(crate) async fn restore(
    State(state): State<AppState>,
    OsbPath((instance_id, backup_id)): OsbPath<(String, String)>,
    OriginatingIdentity(identity): OriginatingIdentity,
) -> ApiResult<Response> {
    check_id("instance_id", &instance_id)?;
    let mut tx = state.db.begin().await?;
    let backup = backup_of(&mut tx, &instance_id, &backup_id).await?;
    if !backup.is_ready() {
        return Err(ApiError::Unprocessable(format!(
            "backup {backup_id} is not complete (state {})",
            backup.state
        )));
    }
    let operation = enqueue_restore(&mut tx, &state, &instance_id, &backup, identity).await?;
    tx.commit().await?;
    Ok(accepted_with(Accepted {
        operation: operation.to_string(),
    }))
}

/// What a backup's delete started.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct BackupDeleted {
    #[schema(format = Uuid)]
    backup_id: String,
    /// The task deleting its object: poll `/berth/v1/tasks/{operation}`.
    #[schema(format = Uuid)]
    operation: String,
}

/// Deletes a backup: its row now, its object in the snapshot store by a task.
#[utoipa::path(
    delete,
    path = "/berth/v1/instances/{instance_id}/backups/{backup_id}",
    tag = "backups",
    operation_id = "delete_backup",
    params(BackupIdPath),
    responses(
        (status = 202, description = "Deleted; the task removes its object", body = BackupDeleted),
        (status = 400, description = "A malformed id", body = ErrorBody),
        (status = 404, description = "No such instance or backup", body = ErrorBody),
        (status = 409, description = "A task still reads the backup", body = ErrorBody),
    )
)]
pub(crate) async fn delete_backup(
    State(state): State<AppState>,
    OsbPath((instance_id, backup_id)): OsbPath<(String, String)>,
) -> ApiResult<Response> {
    check_id("instance_id", &instance_id)?;
    let mut tx = state.db.begin().await?;
    let backup = backup_of(&mut tx, &instance_id, &backup_id).await?;
    let what = format!("backup {backup_id}");
    let operation = delete_snapshots(&mut tx, std::slice::from_ref(&backup), None, &what).await?;
    tx.commit().await?;
    Ok(accepted_with(BackupDeleted {
        backup_id: backup.id.to_string(),
        operation: operation.to_string(),
    }))
}

/// The state of any task berth answered with an operation (backups, preset pushes, OSB operations).
#[utoipa::path(
    get,
    path = "/berth/v1/tasks/{task_id}",
    tag = "tasks",
    operation_id = "task",
    params(("task_id" = String, Path, description = "An operation berth answered with (a UUID).")),
    responses(
        (status = 200, description = "The task", body = TaskStatus),
        (status = 400, description = "Not a UUID", body = ErrorBody),
        (status = 404, description = "No such task", body = ErrorBody),
    )
)]
pub(crate) async fn task(
    State(state): State<AppState>,
    OsbPath(task_id): OsbPath<String>,
) -> ApiResult<Response> {
    let id = parse_operation(&task_id)?;
    let task = tasks::get(&state.db, id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("there is no task {task_id}")))?;
    Ok(Json(TaskStatus {
        id: task.id,
        kind: task.kind,
        state: task.state,
        instance_id: task.instance_id,
        binding_id: task.binding_id,
        description: task.progress,
        error: task.last_error,
        attempts: task.attempts,
        created_at: task.created_at,
        finished_at: task.finished_at,
    })
    .into_response())
}
