//! `service_instances`: one row per provisioned (or provisioning) instance.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgExecutor;

#[derive(Debug, Clone)]
pub struct InstanceRow {
    pub id: String,
    pub service_id: String,
    pub plan_id: String,
    pub organization_guid: String,
    pub space_guid: String,
    pub context: Value,
    pub parameters: Value,
    pub maintenance_version: Option<String>,
    pub details: Value,
    pub secrets: Option<Vec<u8>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone)]
pub struct NewInstance<'a> {
    pub id: &'a str,
    pub service_id: &'a str,
    pub plan_id: &'a str,
    pub organization_guid: &'a str,
    pub space_guid: &'a str,
    pub context: &'a Value,
    pub parameters: &'a Value,
    pub maintenance_version: Option<&'a str>,
}

pub async fn get(db: impl PgExecutor<'_>, id: &str) -> sqlx::Result<Option<InstanceRow>> {
    sqlx::query_as!(InstanceRow, "SELECT * FROM service_instances WHERE id = $1", id)
        .fetch_optional(db)
        .await
}

/// Locks the row for the rest of the transaction, so concurrent requests on one instance serialize.
pub async fn get_for_update(db: impl PgExecutor<'_>, id: &str) -> sqlx::Result<Option<InstanceRow>> {
    sqlx::query_as!(InstanceRow, "SELECT * FROM service_instances WHERE id = $1 FOR UPDATE", id)
        .fetch_optional(db)
        .await
}

/// Inserts the row; `false` when another request inserted the same id first.
pub async fn insert(db: impl PgExecutor<'_>, new: &NewInstance<'_>) -> sqlx::Result<bool> {
    let done = sqlx::query!(
        "INSERT INTO service_instances
             (id, service_id, plan_id, organization_guid, space_guid, context, parameters, maintenance_version)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
         ON CONFLICT (id) DO NOTHING",
        new.id,
        new.service_id,
        new.plan_id,
        new.organization_guid,
        new.space_guid,
        new.context,
        new.parameters,
        new.maintenance_version,
    )
    .execute(db)
    .await?;
    Ok(done.rows_affected() == 1)
}

pub async fn delete(db: impl PgExecutor<'_>, id: &str) -> sqlx::Result<()> {
    sqlx::query!("DELETE FROM service_instances WHERE id = $1", id).execute(db).await?;
    Ok(())
}

/// Records what the provider made: non-secret facts and sealed secrets.
pub async fn set_details(
    db: impl PgExecutor<'_>,
    id: &str,
    details: &Value,
    secrets: Option<&[u8]>,
) -> sqlx::Result<()> {
    sqlx::query!(
        "UPDATE service_instances SET details = $2, secrets = $3, updated_at = now() WHERE id = $1",
        id,
        details,
        secrets,
    )
    .execute(db)
    .await?;
    Ok(())
}

/// Makes an accepted update the instance's new state, once the provider has applied it.
pub async fn apply_update(
    db: impl PgExecutor<'_>,
    id: &str,
    plan_id: &str,
    parameters: &Value,
    context: &Value,
    maintenance_version: Option<&str>,
) -> sqlx::Result<()> {
    sqlx::query!(
        "UPDATE service_instances
         SET plan_id = $2, parameters = $3, context = $4,
             maintenance_version = COALESCE($5, maintenance_version), updated_at = now()
         WHERE id = $1",
        id,
        plan_id,
        parameters,
        context,
        maintenance_version,
    )
    .execute(db)
    .await?;
    Ok(())
}

/// Replaces the instance's context (an update that changes nothing else is applied at once).
pub async fn set_context(db: impl PgExecutor<'_>, id: &str, context: &Value) -> sqlx::Result<()> {
    sqlx::query!("UPDATE service_instances SET context = $2, updated_at = now() WHERE id = $1", id, context)
        .execute(db)
        .await?;
    Ok(())
}

/// Merges `patch` into the instance's details (top-level keys replaced); the provider's own bookkeeping
/// between operations (the host that owns a server, restarts).
pub async fn merge_details(db: impl PgExecutor<'_>, id: &str, patch: &Value) -> sqlx::Result<()> {
    sqlx::query!(
        "UPDATE service_instances SET details = details || $2, updated_at = now() WHERE id = $1",
        id,
        patch,
    )
    .execute(db)
    .await?;
    Ok(())
}

/// Instances of `plan_ids` provisioned on `host` (details `engine_host` = host, `ready_at` set) with no
/// instance operation pending or running: what a worker's reconcile loop looks after.
pub async fn list_ready_on_host(
    db: impl PgExecutor<'_>,
    plan_ids: &[String],
    host: &str,
) -> sqlx::Result<Vec<InstanceRow>> {
    sqlx::query_as!(
        InstanceRow,
        "SELECT * FROM service_instances i
         WHERE plan_id = ANY($1) AND details->>'engine_host' = $2 AND details->>'ready_at' IS NOT NULL
           AND NOT EXISTS (
               SELECT 1 FROM tasks t
               WHERE t.instance_id = i.id AND t.binding_id IS NULL AND t.operation IS NOT NULL
                 AND t.state IN ('pending', 'running'))
         ORDER BY id",
        plan_ids,
        host,
    )
    .fetch_all(db)
    .await
}

/// Ids and `expiration_date` parameters of instances that have one and whose expiry deprovision has not
/// been enqueued yet (details `expiry_deprovision_at`).
pub async fn list_expiring(db: impl PgExecutor<'_>) -> sqlx::Result<Vec<(String, String)>> {
    let rows = sqlx::query!(
        r#"SELECT id, parameters->>'expiration_date' AS "expiration_date!" FROM service_instances
           WHERE parameters->>'expiration_date' IS NOT NULL AND details->>'expiry_deprovision_at' IS NULL"#
    )
    .fetch_all(db)
    .await?;
    Ok(rows.into_iter().map(|r| (r.id, r.expiration_date)).collect())
}

/// Inserts a new instance and its first task in one statement (one round trip, one commit): the fast path of
/// a provision. `None` when the id exists already (nothing is written; the caller takes the slow path).
pub async fn insert_with_task(
    db: impl PgExecutor<'_>,
    new: &NewInstance<'_>,
    task: &crate::db::tasks::NewTask,
) -> sqlx::Result<Option<crate::model::TaskId>> {
    let (webhook_url, webhook_secret) = match &task.webhook {
        Some((url, secret)) => (Some(url.as_str()), Some(secret.as_slice())),
        None => (None, None),
    };
    let id = sqlx::query_scalar!(
        "WITH inserted AS (
             INSERT INTO service_instances
                 (id, service_id, plan_id, organization_guid, space_guid, context, parameters, maintenance_version)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
             ON CONFLICT (id) DO NOTHING
             RETURNING id
         )
         INSERT INTO tasks (id, kind, instance_id, binding_id, operation, payload, max_attempts,
                            originating_identity, webhook_url, webhook_secret)
         SELECT $9, $10, inserted.id, $11, $12, $13, $14, $15, $16, $17 FROM inserted
         RETURNING id",
        new.id,
        new.service_id,
        new.plan_id,
        new.organization_guid,
        new.space_guid,
        new.context,
        new.parameters,
        new.maintenance_version,
        task.id.0,
        task.kind,
        task.binding_id,
        task.operation,
        task.payload,
        task.max_attempts,
        task.originating_identity,
        webhook_url,
        webhook_secret,
    )
    .fetch_optional(db)
    .await?;
    Ok(id.map(crate::model::TaskId))
}

/// Replaces the instance's sealed secrets alone: a provider that must keep a secret before the provision ends
/// (the ec2 engine writes the admin password into the VM's user-data, so it must survive a retry).
pub async fn set_secrets(db: impl PgExecutor<'_>, id: &str, secrets: &[u8]) -> sqlx::Result<()> {
    sqlx::query!("UPDATE service_instances SET secrets = $2, updated_at = now() WHERE id = $1", id, secrets)
        .execute(db)
        .await?;
    Ok(())
}

/// Instances of `plan_ids` whose provision succeeded (details `ready_at`) with no instance operation pending or
/// running, in id order from `after`, at most `limit`: what the ec2 reconcile loop looks after, a page at a time.
pub async fn list_ready_page(
    db: impl PgExecutor<'_>,
    plan_ids: &[String],
    after: &str,
    limit: i64,
) -> sqlx::Result<Vec<InstanceRow>> {
    sqlx::query_as!(
        InstanceRow,
        "SELECT * FROM service_instances i
         WHERE plan_id = ANY($1) AND details->>'ready_at' IS NOT NULL AND id > $2
           AND NOT EXISTS (
               SELECT 1 FROM tasks t
               WHERE t.instance_id = i.id AND t.binding_id IS NULL AND t.operation IS NOT NULL
                 AND t.state IN ('pending', 'running'))
         ORDER BY id LIMIT $3",
        plan_ids,
        after,
        limit,
    )
    .fetch_all(db)
    .await
}
