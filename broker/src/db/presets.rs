//! `presets`: named, versioned database snapshots with an atomic lock (compare-and-set on the row).

use chrono::{DateTime, Utc};
use sqlx::PgExecutor;
use uuid::Uuid;

#[derive(Debug, Clone)]
pub struct PresetRow {
    pub id: Uuid,
    pub namespace: String,
    pub name: String,
    pub post_restore_sql: Option<String>,
    pub created_by: Option<String>,
    pub created_at: DateTime<Utc>,
    pub lock_key_hash: Option<Vec<u8>>,
    pub locked_by: Option<String>,
    pub lock_reason: Option<String>,
    pub locked_at: Option<DateTime<Utc>>,
}

impl PresetRow {
    pub fn is_locked(&self) -> bool {
        self.lock_key_hash.is_some()
    }
}

/// A preset with its newest ready version, for listings.
#[derive(Debug, Clone)]
pub struct PresetSummary {
    pub preset: PresetRow,
    pub latest_version: Option<i32>,
    pub latest_at: Option<DateTime<Utc>>,
    pub versions: i64,
}

/// Adds a preset; `false` when one of that name exists in the namespace.
pub async fn insert(
    db: impl PgExecutor<'_>,
    id: Uuid,
    namespace: &str,
    name: &str,
    post_restore_sql: Option<&str>,
    created_by: Option<&str>,
) -> sqlx::Result<bool> {
    let done = sqlx::query!(
        "INSERT INTO presets (id, namespace, name, post_restore_sql, created_by) VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (namespace, name) DO NOTHING",
        id,
        namespace,
        name,
        post_restore_sql,
        created_by,
    )
    .execute(db)
    .await?;
    Ok(done.rows_affected() == 1)
}

pub async fn get(
    db: impl PgExecutor<'_>,
    namespace: &str,
    name: &str,
) -> sqlx::Result<Option<PresetRow>> {
    sqlx::query_as!(
        PresetRow,
        "SELECT * FROM presets WHERE namespace = $1 AND name = $2",
        namespace,
        name
    )
    .fetch_optional(db)
    .await
}

/// Like [`get`], holding the row until the transaction ends: pushes and lock changes then go one at a time.
pub async fn get_for_update(
    db: impl PgExecutor<'_>,
    namespace: &str,
    name: &str,
) -> sqlx::Result<Option<PresetRow>> {
    sqlx::query_as!(
        PresetRow,
        "SELECT * FROM presets WHERE namespace = $1 AND name = $2 FOR UPDATE",
        namespace,
        name
    )
    .fetch_optional(db)
    .await
}

pub async fn get_by_id(db: impl PgExecutor<'_>, id: Uuid) -> sqlx::Result<Option<PresetRow>> {
    sqlx::query_as!(PresetRow, "SELECT * FROM presets WHERE id = $1", id)
        .fetch_optional(db)
        .await
}

/// Presets (of one namespace, or all), with their newest ready version.
pub async fn list(
    db: impl PgExecutor<'_>,
    namespace: Option<&str>,
) -> sqlx::Result<Vec<PresetSummary>> {
    let rows = sqlx::query!(
        r#"SELECT p.id, p.namespace, p.name, p.post_restore_sql, p.created_by, p.created_at, p.lock_key_hash,
                  p.locked_by, p.lock_reason, p.locked_at,
                  v.version AS "latest_version?", v.completed_at AS "latest_at?",
                  (SELECT count(*) FROM snapshots s WHERE s.preset_id = p.id AND s.state = 'ready') AS "versions!"
           FROM presets p
           LEFT JOIN LATERAL (
               SELECT version, completed_at FROM snapshots s
               WHERE s.preset_id = p.id AND s.state = 'ready' ORDER BY version DESC LIMIT 1
           ) v ON true
           WHERE $1::text IS NULL OR p.namespace = $1
           ORDER BY p.namespace, p.name"#,
        namespace
    )
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| PresetSummary {
            preset: PresetRow {
                id: r.id,
                namespace: r.namespace,
                name: r.name,
                post_restore_sql: r.post_restore_sql,
                created_by: r.created_by,
                created_at: r.created_at,
                lock_key_hash: r.lock_key_hash,
                locked_by: r.locked_by,
                lock_reason: r.lock_reason,
                locked_at: r.locked_at,
            },
            latest_version: r.latest_version,
            latest_at: r.latest_at,
            versions: r.versions,
        })
        .collect())
}

/// Takes the lock if nobody holds it: one statement, so of many concurrent lockers exactly one wins.
pub async fn lock(
    db: impl PgExecutor<'_>,
    id: Uuid,
    key_hash: &[u8],
    who: &str,
    reason: &str,
) -> sqlx::Result<bool> {
    let done = sqlx::query!(
        "UPDATE presets SET lock_key_hash = $2, locked_by = $3, lock_reason = $4, locked_at = now()
         WHERE id = $1 AND lock_key_hash IS NULL",
        id,
        key_hash,
        who,
        reason,
    )
    .execute(db)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Releases the lock if `key_hash` is the one that took it.
pub async fn unlock(db: impl PgExecutor<'_>, id: Uuid, key_hash: &[u8]) -> sqlx::Result<bool> {
    let done = sqlx::query!(
        "UPDATE presets SET lock_key_hash = NULL, locked_by = NULL, lock_reason = NULL, locked_at = NULL
         WHERE id = $1 AND lock_key_hash = $2",
        id,
        key_hash,
    )
    .execute(db)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Removes a preset that never got a ready version (its first push failed), so the name can be used again.
pub async fn delete_if_empty(db: impl PgExecutor<'_>, id: Uuid) -> sqlx::Result<bool> {
    let done = sqlx::query!(
        "DELETE FROM presets p WHERE id = $1
         AND NOT EXISTS (SELECT 1 FROM snapshots s WHERE s.preset_id = p.id AND s.state IN ('ready', 'pending'))",
        id
    )
    .execute(db)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Removes the preset row (its versions' rows go with it: `ON DELETE CASCADE`).
pub async fn delete(db: impl PgExecutor<'_>, id: Uuid) -> sqlx::Result<()> {
    sqlx::query("DELETE FROM presets WHERE id = $1")
        .bind(id)
        .execute(db)
        .await?;
    Ok(())
}
