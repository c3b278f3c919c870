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
    sqlx::query_as!(
        InstanceRow,
        "SELECT * FROM service_instances WHERE id = $1",
        id
    )
    .fetch_optional(db)
    .await
}

/// Locks the row for the rest of the transaction, so concurrent requests on one instance serialize.
pub async fn get_for_update(
    db: impl PgExecutor<'_>,
    id: &str,
) -> sqlx::Result<Option<InstanceRow>> {
    sqlx::query_as!(
        InstanceRow,
        "SELECT * FROM service_instances WHERE id = $1 FOR UPDATE",
        id
    )
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
    sqlx::query!("DELETE FROM service_instances WHERE id = $1", id)
        .execute(db)
        .await?;
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
    sqlx::query!(
        "UPDATE service_instances SET context = $2, updated_at = now() WHERE id = $1",
        id,
        context
    )
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
    Ok(rows
        .into_iter()
        .map(|r| (r.id, r.expiration_date))
        .collect())
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
                            originating_identity, webhook_url, webhook_secret, request_id)
         SELECT $9, $10, inserted.id, $11, $12, $13, $14, $15, $16, $17, $18 FROM inserted
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
        task.operation.map(crate::model::Operation::as_str),
        task.payload,
        task.max_attempts,
        task.originating_identity,
        webhook_url,
        webhook_secret,
        task.request_id,
    )
    .fetch_optional(db)
    .await?;
    Ok(id.map(crate::model::TaskId))
}

/// An instance to insert, owned: what [`insert_many_with_tasks`] takes (requests batched from many handlers).
#[derive(Debug, Clone)]
pub struct PendingInstance {
    pub id: String,
    pub service_id: String,
    pub plan_id: String,
    pub organization_guid: String,
    pub space_guid: String,
    pub context: Value,
    pub parameters: Value,
    pub maintenance_version: Option<String>,
}

impl NewInstance<'_> {
    pub fn to_pending(&self) -> PendingInstance {
        PendingInstance {
            id: self.id.to_string(),
            service_id: self.service_id.to_string(),
            plan_id: self.plan_id.to_string(),
            organization_guid: self.organization_guid.to_string(),
            space_guid: self.space_guid.to_string(),
            context: self.context.clone(),
            parameters: self.parameters.clone(),
            maintenance_version: self.maintenance_version.map(str::to_string),
        }
    }
}

/// [`insert_with_task`] for many provisions in one statement (one commit, one NOTIFY): each new instance
/// with its first task. Returns the ids of the instances inserted; an id that exists already is skipped with
/// its task (its caller takes the slow path). Ids must be distinct within `batch`.
pub async fn insert_many_with_tasks(
    db: impl PgExecutor<'_>,
    batch: &[(PendingInstance, crate::db::tasks::NewTask)],
) -> sqlx::Result<Vec<String>> {
    let mut ids = Vec::with_capacity(batch.len());
    let mut service_ids = Vec::with_capacity(batch.len());
    let mut plan_ids = Vec::with_capacity(batch.len());
    let mut orgs = Vec::with_capacity(batch.len());
    let mut spaces = Vec::with_capacity(batch.len());
    let mut contexts = Vec::with_capacity(batch.len());
    let mut parameters = Vec::with_capacity(batch.len());
    let mut maintenance = Vec::with_capacity(batch.len());
    let mut task_ids = Vec::with_capacity(batch.len());
    let mut kinds = Vec::with_capacity(batch.len());
    let mut operations = Vec::with_capacity(batch.len());
    let mut payloads = Vec::with_capacity(batch.len());
    let mut max_attempts = Vec::with_capacity(batch.len());
    let mut identities = Vec::with_capacity(batch.len());
    let mut webhook_urls = Vec::with_capacity(batch.len());
    let mut webhook_secrets = Vec::with_capacity(batch.len());
    let mut request_ids = Vec::with_capacity(batch.len());
    for (instance, task) in batch {
        ids.push(instance.id.clone());
        service_ids.push(instance.service_id.clone());
        plan_ids.push(instance.plan_id.clone());
        orgs.push(instance.organization_guid.clone());
        spaces.push(instance.space_guid.clone());
        contexts.push(instance.context.clone());
        parameters.push(instance.parameters.clone());
        maintenance.push(instance.maintenance_version.clone());
        task_ids.push(task.id.0);
        kinds.push(task.kind.to_string());
        operations.push(task.operation.map(|o| o.as_str().to_string()));
        payloads.push(task.payload.clone());
        max_attempts.push(task.max_attempts);
        // NULL elements of a jsonb[] come back as SQL NULL, which the column allows.
        identities.push(task.originating_identity.clone());
        webhook_urls.push(task.webhook.as_ref().map(|(url, _)| url.clone()));
        webhook_secrets.push(task.webhook.as_ref().map(|(_, secret)| secret.clone()));
        request_ids.push(task.request_id.clone());
    }
    sqlx::query_scalar!(
        r#"WITH input AS (
               SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::jsonb[],
                                    $7::jsonb[], $8::text[], $9::uuid[], $10::text[], $11::text[], $12::jsonb[],
                                    $13::int4[], $14::jsonb[], $15::text[], $16::bytea[], $17::text[])
                   AS i(id, service_id, plan_id, organization_guid, space_guid, context, parameters,
                        maintenance_version, task_id, kind, operation, payload, max_attempts,
                        originating_identity, webhook_url, webhook_secret, request_id)
           ),
           inserted AS (
               INSERT INTO service_instances
                   (id, service_id, plan_id, organization_guid, space_guid, context, parameters, maintenance_version)
               SELECT id, service_id, plan_id, organization_guid, space_guid, context, parameters, maintenance_version
               FROM input
               ON CONFLICT (id) DO NOTHING
               RETURNING id
           )
           INSERT INTO tasks (id, kind, instance_id, operation, payload, max_attempts, originating_identity,
                              webhook_url, webhook_secret, request_id)
           SELECT input.task_id, input.kind, input.id, input.operation, input.payload, input.max_attempts,
                  input.originating_identity, input.webhook_url, input.webhook_secret, input.request_id
           FROM input JOIN inserted ON inserted.id = input.id
           RETURNING instance_id AS "instance_id!""#,
        &ids,
        &service_ids,
        &plan_ids,
        &orgs,
        &spaces,
        &contexts,
        &parameters,
        &maintenance as &[Option<String>],
        &task_ids,
        &kinds,
        &operations as &[Option<String>],
        &payloads,
        &max_attempts,
        &identities as &[Option<Value>],
        &webhook_urls as &[Option<String>],
        &webhook_secrets as &[Option<Vec<u8>>],
        &request_ids as &[Option<String>],
    )
    .fetch_all(db)
    .await
}

/// Replaces the instance's sealed secrets alone: a provider that must keep a secret before the provision ends
/// (the ec2 engine writes the admin password into the VM's user-data, so it must survive a retry).
pub async fn set_secrets(db: impl PgExecutor<'_>, id: &str, secrets: &[u8]) -> sqlx::Result<()> {
    sqlx::query!(
        "UPDATE service_instances SET secrets = $2, updated_at = now() WHERE id = $1",
        id,
        secrets
    )
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

/// An instance as `GET /berth/v1/instances` lists it: its plan and its latest instance operation.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ListedInstance {
    pub id: String,
    pub service_id: String,
    pub plan_id: String,
    pub parameters: Value,
    pub created_at: DateTime<Utc>,
    pub operation: Option<String>,
    pub operation_state: Option<String>,
    pub progress: Option<String>,
    pub last_error: Option<String>,
}

/// Every instance in id order from `after` (exclusive), at most `limit`, with its latest instance operation; only
/// instance `only` when given.
pub async fn list_page_with_operation(
    db: impl PgExecutor<'_>,
    after: &str,
    limit: i64,
    only: Option<&str>,
) -> sqlx::Result<Vec<ListedInstance>> {
    sqlx::query_as(
        "SELECT i.id, i.service_id, i.plan_id, i.parameters, i.created_at, t.operation, t.state AS operation_state, t.progress,
                t.last_error
         FROM service_instances i
         LEFT JOIN LATERAL (
             SELECT operation, state, progress, last_error FROM tasks
             WHERE instance_id = i.id AND binding_id IS NULL AND operation IS NOT NULL
             ORDER BY created_at DESC LIMIT 1) t ON true
         WHERE i.id > $1 AND ($3::text IS NULL OR i.id = $3) ORDER BY i.id LIMIT $2",
    )
    .bind(after)
    .bind(limit)
    .bind(only)
    .fetch_all(db)
    .await
}

/// Ids of instances of `plan_ids` whose provision succeeded, in id order from `after` (exclusive), at most `limit`
/// (every engine, including those that record no `ready_at`).
pub async fn provisioned_ids_page(
    db: impl PgExecutor<'_>,
    plan_ids: &[String],
    after: &str,
    limit: i64,
) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar(
        "SELECT id FROM service_instances i
         WHERE plan_id = ANY($1) AND id > $2
           AND EXISTS (
               SELECT 1 FROM tasks t
               WHERE t.instance_id = i.id AND t.binding_id IS NULL AND t.operation = 'provision'
                 AND t.state = 'succeeded')
         ORDER BY id LIMIT $3",
    )
    .bind(plan_ids)
    .bind(after)
    .bind(limit)
    .fetch_all(db)
    .await
}
