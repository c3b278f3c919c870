//! The worker's two background loops besides the claims: the sweep that hands expired leases back to the
//! queue, and the LISTEN that wakes the claim loop.

use std::{sync::Arc, time::Duration};

use sqlx::postgres::PgListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{CHANNEL, Worker};
use crate::queue;

/// Every few seconds: hand tasks of dead workers (expired leases) back to the queue.
pub(super) async fn sweep(worker: Arc<Worker>, stop: CancellationToken) {
    let every = worker.config.sweep_interval();
    loop {
        match queue::reclaim_expired(&worker.pool).await {
            Ok(0) => {}
            Ok(n) => {
                info!(
                    reclaimed = n,
                    "tasks of a lost worker are back in the queue"
                );
                worker.wake.notify_one();
            }
            Err(e) => warn!(error = %e, "reclaiming expired leases failed"),
        }
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = stop.cancelled() => return,
        }
    }
}

/// LISTEN on the tasks channel; every NOTIFY (and every reconnect) wakes the claim loop.
pub(super) async fn listen(worker: Arc<Worker>, stop: CancellationToken) {
    loop {
        let connected = async {
            let mut listener = PgListener::connect_with(&worker.pool).await?;
            listener.listen(CHANNEL).await?;
            Ok::<_, sqlx::Error>(listener)
        };
        let mut listener = tokio::select! {
            result = connected => match result {
                Ok(listener) => listener,
                Err(e) => {
                    warn!(error = %e, "LISTEN failed; polling until it reconnects");
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        () = stop.cancelled() => return,
                    }
                }
            },
            () = stop.cancelled() => return,
        };
        // Anything inserted while we were not listening is found by this claim.
        worker.wake.notify_one();
        loop {
            tokio::select! {
                received = listener.try_recv() => match received {
                    Ok(Some(_)) => worker.wake.notify_one(),
                    Ok(None) => {
                        warn!("LISTEN connection lost; reconnecting");
                        worker.wake.notify_one();
                    }
                    Err(e) => {
                        warn!(error = %e, "LISTEN failed; reconnecting");
                        worker.wake.notify_one();
                        break;
                    }
                },
                () = stop.cancelled() => return,
            }
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
            () = stop.cancelled() => return,
        }
    }
}
