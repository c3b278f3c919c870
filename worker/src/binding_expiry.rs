//! Expired bindings, found by the reconcile loop: each gets one `binding.expire` task (see
//! `tasks/expire_binding.rs`), which revokes its credentials durably. Safe with any number of workers: the
//! instance and binding rows are locked (skipping ones someone else holds, in the API's order) while a worker
//! checks that no revocation is queued and queues one.

use anyhow::Context as _;
use broker::{
    db::{bindings, tasks},
    model::{Operation, kinds},
};
use chrono::Utc;
use serde_json::json;
use sqlx::PgPool;
use tracing::info;

/// Bindings looked at per pass; the rest wait for the next one.
const PER_PASS: i64 = 500;

/// How long after a revocation failed (all its attempts spent) another is queued.
const RETRY_FAILED_AFTER: chrono::Duration = chrono::Duration::minutes(10);

/// Queues the revocation of every expired binding that has none yet; returns how many it queued. A binding
/// whose bind or unbind is running, or whose instance is being rotated or deprovisioned, is taken next pass.
pub async fn enqueue_revocations(pool: &PgPool) -> anyhow::Result<usize> {
    let failed_since = Utc::now() - RETRY_FAILED_AFTER;
    let due = bindings::list_expired_unrevoked(pool, kinds::EXPIRE_BINDING, failed_since, PER_PASS)
        .await
        .context("listing expired bindings")?;
    let mut queued = 0;
    for id in due {
        let mut tx = pool.begin().await?;
        match revocation_due(&mut tx, &id, failed_since).await? {
            Some(task) => {
                let instance_id = task.instance_id.clone().unwrap_or_default();
                tasks::enqueue(&mut *tx, task).await?;
                tx.commit().await?;
                queued += 1;
                info!(binding_id = %id, %instance_id, "the binding expired; revocation enqueued");
            }
            // Rolled back here rather than on drop (which sqlx does later, in the background): the rows
            // locked while checking are free for the next pass, or another worker, at once.
            None => tx.rollback().await?,
        }
    }
    Ok(queued)
}

/// The revocation task for binding `id`, with its instance and binding rows locked; `None` when someone else
/// holds them, it is revoked or not expired, a revocation is queued (or failed since `failed_since`), or its
/// bind, unbind, rotation or deprovision is running.
async fn revocation_due(
    tx: &mut sqlx::PgConnection,
    id: &str,
    failed_since: chrono::DateTime<Utc>,
) -> anyhow::Result<Option<tasks::NewTask>> {
    let Some(instance_id) = bindings::get(&mut *tx, id).await?.map(|b| b.instance_id) else {
        return Ok(None);
    };
    // Lock order everywhere: instance row, then binding row.
    let instance_locked: Option<i32> =
        sqlx::query_scalar("SELECT 1 FROM service_instances WHERE id = $1 FOR UPDATE SKIP LOCKED")
            .bind(&instance_id)
            .fetch_optional(&mut *tx)
            .await?;
    if instance_locked.is_none() {
        return Ok(None);
    }
    let Some(binding) = bindings::try_lock(&mut *tx, id).await? else {
        return Ok(None);
    };
    if binding.revoked_at.is_some() || !binding.expired(Utc::now()) {
        return Ok(None);
    }
    // Checked after taking the locks, so a revocation another worker queued and committed is seen. One
    // that failed for good is queued again after a pause, not every pass.
    if tasks::binding_task_active_or_failed_since(&mut *tx, id, kinds::EXPIRE_BINDING, failed_since)
        .await?
    {
        return Ok(None);
    }
    let busy = tasks::active_operations(&mut *tx, &instance_id)
        .await?
        .iter()
        .any(|t| {
            t.binding_id.as_deref() == Some(id)
                || (t.binding_id.is_none()
                    && matches!(
                        t.operation,
                        Some(Operation::RotateCredentials | Operation::Deprovision)
                    ))
        });
    if busy {
        return Ok(None);
    }
    let mut task = tasks::NewTask::new(kinds::EXPIRE_BINDING, json!({}));
    task.instance_id = Some(instance_id);
    task.binding_id = Some(id.to_string());
    task.originating_identity =
        Some(json!({ "platform": "berth", "value": { "reason": "binding expired" } }));
    Ok(Some(task))
}
