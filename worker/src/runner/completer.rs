//! The per-worker completer: writes plain successes and failures (no webhook owed, nothing else to write in
//! the same transaction) in batches, one statement and one commit per batch instead of one per task.
//!
//! Group commit, no timer: the completer takes whatever has finished (up to [`BATCH`]) and writes it; what
//! finishes meanwhile forms the next batch. An idle worker writes a lone outcome at once; a busy one writes
//! hundreds per commit.
//!
//! A run's slot is freed as soon as its outcome is handed over, but the claim stays in the worker's
//! heartbeat set (so its lease is kept alive) until the batch holding it has committed. Each row of the
//! batch is fenced as [`queue::finish`] fences one (worker id, state `running`, the claim's attempt): a
//! claim lost meanwhile (lease expired and the task reclaimed, maybe running elsewhere) is left untouched.
//! A crash before the batch commits leaves the task `running` under a lease nobody renews: it is reclaimed
//! and runs again (at-least-once, as before; handlers are idempotent).

use std::{collections::HashSet, sync::Arc, time::Duration};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, warn};
use uuid::Uuid;

use super::Worker;
use crate::queue::{self, Finished};

/// Most outcomes written by one statement.
pub(super) const BATCH: usize = 1000;
/// Outcomes waiting for the completer; a run hands over its outcome (and frees its slot) once there is room.
pub(super) const QUEUE: usize = 2 * BATCH;

/// Writes what arrives on `finished` until `stop` is cancelled and everything sent before has been written.
/// `stop` must only be cancelled once no run can send any more.
pub(super) async fn run(
    worker: Arc<Worker>,
    mut finished: mpsc::Receiver<Finished>,
    stop: CancellationToken,
) {
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        let first = tokio::select! {
            biased;
            next = finished.recv() => next,
            () = stop.cancelled() => {
                finished.close();
                finished.recv().await
            }
        };
        let Some(first) = first else {
            return;
        };
        batch.push(first);
        while batch.len() < BATCH {
            match finished.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        write(&worker, &batch).await;
        batch.clear();
    }
}

/// Writes one batch (a few quick retries ride out a blip; after that the leases expire and the tasks run
/// again), then takes its claims out of the heartbeat set.
async fn write(worker: &Worker, batch: &[Finished]) {
    for attempt in 1..=3u64 {
        match queue::finish_batch(&worker.pool, &worker.config.id, batch).await {
            Ok(recorded) => {
                debug!(
                    batch = batch.len(),
                    recorded = recorded.len(),
                    "outcomes recorded"
                );
                if recorded.len() < batch.len() {
                    let recorded: HashSet<Uuid> = recorded.into_iter().collect();
                    for lost in batch.iter().filter(|f| !recorded.contains(&f.id)) {
                        warn!(
                            task_id = %lost.id,
                            attempt = lost.attempts,
                            "the task's lease was lost before its outcome was recorded; outcome discarded"
                        );
                    }
                }
                break;
            }
            Err(e) if attempt < 3 => {
                warn!(error = %e, batch = batch.len(), "recording a batch of outcomes failed; trying again");
                tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
            }
            Err(e) => {
                error!(
                    error = %e,
                    batch = batch.len(),
                    "recording a batch of outcomes failed; their leases will expire and they will run again"
                );
            }
        }
    }
    let mut held = worker.held.lock().expect("heartbeat set");
    for f in batch {
        if held.get(&f.id).is_some_and(|h| h.attempts == f.attempts) {
            held.remove(&f.id);
        }
    }
}
