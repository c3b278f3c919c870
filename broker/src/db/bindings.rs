//! `service_bindings`: one row per binding; credentials sealed.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgExecutor;

#[derive(Debug, Clone)]
pub struct BindingRow {
    pub id: String,
    pub instance_id: String,
    pub service_id: String,
    pub plan_id: String,
    pub app_guid: Option<String>,
    pub bind_resource: Value,
    pub context: Value,
    pub parameters: Value,
    pub details: Value,
    pub credentials: Option<Vec<u8>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// When the binding stops working (OSB `metadata.expires_at`); `None`: never.
    pub expires_at: Option<DateTime<Utc>>,
    /// When the platform should make a successor (OSB `metadata.renew_before`); set with `expires_at`.
    pub renew_before: Option<DateTime<Utc>>,
    /// When the reconcile loop revoked the expired binding's credentials.
    pub revoked_at: Option<DateTime<Utc>>,
}

impl BindingRow {
    /// Whether the binding has passed its `expires_at` (revoked or about to be).
    pub fn expired(&self, now: DateTime<Utc>) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }
}

#[derive(Debug, Clone)]
pub struct NewBinding<'a> {
    pub id: &'a str,
    pub instance_id: &'a str,
    pub service_id: &'a str,
    pub plan_id: &'a str,
    pub app_guid: Option<&'a str>,
    pub bind_resource: &'a Value,
    pub context: &'a Value,
    pub parameters: &'a Value,
    pub expires_at: Option<DateTime<Utc>>,
    pub renew_before: Option<DateTime<Utc>>,
}

pub async fn get(db: impl PgExecutor<'_>, id: &str) -> sqlx::Result<Option<BindingRow>> {
    sqlx::query_as!(
        BindingRow,
        "SELECT * FROM service_bindings WHERE id = $1",
        id
    )
    .fetch_optional(db)
    .await
}

pub async fn get_for_update(db: impl PgExecutor<'_>, id: &str) -> sqlx::Result<Option<BindingRow>> {
    sqlx::query_as!(
        BindingRow,
        "SELECT * FROM service_bindings WHERE id = $1 FOR UPDATE",
        id
    )
    .fetch_optional(db)
    .await
}

pub async fn list_for_instance(
    db: impl PgExecutor<'_>,
    instance_id: &str,
) -> sqlx::Result<Vec<BindingRow>> {
    sqlx::query_as!(
        BindingRow,
        "SELECT * FROM service_bindings WHERE instance_id = $1 ORDER BY created_at",
        instance_id
    )
    .fetch_all(db)
    .await
}

/// Inserts the row; `false` when another request inserted the same id first.
pub async fn insert(db: impl PgExecutor<'_>, new: &NewBinding<'_>) -> sqlx::Result<bool> {
    let done = sqlx::query!(
        "INSERT INTO service_bindings
             (id, instance_id, service_id, plan_id, app_guid, bind_resource, context, parameters,
              expires_at, renew_before)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
         ON CONFLICT (id) DO NOTHING",
        new.id,
        new.instance_id,
        new.service_id,
        new.plan_id,
        new.app_guid,
        new.bind_resource,
        new.context,
        new.parameters,
        new.expires_at,
        new.renew_before,
    )
    .execute(db)
    .await?;
    Ok(done.rows_affected() == 1)
}

pub async fn delete(db: impl PgExecutor<'_>, id: &str) -> sqlx::Result<()> {
    sqlx::query!("DELETE FROM service_bindings WHERE id = $1", id)
        .execute(db)
        .await?;
    Ok(())
}

/// Records what the provider made for the binding: non-secret facts and the sealed credentials.
pub async fn set_credentials(
    db: impl PgExecutor<'_>,
    id: &str,
    details: &Value,
    credentials: Option<&[u8]>,
) -> sqlx::Result<()> {
    sqlx::query!(
        "UPDATE service_bindings SET details = $2, credentials = $3, updated_at = now() WHERE id = $1",
        id,
        details,
        credentials,
    )
    .execute(db)
    .await?;
    Ok(())
}

/// How many bindings of the instance, other than `except`, have an expiry still ahead (the plan's
/// `max_per_instance` bounds it).
pub async fn count_unexpired_expiring(
    db: impl PgExecutor<'_>,
    instance_id: &str,
    except: &str,
) -> sqlx::Result<i64> {
    sqlx::query_scalar!(
        r#"SELECT count(*) AS "count!" FROM service_bindings
           WHERE instance_id = $1 AND id <> $2 AND expires_at > now()"#,
        instance_id,
        except,
    )
    .fetch_one(db)
    .await
}

/// Ids of bindings past their `expires_at` whose credentials are not yet revoked, oldest expiry first, leaving
/// out those with a task of `revoke_kind` unfinished or failed after `failed_since`.
pub async fn list_expired_unrevoked(
    db: impl PgExecutor<'_>,
    revoke_kind: &str,
    failed_since: DateTime<Utc>,
    limit: i64,
) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar!(
        "SELECT b.id FROM service_bindings b
         WHERE b.expires_at <= now() AND b.revoked_at IS NULL
           AND NOT EXISTS (
               SELECT 1 FROM tasks t
               WHERE t.binding_id = b.id AND t.kind = $1
                 AND (t.state IN ('pending', 'running') OR (t.state = 'failed' AND t.finished_at > $2)))
         ORDER BY b.expires_at LIMIT $3",
        revoke_kind,
        failed_since,
        limit,
    )
    .fetch_all(db)
    .await
}

/// Locks the binding row unless another transaction holds it (then `None`: someone else is on it).
pub async fn try_lock(db: impl PgExecutor<'_>, id: &str) -> sqlx::Result<Option<BindingRow>> {
    sqlx::query_as!(
        BindingRow,
        "SELECT * FROM service_bindings WHERE id = $1 FOR UPDATE SKIP LOCKED",
        id
    )
    .fetch_optional(db)
    .await
}

/// Records that the binding's credentials were revoked; the first time is kept.
pub async fn mark_revoked(db: impl PgExecutor<'_>, id: &str) -> sqlx::Result<()> {
    sqlx::query!(
        "UPDATE service_bindings SET revoked_at = coalesce(revoked_at, now()), updated_at = now() WHERE id = $1",
        id
    )
    .execute(db)
    .await?;
    Ok(())
}
