//! `/berth/v1/presets`: named, versioned snapshots of a database (db-p's verbs). Listing and locks are
//! answered here; pushes are tasks (202 + `operation`, polled at `/berth/v1/tasks/{operation}`).
//!
//! - `GET    /berth/v1/presets[?namespace=]`                 list, newest version of each
//! - `POST   /berth/v1/presets`                               push-new `{name, namespace?, instance_id, ...}`
//! - `GET    /berth/v1/presets/{name}[?namespace=]`          one preset with its versions (the change log)
//! - `POST   /berth/v1/presets/{name}/versions`              push `{instance_id, description?, lock_key?}`
//! - `GET    /berth/v1/presets/{name}/lock`                  who holds the lock
//! - `POST   /berth/v1/presets/{name}/lock`                  lock `{by, reason}` → `{lock_key}`
//! - `DELETE /berth/v1/presets/{name}/lock`                  unlock `{lock_key}`
//! - `POST   /berth/v1/instances/{id}/select`                reset an instance to `{preset, namespace?, version?}`
//! - `DELETE /berth/v1/presets/{name}[?namespace=]`          delete the preset and every version → 202 `{operation}`
//! - `DELETE /berth/v1/presets/{name}/versions/{version}`    delete one version → 202 `{operation}`
//!
//! A delete forgets the rows at once and leaves the store objects and cached templates to a `snapshot.delete` task;
//! it is refused (409) while a task still reads what it deletes, and (423) while the preset is locked.

use axum::{
    Json, Router,
    extract::State,
    response::{IntoResponse, Response},
    routing::{delete, get, post},
};
use broker::{
    db::{
        presets,
        snapshots::{self, NewSnapshot},
        tasks::{self, NewTask},
    },
    model::kinds,
    snapshots::{
        check_namespace, check_preset_name, lock_key_hash, new_lock_key, preset_object_key,
    },
};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sqlx::{PgConnection, Postgres, Transaction};
use utoipa::ToSchema;
use uuid::Uuid;

use super::{
    accepted_with, check_id,
    params::{InstanceIdPath, NamespaceParam, PresetNamePath, PresetVersionPath},
    snapshot_common::{
        Snapshot, delete_snapshots, enqueue_restore, instance_with_database, snapshot_json,
    },
};
use crate::{
    AppState,
    error::{ApiError, ApiResult, ErrorBody},
    extract::{OsbJson, OsbPath, OsbQuery},
    identity::OriginatingIdentity,
};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/berth/v1/presets", get(list).post(push_new))
        .route("/berth/v1/presets/{name}", get(show).delete(delete_preset))
        .route(
            "/berth/v1/presets/{name}/versions/{version}",
            delete(delete_version),
        )
        .route(
            "/berth/v1/presets/{name}/versions",
            get(versions).post(push),
        )
        .route(
            "/berth/v1/presets/{name}/lock",
            get(get_lock).post(lock).delete(unlock),
        )
        .route("/berth/v1/instances/{instance_id}/select", post(select))
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct NamespaceQuery {
    namespace: Option<String>,
}

impl NamespaceQuery {
    fn namespace(&self) -> ApiResult<String> {
        let ns = self.namespace.clone().unwrap_or_default();
        check_namespace(&ns).map_err(ApiError::BadRequest)?;
        Ok(ns)
    }
}

/// A new preset, made of an instance's database.
#[derive(Debug, Deserialize, ToSchema)]
pub(crate) struct PushNewBody {
    name: String,
    #[serde(default)]
    namespace: String,
    /// A provisioned postgres instance, whose database becomes version 1.
    instance_id: String,
    /// The change log's text (at most 2000 characters).
    description: Option<String>,
    /// Run after each restore of the preset (at most 100000 bytes).
    post_restore_sql: Option<String>,
    /// Who pushes (the change log's author).
    author: Option<String>,
}

/// A new version of a preset.
#[derive(Debug, Deserialize, ToSchema)]
pub(crate) struct PushBody {
    instance_id: String,
    description: Option<String>,
    author: Option<String>,
    /// The lock's key, when the preset is locked.
    lock_key: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
pub(crate) struct LockBody {
    /// Who takes the lock (not blank).
    by: String,
    #[serde(default)]
    reason: String,
}

#[derive(Debug, Deserialize, ToSchema)]
pub(crate) struct UnlockBody {
    /// The key the lock was taken with.
    lock_key: String,
}

/// Which preset version an instance is reset to.
#[derive(Debug, Deserialize, ToSchema)]
pub(crate) struct SelectBody {
    preset: String,
    #[serde(default)]
    namespace: String,
    /// The newest ready version when absent.
    version: Option<i32>,
}

/// A preset lock as shown.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct PresetLock {
    locked: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    by: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    at: Option<DateTime<Utc>>,
}

/// A lock taken: its key, which pushes and the unlock need.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct LockTaken {
    locked: bool,
    lock_key: String,
    by: String,
    reason: String,
}

/// A preset in the list.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct PresetSummary {
    name: String,
    namespace: String,
    latest_version: Option<i32>,
    latest_at: Option<DateTime<Utc>>,
    /// How many versions it has.
    versions: i64,
    created_at: DateTime<Utc>,
    created_by: Option<String>,
    lock: PresetLock,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct PresetList {
    presets: Vec<PresetSummary>,
}

/// One preset with its versions (the change log).
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct PresetDetail {
    name: String,
    namespace: String,
    created_at: DateTime<Utc>,
    created_by: Option<String>,
    post_restore_sql: Option<String>,
    lock: PresetLock,
    versions: Vec<Snapshot>,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct VersionList {
    versions: Vec<Snapshot>,
}

/// A push started.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct PushStarted {
    name: String,
    namespace: String,
    version: i32,
    snapshot_id: Uuid,
    /// Its task (`/berth/v1/tasks/{operation}`).
    #[schema(format = Uuid)]
    operation: String,
}

/// A reset to a preset started.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct SelectStarted {
    /// Poll the instance's `last_operation` with it.
    #[schema(format = Uuid)]
    operation: String,
    version: Option<i32>,
}

fn check_text(what: &str, value: Option<&str>, max: usize) -> ApiResult<()> {
    if value.is_some_and(|v| v.len() > max || v.chars().any(|c| c.is_control() && c != '\n')) {
        return Err(ApiError::BadRequest(format!(
            "{what} must be at most {max} printable characters"
        )));
    }
    Ok(())
}

/// List presets, each with its newest version.
#[utoipa::path(
    get,
    path = "/berth/v1/presets",
    tag = "presets",
    operation_id = "list_presets",
    params(NamespaceParam),
    responses(
        (status = 200, description = "The presets (of one namespace, when it is given)", body = PresetList),
        (status = 400, description = "A malformed namespace", body = ErrorBody),
    )
)]
pub(crate) async fn list(
    State(state): State<AppState>,
    OsbQuery(query): OsbQuery<NamespaceQuery>,
) -> ApiResult<Response> {
    let namespace = query
        .namespace
        .as_deref()
        .map(|_| query.namespace())
        .transpose()?;
    let rows = presets::list(&state.db, namespace.as_deref()).await?;
    let presets = rows
        .iter()
        .map(|r| PresetSummary {
            name: r.preset.name.clone(),
            namespace: r.preset.namespace.clone(),
            latest_version: r.latest_version,
            latest_at: r.latest_at,
            versions: r.versions,
            created_at: r.preset.created_at,
            created_by: r.preset.created_by.clone(),
            lock: lock_json(&r.preset),
        })
        .collect();
    Ok(Json(PresetList { presets }).into_response())
}

fn lock_json(preset: &presets::PresetRow) -> PresetLock {
    if preset.is_locked() {
        PresetLock {
            locked: true,
            by: preset.locked_by.clone(),
            reason: preset.lock_reason.clone(),
            at: preset.locked_at,
        }
    } else {
        PresetLock {
            locked: false,
            by: None,
            reason: None,
            at: None,
        }
    }
}

/// The source instance of a push: provisioned, with a database, not being deleted.
async fn source_instance(
    state: &AppState,
    db: &mut PgConnection,
    instance_id: &str,
) -> ApiResult<()> {
    check_id("instance_id", instance_id)?;
    let to = "to snapshot (presets are made of postgres instances)";
    instance_with_database(db, state, instance_id, false, to).await?;
    Ok(())
}

/// What a push of a version names: its source instance and the change log's text.
struct VersionPush<'a> {
    instance_id: &'a str,
    description: Option<&'a str>,
    author: Option<&'a str>,
    identity: Option<Value>,
}

impl<'a> VersionPush<'a> {
    fn new(
        instance_id: &'a str,
        description: &'a Option<String>,
        author: &'a Option<String>,
        identity: Option<Value>,
    ) -> Self {
        Self {
            instance_id,
            description: description.as_deref(),
            author: author.as_deref(),
            identity,
        }
    }

    fn check_text(&self) -> ApiResult<()> {
        check_text("description", self.description, 2000)?;
        check_text("author", self.author, 200)
    }

    /// Writes the version row and its push task, and commits; the version number comes from the locked preset
    /// row.
    async fn commit(
        self,
        mut tx: Transaction<'_, Postgres>,
        preset: &presets::PresetRow,
    ) -> ApiResult<Response> {
        let version = snapshots::next_version(&mut *tx, preset.id).await?;
        let id = Uuid::new_v4();
        let key = preset_object_key(&preset.namespace, &preset.name, version, id);
        let mut task = NewTask::new(kinds::PUSH_PRESET, json!({ "snapshot_id": id }));
        task.instance_id = Some(self.instance_id.to_string());
        task.originating_identity = self.identity;
        task.max_attempts = 5;
        let operation = task.id;
        tasks::enqueue(&mut *tx, task).await?;
        let snapshot = NewSnapshot {
            id,
            kind: snapshots::PRESET,
            preset_id: Some(preset.id),
            version: Some(version),
            instance_id: self.instance_id,
            task_id: operation.0,
            object_key: &key,
            description: self.description,
            created_by: self.author,
        };
        snapshots::insert(&mut *tx, &snapshot).await?;
        tx.commit().await?;
        Ok(accepted_with(PushStarted {
            name: preset.name.clone(),
            namespace: preset.namespace.clone(),
            version,
            snapshot_id: id,
            operation: operation.to_string(),
        }))
    }
}

/// Make a new preset of an instance's database (version 1).
#[utoipa::path(
    post,
    path = "/berth/v1/presets",
    tag = "presets",
    operation_id = "push_new_preset",
    request_body = PushNewBody,
    responses(
        (status = 202, description = "Started: poll `/berth/v1/tasks/{operation}`", body = PushStarted),
        (status = 400, description = "A malformed name, namespace or text", body = ErrorBody),
        (status = 404, description = "No such instance", body = ErrorBody),
        (status = 409, description = "The preset exists already", body = ErrorBody),
        (status = 422, description = "`ConcurrencyError`, a failed provision, or an instance without a database", body = ErrorBody),
    )
)]
pub(crate) async fn push_new(
    State(state): State<AppState>,
    OriginatingIdentity(identity): OriginatingIdentity,
    OsbJson(body): OsbJson<PushNewBody>,
) -> ApiResult<Response> {
    check_preset_name(&body.name).map_err(ApiError::BadRequest)?;
    check_namespace(&body.namespace).map_err(ApiError::BadRequest)?;
    let push = VersionPush::new(&body.instance_id, &body.description, &body.author, identity);
    push.check_text()?;
    if body
        .post_restore_sql
        .as_ref()
        .is_some_and(|s| s.len() > 100_000)
    {
        return Err(ApiError::bad_request(
            "post_restore_sql must be at most 100000 bytes",
        ));
    }
    let mut tx = state.db.begin().await?;
    source_instance(&state, &mut tx, &body.instance_id).await?;
    let id = Uuid::new_v4();
    let inserted = presets::insert(
        &mut *tx,
        id,
        &body.namespace,
        &body.name,
        body.post_restore_sql.as_deref(),
        body.author.as_deref(),
    )
    .await?;
    if !inserted {
        return Err(ApiError::Conflict(format!(
            "preset {:?} exists already; push a new version of it with POST /berth/v1/presets/{}/versions",
            body.name, body.name
        )));
    }
    let preset = presets::get(&mut *tx, &body.namespace, &body.name)
        .await?
        .ok_or_else(|| anyhow::anyhow!("the preset just inserted is missing"))?;
    push.commit(tx, &preset).await
}

/// Push a new version of a preset, made of an instance's database.
#[utoipa::path(
    post,
    path = "/berth/v1/presets/{name}/versions",
    tag = "presets",
    operation_id = "push_preset_version",
    params(PresetNamePath),
    request_body = PushBody,
    responses(
        (status = 202, description = "Started: poll `/berth/v1/tasks/{operation}`", body = PushStarted),
        (status = 400, description = "A malformed namespace or text", body = ErrorBody),
        (status = 404, description = "No such preset or instance", body = ErrorBody),
        (status = 422, description = "`ConcurrencyError`, a failed provision, or an instance without a database", body = ErrorBody),
        (status = 423, description = "The preset is locked and the request has not its key", body = ErrorBody),
    )
)]
pub(crate) async fn push(
    State(state): State<AppState>,
    OsbPath(name): OsbPath<String>,
    OsbQuery(query): OsbQuery<NamespaceQuery>,
    OriginatingIdentity(identity): OriginatingIdentity,
    OsbJson(body): OsbJson<PushBody>,
) -> ApiResult<Response> {
    let namespace = query.namespace()?;
    let push = VersionPush::new(&body.instance_id, &body.description, &body.author, identity);
    push.check_text()?;
    let mut tx = state.db.begin().await?;
    let preset = presets::get_for_update(&mut *tx, &namespace, &name)
        .await?
        .ok_or_else(|| not_found(&name))?;
    if let Some(held) = &preset.lock_key_hash {
        let given = body.lock_key.as_deref().map(lock_key_hash);
        let matches = given.is_some_and(|g| broker::crypto::constant_time_eq(&g, held));
        if !matches {
            return Err(ApiError::Locked(format!(
                "preset {name:?} is locked by {} ({}); push with its lock_key, or ask them to unlock it",
                preset.locked_by.as_deref().unwrap_or("someone"),
                preset.lock_reason.as_deref().unwrap_or("no reason given"),
            )));
        }
    }
    source_instance(&state, &mut tx, &body.instance_id).await?;
    push.commit(tx, &preset).await
}

fn not_found(name: &str) -> ApiError {
    ApiError::NotFound(format!("there is no preset {name:?}"))
}

/// The preset `name` in the query's namespace, or a 404.
async fn find(
    db: &mut PgConnection,
    query: &NamespaceQuery,
    name: &str,
) -> ApiResult<presets::PresetRow> {
    let namespace = query.namespace()?;
    presets::get(&mut *db, &namespace, name)
        .await?
        .ok_or_else(|| not_found(name))
}

/// One preset, with its versions (the change log).
#[utoipa::path(
    get,
    path = "/berth/v1/presets/{name}",
    tag = "presets",
    operation_id = "show_preset",
    params(PresetNamePath),
    responses(
        (status = 200, description = "The preset", body = PresetDetail),
        (status = 400, description = "A malformed namespace", body = ErrorBody),
        (status = 404, description = "No such preset", body = ErrorBody),
    )
)]
pub(crate) async fn show(
    State(state): State<AppState>,
    OsbPath(name): OsbPath<String>,
    OsbQuery(query): OsbQuery<NamespaceQuery>,
) -> ApiResult<Response> {
    let mut conn = state.db.acquire().await?;
    let preset = find(&mut conn, &query, &name).await?;
    let versions = version_list(&mut conn, preset.id).await?;
    Ok(Json(PresetDetail {
        lock: lock_json(&preset),
        name: preset.name,
        namespace: preset.namespace,
        created_at: preset.created_at,
        created_by: preset.created_by,
        post_restore_sql: preset.post_restore_sql,
        versions,
    })
    .into_response())
}

async fn version_list(conn: &mut PgConnection, preset_id: Uuid) -> ApiResult<Vec<Snapshot>> {
    let rows = snapshots::versions(&mut *conn, preset_id).await?;
    let mut out = Vec::with_capacity(rows.len());
    for row in &rows {
        out.push(snapshot_json(&mut *conn, row).await?);
    }
    Ok(out)
}

/// A preset's versions (the change log).
#[utoipa::path(
    get,
    path = "/berth/v1/presets/{name}/versions",
    tag = "presets",
    operation_id = "preset_versions",
    params(PresetNamePath),
    responses(
        (status = 200, description = "The versions, oldest first", body = VersionList),
        (status = 400, description = "A malformed namespace", body = ErrorBody),
        (status = 404, description = "No such preset", body = ErrorBody),
    )
)]
pub(crate) async fn versions(
    State(state): State<AppState>,
    OsbPath(name): OsbPath<String>,
    OsbQuery(query): OsbQuery<NamespaceQuery>,
) -> ApiResult<Response> {
    let mut conn = state.db.acquire().await?;
    let preset = find(&mut conn, &query, &name).await?;
    let versions = version_list(&mut conn, preset.id).await?;
    Ok(Json(VersionList { versions }).into_response())
}

/// Who holds a preset's lock.
#[utoipa::path(
    get,
    path = "/berth/v1/presets/{name}/lock",
    tag = "presets",
    operation_id = "preset_lock",
    params(PresetNamePath),
    responses(
        (status = 200, description = "The lock", body = PresetLock),
        (status = 400, description = "A malformed namespace", body = ErrorBody),
        (status = 404, description = "No such preset", body = ErrorBody),
    )
)]
pub(crate) async fn get_lock(
    State(state): State<AppState>,
    OsbPath(name): OsbPath<String>,
    OsbQuery(query): OsbQuery<NamespaceQuery>,
) -> ApiResult<Response> {
    let preset = find(&mut *state.db.acquire().await?, &query, &name).await?;
    Ok(Json(lock_json(&preset)).into_response())
}

/// Lock a preset: pushes then need the lock's key.
#[utoipa::path(
    post,
    path = "/berth/v1/presets/{name}/lock",
    tag = "presets",
    operation_id = "lock_preset",
    params(PresetNamePath),
    request_body = LockBody,
    responses(
        (status = 200, description = "Locked; keep the key", body = LockTaken),
        (status = 400, description = "A blank `by`, or text too long", body = ErrorBody),
        (status = 404, description = "No such preset", body = ErrorBody),
        (status = 409, description = "Locked already", body = ErrorBody),
    )
)]
pub(crate) async fn lock(
    State(state): State<AppState>,
    OsbPath(name): OsbPath<String>,
    OsbQuery(query): OsbQuery<NamespaceQuery>,
    OsbJson(body): OsbJson<LockBody>,
) -> ApiResult<Response> {
    if body.by.trim().is_empty() {
        return Err(ApiError::bad_request("`by` must say who takes the lock"));
    }
    check_text("by", Some(&body.by), 200)?;
    check_text("reason", Some(&body.reason), 2000)?;
    let mut conn = state.db.acquire().await?;
    let preset = find(&mut conn, &query, &name).await?;
    let (key, hash) = new_lock_key();
    if !presets::lock(&mut *conn, preset.id, &hash, &body.by, &body.reason).await? {
        let now = find(&mut conn, &query, &name).await?;
        return Err(ApiError::Conflict(format!(
            "preset {name:?} is already locked by {} ({})",
            now.locked_by.as_deref().unwrap_or("someone"),
            now.lock_reason.as_deref().unwrap_or("no reason given")
        )));
    }
    Ok(Json(LockTaken {
        locked: true,
        lock_key: key,
        by: body.by,
        reason: body.reason,
    })
    .into_response())
}

/// Unlock a preset with its lock's key.
#[utoipa::path(
    delete,
    path = "/berth/v1/presets/{name}/lock",
    tag = "presets",
    operation_id = "unlock_preset",
    params(PresetNamePath),
    request_body = UnlockBody,
    responses(
        (status = 200, description = "Unlocked", body = PresetLock),
        (status = 400, description = "A malformed namespace", body = ErrorBody),
        (status = 403, description = "Not the lock's key", body = ErrorBody),
        (status = 404, description = "No such preset", body = ErrorBody),
        (status = 409, description = "Not locked", body = ErrorBody),
    )
)]
pub(crate) async fn unlock(
    State(state): State<AppState>,
    OsbPath(name): OsbPath<String>,
    OsbQuery(query): OsbQuery<NamespaceQuery>,
    OsbJson(body): OsbJson<UnlockBody>,
) -> ApiResult<Response> {
    let mut conn = state.db.acquire().await?;
    let preset = find(&mut conn, &query, &name).await?;
    if !preset.is_locked() {
        return Err(ApiError::Conflict(format!("preset {name:?} is not locked")));
    }
    if !presets::unlock(&mut *conn, preset.id, &lock_key_hash(&body.lock_key)).await? {
        return Err(ApiError::Forbidden(format!(
            "that is not the key of preset {name:?}'s lock"
        )));
    }
    Ok(Json(PresetLock {
        locked: false,
        by: None,
        reason: None,
        at: None,
    })
    .into_response())
}

/// Reset an instance's database to a preset version.
#[utoipa::path(
    post,
    path = "/berth/v1/instances/{instance_id}/select",
    tag = "presets",
    operation_id = "select_preset",
    params(InstanceIdPath),
    request_body = SelectBody,
    responses(
        (status = 202, description = "Accepted: poll the instance's `last_operation` with this operation", body = SelectStarted),
        (status = 400, description = "A malformed request", body = ErrorBody),
        (status = 404, description = "No such instance, preset or ready version", body = ErrorBody),
        (status = 422, description = "`ConcurrencyError`, a failed provision, or an instance without a database", body = ErrorBody),
    )
)]
pub(crate) async fn select(
    State(state): State<AppState>,
    OsbPath(instance_id): OsbPath<String>,
    OriginatingIdentity(identity): OriginatingIdentity,
    OsbJson(body): OsbJson<SelectBody>,
) -> ApiResult<Response> {
    check_id("instance_id", &instance_id)?;
    check_preset_name(&body.preset).map_err(ApiError::BadRequest)?;
    check_namespace(&body.namespace).map_err(ApiError::BadRequest)?;
    let mut tx = state.db.begin().await?;
    let preset = presets::get(&mut *tx, &body.namespace, &body.preset)
        .await?
        .ok_or_else(|| not_found(&body.preset))?;
    let snapshot = snapshots::ready_version(&mut *tx, preset.id, body.version)
        .await?
        .ok_or_else(|| {
            ApiError::NotFound(match body.version {
                Some(v) => format!("preset {:?} has no ready version {v}", body.preset),
                None => format!("preset {:?} has no ready version yet", body.preset),
            })
        })?;
    let operation = enqueue_restore(&mut tx, &state, &instance_id, &snapshot, identity).await?;
    tx.commit().await?;
    Ok(accepted_with(SelectStarted {
        operation: operation.to_string(),
        version: snapshot.version,
    }))
}

/// The preset, its row locked against pushes and locks, and refused (423) while someone holds its lock.
async fn unlocked_for_delete(
    tx: &mut PgConnection,
    query: &NamespaceQuery,
    name: &str,
) -> ApiResult<presets::PresetRow> {
    let namespace = query.namespace()?;
    let preset = presets::get_for_update(&mut *tx, &namespace, name)
        .await?
        .ok_or_else(|| not_found(name))?;
    if preset.is_locked() {
        return Err(ApiError::Locked(format!(
            "preset {name:?} is locked by {} ({}); unlock it before deleting",
            preset.locked_by.as_deref().unwrap_or("someone"),
            preset.lock_reason.as_deref().unwrap_or("no reason given"),
        )));
    }
    Ok(preset)
}

/// What a delete of a preset or of one of its versions started.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct PresetDeleted {
    name: String,
    namespace: String,
    /// The versions deleted (their objects go by the task).
    deleted_versions: Vec<Option<i32>>,
    /// The task deleting the objects and cached templates: poll `/berth/v1/tasks/{operation}`.
    #[schema(format = Uuid)]
    operation: String,
}

/// Deletes a preset with every version: the rows now, the store objects and cached templates by a task.
#[utoipa::path(
    delete,
    path = "/berth/v1/presets/{name}",
    tag = "presets",
    operation_id = "delete_preset",
    params(PresetNamePath),
    responses(
        (status = 202, description = "Deleted; the task removes its objects", body = PresetDeleted),
        (status = 400, description = "A malformed name or namespace", body = ErrorBody),
        (status = 404, description = "No such preset", body = ErrorBody),
        (status = 409, description = "A task still reads a version of it", body = ErrorBody),
        (status = 423, description = "The preset is locked", body = ErrorBody),
    )
)]
pub(crate) async fn delete_preset(
    State(state): State<AppState>,
    OsbPath(name): OsbPath<String>,
    OsbQuery(query): OsbQuery<NamespaceQuery>,
) -> ApiResult<Response> {
    let mut tx = state.db.begin().await?;
    let preset = unlocked_for_delete(&mut tx, &query, &name).await?;
    let rows = snapshots::versions(&mut *tx, preset.id).await?;
    let what = format!("preset {name:?}");
    let operation = delete_snapshots(&mut tx, &rows, Some(&preset.name), &what).await?;
    presets::delete(&mut *tx, preset.id).await?;
    tx.commit().await?;
    Ok(accepted_with(PresetDeleted {
        name: preset.name,
        namespace: preset.namespace,
        deleted_versions: rows.iter().map(|r| r.version).collect(),
        operation: operation.to_string(),
    }))
}

/// Deletes one version of a preset: its row now, its object and cached template by a task.
#[utoipa::path(
    delete,
    path = "/berth/v1/presets/{name}/versions/{version}",
    tag = "presets",
    operation_id = "delete_preset_version",
    params(PresetVersionPath),
    responses(
        (status = 202, description = "Deleted; the task removes its object", body = PresetDeleted),
        (status = 400, description = "A malformed name, namespace or version", body = ErrorBody),
        (status = 404, description = "No such preset or version", body = ErrorBody),
        (status = 409, description = "A task still reads the version", body = ErrorBody),
        (status = 423, description = "The preset is locked", body = ErrorBody),
    )
)]
pub(crate) async fn delete_version(
    State(state): State<AppState>,
    OsbPath((name, version)): OsbPath<(String, String)>,
    OsbQuery(query): OsbQuery<NamespaceQuery>,
) -> ApiResult<Response> {
    let number: i32 = version.parse().ok().filter(|n| *n > 0).ok_or_else(|| {
        ApiError::bad_request(format!(
            "version {version:?} is not a positive whole number"
        ))
    })?;
    let mut tx = state.db.begin().await?;
    let preset = unlocked_for_delete(&mut tx, &query, &name).await?;
    let row = snapshots::versions(&mut *tx, preset.id)
        .await?
        .into_iter()
        .find(|r| r.version == Some(number))
        .ok_or_else(|| ApiError::NotFound(format!("preset {name:?} has no version {number}")))?;
    let what = format!("version {number} of preset {name:?}");
    let operation = delete_snapshots(&mut tx, std::slice::from_ref(&row), None, &what).await?;
    tx.commit().await?;
    Ok(accepted_with(PresetDeleted {
        name: preset.name,
        namespace: preset.namespace,
        deleted_versions: vec![Some(number)],
        operation: operation.to_string(),
    }))
}
