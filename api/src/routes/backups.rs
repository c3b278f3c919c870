//! Backups of an instance, and the generic task status route.
//!
//! - `GET  /berth/v1/instances/{id}/backups`                    list (also after the instance is gone)
//! - `POST /berth/v1/instances/{id}/backups`                    take one now → 202 `{backup_id, operation}`
//! - `GET  /berth/v1/instances/{id}/backups/{backup}`           one backup
//! - `POST /berth/v1/instances/{id}/backups/{backup}/restore`   reset the instance to it → 202 `{operation}`
//! - `GET  /berth/v1/tasks/{operation}`                         state of any task berth answered with
//!
//! Akkeris clients find the same under `/v2/service_instances/{id}/actions/backups` (GET list, PUT take,
//! GET `/{backup}` one, PUT `/{backup}` restore).

use axum::{
    Json, Router,
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{get, post},
};
use broker::{
    db::{
        instances,
        snapshots::{self, SnapshotRow, SnapshotState},
        tasks,
    },
    model::{Operation, TaskId},
};
use serde_json::{Value, json};
use sqlx::PgConnection;
use uuid::Uuid;

use super::{
    check_id,
    instances::{concurrency, provisioned_instance},
    parse_operation,
    presets::{restore_task, snapshot_json},
};
use crate::{
    AppState,
    error::{ApiError, ApiResult},
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
            get(show),
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
            get(list).put(take),
        )
        .route(
            "/v2/service_instances/{instance_id}/actions/backups/{backup_id}",
            get(show).put(restore),
        )
}

async fn list(
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
        backups.push(backup_json(&mut conn, row).await?);
    }
    Ok(Json(json!({ "backups": backups })).into_response())
}

async fn backup_json(conn: &mut PgConnection, row: &SnapshotRow) -> ApiResult<Value> {
    let task_state = if row.state == SnapshotState::Pending {
        tasks::get(&mut *conn, TaskId(row.task_id))
            .await?
            .map(|t| t.state)
    } else {
        None
    };
    Ok(snapshot_json(row, task_state))
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

async fn show(
    State(state): State<AppState>,
    OsbPath((instance_id, backup_id)): OsbPath<(String, String)>,
) -> ApiResult<Response> {
    check_id("instance_id", &instance_id)?;
    let mut conn = state.db.acquire().await?;
    let row = backup_of(&mut conn, &instance_id, &backup_id).await?;
    Ok(Json(backup_json(&mut conn, &row).await?).into_response())
}

async fn take(
    State(state): State<AppState>,
    OsbPath(instance_id): OsbPath<String>,
) -> ApiResult<Response> {
    check_id("instance_id", &instance_id)?;
    let mut tx = state.db.begin().await?;
    let row = provisioned_instance(&mut tx, &instance_id, false).await?;
    if !state
        .catalog
        .plan_by_id(&row.plan_id)
        .is_some_and(|p| p.has_database())
    {
        return Err(ApiError::Unprocessable(format!(
            "service instance {instance_id} has no database to back up"
        )));
    }
    let mut sp = sqlx::Acquire::begin(&mut *tx).await?;
    match snapshots::enqueue_backup(&mut sp, &instance_id, "api").await {
        Ok((backup_id, task_id)) => {
            sp.commit().await?;
            tx.commit().await?;
            Ok((
                StatusCode::ACCEPTED,
                Json(json!({ "backup_id": backup_id, "operation": task_id.to_string() })),
            )
                .into_response())
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

async fn restore(
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
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "operation": operation.to_string() })),
    )
        .into_response())
}

/// Enqueues the restore of `snapshot` into the instance: refused while another operation runs on it.
pub(crate) async fn enqueue_restore(
    tx: &mut PgConnection,
    state: &AppState,
    instance_id: &str,
    snapshot: &SnapshotRow,
    identity: Option<Value>,
) -> ApiResult<TaskId> {
    let row = provisioned_instance(&mut *tx, instance_id, true).await?;
    if !state
        .catalog
        .plan_by_id(&row.plan_id)
        .is_some_and(|p| p.has_database())
    {
        return Err(ApiError::Unprocessable(format!(
            "service instance {instance_id} has no database to restore into"
        )));
    }
    let active = tasks::active_operations(&mut *tx, instance_id).await?;
    if let Some(task) = active.first() {
        return Err(concurrency(instance_id, task));
    }
    let latest = tasks::latest_instance_operation(&mut *tx, instance_id).await?;
    if latest.as_ref().and_then(|t| t.operation) == Some(Operation::Deprovision) {
        return Err(ApiError::Unprocessable(format!(
            "service instance {instance_id} is being deleted (its last deprovision failed); deprovision it again"
        )));
    }
    Ok(tasks::enqueue(&mut *tx, restore_task(instance_id, snapshot.id, identity)).await?)
}

async fn task(
    State(state): State<AppState>,
    OsbPath(task_id): OsbPath<String>,
) -> ApiResult<Response> {
    let id = parse_operation(&task_id)?;
    let task = tasks::get(&state.db, id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("there is no task {task_id}")))?;
    Ok(Json(json!({
        "id": task.id,
        "kind": task.kind,
        "state": task.state,
        "instance_id": task.instance_id,
        "binding_id": task.binding_id,
        "description": task.progress,
        "error": task.last_error,
        "attempts": task.attempts,
        "created_at": task.created_at,
        "finished_at": task.finished_at,
    }))
    .into_response())
}
