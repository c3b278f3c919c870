//! `webhook_deliveries`: one row per webhook call owed; a `webhook.deliver` task carries it out.

use serde_json::Value;
use sqlx::PgExecutor;
use uuid::Uuid;

text_enum! {
    /// Where a webhook delivery is. Stored as text in `webhook_deliveries.state`.
    pub enum DeliveryState ("webhook delivery state") {
        /// Not delivered yet; the next attempt is due.
        Pending = "pending",
        Delivered = "delivered",
        /// Every attempt failed.
        Failed = "failed",
    }
}

/// A row of `webhook_deliveries`, read with a runtime query so that `state` is checked as it is decoded.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DeliveryRow {
    pub id: Uuid,
    pub task_id: Uuid,
    pub url: String,
    pub secret: Vec<u8>,
    pub body: Value,
    pub state: DeliveryState,
    pub attempts: i32,
    pub last_status: Option<i32>,
    pub last_error: Option<String>,
}

pub async fn insert(
    db: impl PgExecutor<'_>,
    id: Uuid,
    task_id: Uuid,
    url: &str,
    sealed_secret: &[u8],
    body: &Value,
) -> sqlx::Result<()> {
    sqlx::query!(
        "INSERT INTO webhook_deliveries (id, task_id, url, secret, body) VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (id) DO NOTHING",
        id,
        task_id,
        url,
        sealed_secret,
        body,
    )
    .execute(db)
    .await?;
    Ok(())
}

pub async fn get(db: impl PgExecutor<'_>, id: Uuid) -> sqlx::Result<Option<DeliveryRow>> {
    sqlx::query_as(
        "SELECT id, task_id, url, secret, body, state, attempts, last_status, last_error
         FROM webhook_deliveries WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(db)
    .await
}

/// Records one attempt; `state` is `Pending` when it will be retried.
pub async fn record_attempt(
    db: impl PgExecutor<'_>,
    id: Uuid,
    state: DeliveryState,
    status: Option<i32>,
    error: Option<&str>,
) -> sqlx::Result<()> {
    sqlx::query!(
        "UPDATE webhook_deliveries
         SET attempts = attempts + 1, state = $2, last_status = $3, last_error = $4,
             delivered_at = CASE WHEN $2 = 'delivered' THEN now() ELSE delivered_at END
         WHERE id = $1",
        id,
        state.as_str(),
        status,
        error,
    )
    .execute(db)
    .await?;
    Ok(())
}
