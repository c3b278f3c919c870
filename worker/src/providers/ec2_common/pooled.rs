//! What the EC2 engines' warm pools share (docs/pools.md): the ready items the reconcile loop checks for VMs that
//! went while they waited, and the start-over of a take whose item lost its VMs.

use anyhow::Context as _;
use broker::db::{instances, instances::InstanceRow, pools};
use serde_json::Value;
use sqlx::PgPool;

use crate::{context::TaskContext, registry::TaskError};

/// The database's clock now (it stamps pool items' `ready_at`): when a reconcile pass starts.
pub async fn database_now(pool: &PgPool) -> anyhow::Result<chrono::DateTime<chrono::Utc>> {
    sqlx::query_scalar("SELECT now()")
        .fetch_one(pool)
        .await
        .context("reading the database's clock")
}

/// Ready items of `plan_ids` that were ready before `started`: their VMs ran before the pass described any region.
pub async fn ready_before(
    pool: &PgPool,
    plan_ids: &[String],
    started: chrono::DateTime<chrono::Utc>,
) -> anyhow::Result<Vec<pools::PoolItem>> {
    let items = pools::list(pool).await.context("listing pool items")?;
    Ok(items
        .into_iter()
        .filter(|i| {
            i.state == pools::READY
                && plan_ids.contains(&i.plan_id)
                && i.ready_at.is_some_and(|at| at < started)
        })
        .collect())
}

/// Marks the item for removal (its `pool.remove` tears down what is left by its tag; the pool check fills
/// another). `true` when this call did.
pub async fn remove(pool: &PgPool, item_id: &str) -> anyhow::Result<bool> {
    let mut tx = pool.begin().await?;
    let started = pools::start_remove(&mut tx, item_id).await?;
    tx.commit().await?;
    Ok(started)
}

/// A take whose item's VMs went, once its resources are torn down: the instance gets `fresh` (sealed) secrets
/// and the `reset` details (an empty EC2 state and the fall-back mark), and the row the ordinary provision then
/// makes it from.
pub async fn start_over(
    ctx: &TaskContext<'_>,
    instance: &InstanceRow,
    fresh: Vec<u8>,
    reset: Value,
) -> Result<InstanceRow, TaskError> {
    instances::set_secrets(ctx.pool, &instance.id, &fresh)
        .await
        .context("keeping the instance's new secrets")?;
    instances::merge_details(ctx.pool, &instance.id, &reset)
        .await
        .context("recording the fall-back to the ordinary provision")?;
    let mut fresh_instance = instance.clone();
    fresh_instance.secrets = Some(fresh);
    if let (Some(details), Some(reset)) =
        (fresh_instance.details.as_object_mut(), reset.as_object())
    {
        details.extend(reset.clone());
    }
    Ok(fresh_instance)
}
