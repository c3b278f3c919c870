//! The reconcile loop: every `RECONCILE_INTERVAL_MS`, each provider looks after its instances (the `local`
//! engine restarts servers that stopped), and instances whose `expiration_date` has passed get their
//! deprovision enqueued, once; expired bindings get their revocation enqueued ([`crate::binding_expiry`]). Safe with any number of workers: providers lock per instance, and the expiry
//! check runs under the instance row's lock.

use std::{sync::Arc, time::Duration};

use anyhow::Context as _;
use broker::{
    db::{instances, tasks},
    model::Operation,
};
use chrono::{DateTime, NaiveDate, Utc};
use serde_json::json;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::context::Services;

/// Runs until `stop` is cancelled.
pub async fn run(pool: PgPool, services: Arc<Services>, stop: CancellationToken) {
    let every = Duration::from_millis(services.settings.reconcile_interval_ms.max(100));
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = stop.cancelled() => return,
        }
        tokio::select! {
            () = once(&pool, &services) => {}
            () = stop.cancelled() => return,
        }
    }
}

/// One pass: expiries (instances, then bindings), then every provider's own reconcile.
pub async fn once(pool: &PgPool, services: &Services) {
    if let Err(e) = expire(pool).await {
        warn!(error = %format!("{e:#}"), "checking instance expiration dates failed");
    }
    if let Err(e) = crate::binding_expiry::enqueue_revocations(pool).await {
        warn!(error = %format!("{e:#}"), "queueing the revocation of expired bindings failed");
    }
    for (engine, provider) in services.providers() {
        if let Err(e) = provider.reconcile(pool, services).await {
            warn!(engine, error = %format!("{e:#}"), "reconciling failed; trying again next cycle");
        }
    }
}

/// `expiration_date` as a moment: RFC 3339, or a date meaning midnight UTC.
pub fn parse_expiration(text: &str) -> Option<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Some(t.with_timezone(&Utc));
    }
    if let Ok(t) = DateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%:z") {
        return Some(t.with_timezone(&Utc));
    }
    let date = NaiveDate::parse_from_str(text, "%Y-%m-%d").ok()?;
    Some(date.and_hms_opt(0, 0, 0)?.and_utc())
}

/// Enqueues the deprovision of every instance past its `expiration_date`, once (details
/// `expiry_deprovision_at` records it). An instance busy with another operation is taken next cycle.
async fn expire(pool: &PgPool) -> anyhow::Result<()> {
    let now = Utc::now();
    for (id, text) in instances::list_expiring(pool)
        .await
        .context("listing instances with an expiration date")?
    {
        let Some(at) = parse_expiration(&text) else {
            continue;
        };
        if at > now {
            continue;
        }
        let mut tx = pool.begin().await?;
        let Some(row) = instances::get_for_update(&mut *tx, &id).await? else {
            continue;
        };
        if row.details.get("expiry_deprovision_at").is_some() {
            continue;
        }
        let active = tasks::active_operations(&mut *tx, &id).await?;
        let deprovisioning = active
            .iter()
            .any(|t| t.binding_id.is_none() && t.operation == Some(Operation::Deprovision));
        if !active.is_empty() && !deprovisioning {
            continue;
        }
        if !deprovisioning {
            let mut task = tasks::NewTask::new(Operation::Deprovision.task_kind(), json!({}));
            task.operation = Some(Operation::Deprovision);
            task.instance_id = Some(id.clone());
            task.originating_identity =
                Some(json!({ "platform": "berth", "value": { "reason": "expiration_date" } }));
            tasks::enqueue(&mut *tx, task).await?;
        }
        instances::merge_details(&mut *tx, &id, &json!({ "expiry_deprovision_at": now })).await?;
        tx.commit().await?;
        info!(instance_id = %id, expiration_date = %text, "the instance expired; deprovision enqueued");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiration_dates_parse() {
        assert_eq!(
            parse_expiration("2030-01-31").unwrap().to_rfc3339(),
            "2030-01-31T00:00:00+00:00"
        );
        assert_eq!(
            parse_expiration("2030-01-31T18:00:00+02:00")
                .unwrap()
                .to_rfc3339(),
            "2030-01-31T16:00:00+00:00"
        );
        assert!(parse_expiration("soon").is_none());
    }
}
