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
use serde::Deserialize;
use serde_json::{Value, json};
use sqlx::{PgConnection, Postgres, Transaction};
use uuid::Uuid;

use super::{
    accepted_with, check_id,
    snapshot_common::{delete_snapshots, enqueue_restore, instance_with_database, snapshot_json},
};
use crate::{
    AppState,
    error::{ApiError, ApiResult},
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
struct NamespaceQuery {
    namespace: Option<String>,
}

impl NamespaceQuery {
    fn namespace(&self) -> ApiResult<String> {
        let ns = self.namespace.clone().unwrap_or_default();
        check_namespace(&ns).map_err(ApiError::BadRequest)?;
        Ok(ns)
    }
}

#[derive(Debug, Deserialize)]
struct PushNewBody {
    name: String,
    #[serde(default)]
    namespace: String,
    instance_id: String,
    description: Option<String>,
    post_restore_sql: Option<String>,
    /// Who pushes (the change log's author).
    author: Option<String>,
}

#[derive(Debug, Deserialize)]
struct PushBody {
    instance_id: String,
    description: Option<String>,
    author: Option<String>,
    lock_key: Option<String>,
}

#[derive(Debug, Deserialize)]
struct LockBody {
    by: String,
    #[serde(default)]
    reason: String,
}

#[derive(Debug, Deserialize)]
struct UnlockBody {
    lock_key: String,
}

#[derive(Debug, Deserialize)]
struct SelectBody {
    preset: String,
    #[serde(default)]
    namespace: String,
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

async fn list(
    State(state): State<AppState>,
    OsbQuery(query): OsbQuery<NamespaceQuery>,
) -> ApiResult<Response> {
    let namespace = query
        .namespace
        .as_deref()
        .map(|_| query.namespace())
        .transpose()?;
    let rows = presets::list(&state.db, namespace.as_deref()).await?;
    let presets: Vec<Value> = rows
        .iter()
        .map(|r| {
            json!({
                "name": r.preset.name,
                "namespace": r.preset.namespace,
                "latest_version": r.latest_version,
                "latest_at": r.latest_at,
                "versions": r.versions,
                "created_at": r.preset.created_at,
                "created_by": r.preset.created_by,
                "lock": lock_json(&r.preset),
            })
        })
        .collect();
    Ok(Json(json!({ "presets": presets })).into_response())
}

fn lock_json(preset: &presets::PresetRow) -> Value {
    if preset.is_locked() {
        json!({ "locked": true, "by": preset.locked_by, "reason": preset.lock_reason, "at": preset.locked_at })
    } else {
        json!({ "locked": false })
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
        Ok(accepted_with(json!({
            "name": preset.name,
            "namespace": preset.namespace,
            "version": version,
            "snapshot_id": id,
            "operation": operation.to_string(),
        })))
    }
}

async fn push_new(
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

async fn push(
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

async fn show(
    State(state): State<AppState>,
    OsbPath(name): OsbPath<String>,
    OsbQuery(query): OsbQuery<NamespaceQuery>,
) -> ApiResult<Response> {
    let mut conn = state.db.acquire().await?;
    let preset = find(&mut conn, &query, &name).await?;
    let versions = version_list(&mut conn, preset.id).await?;
    Ok(Json(json!({
        "name": preset.name,
        "namespace": preset.namespace,
        "created_at": preset.created_at,
        "created_by": preset.created_by,
        "post_restore_sql": preset.post_restore_sql,
        "lock": lock_json(&preset),
        "versions": versions,
    }))
    .into_response())
}

async fn version_list(conn: &mut PgConnection, preset_id: Uuid) -> ApiResult<Vec<Value>> {
    let rows = snapshots::versions(&mut *conn, preset_id).await?;
    let mut out = Vec::with_capacity(rows.len());
    for row in &rows {
        out.push(snapshot_json(&mut *conn, row).await?);
    }
    Ok(out)
}

async fn versions(
    State(state): State<AppState>,
    OsbPath(name): OsbPath<String>,
    OsbQuery(query): OsbQuery<NamespaceQuery>,
) -> ApiResult<Response> {
    let mut conn = state.db.acquire().await?;
    let preset = find(&mut conn, &query, &name).await?;
    let versions = version_list(&mut conn, preset.id).await?;
    Ok(Json(json!({ "versions": versions })).into_response())
}

async fn get_lock(
    State(state): State<AppState>,
    OsbPath(name): OsbPath<String>,
    OsbQuery(query): OsbQuery<NamespaceQuery>,
) -> ApiResult<Response> {
    let preset = find(&mut *state.db.acquire().await?, &query, &name).await?;
    Ok(Json(lock_json(&preset)).into_response())
}

async fn lock(
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
    Ok(
        Json(json!({ "locked": true, "lock_key": key, "by": body.by, "reason": body.reason }))
            .into_response(),
    )
}

async fn unlock(
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
    Ok(Json(json!({ "locked": false })).into_response())
}

async fn select(
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
    Ok(accepted_with(
        json!({ "operation": operation.to_string(), "version": snapshot.version }),
    ))
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

async fn delete_preset(
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
    let versions: Vec<Option<i32>> = rows.iter().map(|r| r.version).collect();
    Ok(accepted_with(json!({
        "name": preset.name,
        "namespace": preset.namespace,
        "deleted_versions": versions,
        "operation": operation.to_string(),
    })))
}

async fn delete_version(
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
    Ok(accepted_with(json!({
        "name": preset.name,
        "namespace": preset.namespace,
        "deleted_versions": [number],
        "operation": operation.to_string(),
    })))
}
