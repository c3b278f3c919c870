//! What `/metrics` reads from the broker's database at scrape time: the queue (only its pending and running rows),
//! the instances per plan and the webhook deliveries not yet delivered.

use sqlx::PgExecutor;

/// Unfinished tasks of one kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueDepth {
    pub kind: String,
    /// Pending, due now or later.
    pub pending: i64,
    /// Pending and due now.
    pub due: i64,
    pub running: i64,
    /// Running under a lease that has run out (its worker is gone; the sweep hands it back).
    pub expired: i64,
}

pub async fn queue_depth(db: impl PgExecutor<'_>) -> sqlx::Result<Vec<QueueDepth>> {
    sqlx::query_as!(
        QueueDepth,
        r#"SELECT kind AS "kind!", sum(pending)::int8 AS "pending!", sum(due)::int8 AS "due!",
                  sum(running)::int8 AS "running!", sum(expired)::int8 AS "expired!"
           FROM (
               SELECT kind, count(*) AS pending, count(*) FILTER (WHERE run_at <= now()) AS due,
                      0::int8 AS running, 0::int8 AS expired
               FROM tasks WHERE state = 'pending' GROUP BY kind
               UNION ALL
               SELECT kind, 0, 0, count(*), count(*) FILTER (WHERE lease_until < now())
               FROM tasks WHERE state = 'running' GROUP BY kind
           ) q
           GROUP BY kind ORDER BY kind"#
    )
    .fetch_all(db)
    .await
}

/// Seconds the longest-waiting due task has waited (0 with none due).
pub async fn oldest_due_secs(db: impl PgExecutor<'_>) -> sqlx::Result<f64> {
    sqlx::query_scalar!(
        r#"SELECT coalesce(extract(epoch FROM now() - min(run_at))::float8, 0) AS "secs!"
           FROM tasks WHERE state = 'pending' AND run_at <= now()"#
    )
    .fetch_one(db)
    .await
}

/// (plan_id, instances) for every plan with instances.
pub async fn instances_per_plan(db: impl PgExecutor<'_>) -> sqlx::Result<Vec<(String, i64)>> {
    let rows = sqlx::query!(
        r#"SELECT plan_id, count(*) AS "count!" FROM service_instances GROUP BY plan_id ORDER BY plan_id"#
    )
    .fetch_all(db)
    .await?;
    Ok(rows.into_iter().map(|r| (r.plan_id, r.count)).collect())
}

/// (state, deliveries) for webhook deliveries still pending or given up on.
pub async fn undelivered_webhooks(db: impl PgExecutor<'_>) -> sqlx::Result<Vec<(String, i64)>> {
    let rows = sqlx::query!(
        r#"SELECT state, count(*) AS "count!" FROM webhook_deliveries
           WHERE state <> 'delivered' GROUP BY state ORDER BY state"#
    )
    .fetch_all(db)
    .await?;
    Ok(rows.into_iter().map(|r| (r.state, r.count)).collect())
}
