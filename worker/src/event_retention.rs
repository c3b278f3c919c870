//! Prunes the audit trail (`instance_events`): an instance that is gone keeps its events for
//! `EVENT_RETENTION_DAYS` after its last one, then they are deleted. Hourly, from every worker (the delete is
//! idempotent, so several workers doing it is only repeated work).

use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

const EVERY: Duration = Duration::from_secs(3600);

/// Runs until `stop` is cancelled: a prune at start, then one an hour.
pub async fn run(pool: PgPool, retention_days: u64, stop: CancellationToken) {
    loop {
        tokio::select! {
            result = broker::db::events::prune(&pool, retention_days) => match result {
                Ok(0) => {}
                Ok(n) => info!(deleted = n, retention_days, "pruned the audit events of instances gone"),
                Err(e) => warn!(error = %e, "pruning audit events failed"),
            },
            () = stop.cancelled() => return,
        }
        tokio::select! {
            () = tokio::time::sleep(EVERY) => {}
            () = stop.cancelled() => return,
        }
    }
}
