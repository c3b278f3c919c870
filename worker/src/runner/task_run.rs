//! One claimed task: its handler run under the lease (the heartbeat keeps every held lease alive), the step's
//! result turned into an outcome (a bug or a panic fails at once), and the outcome recorded.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use broker::db::tasks::TaskRow;
use broker::telemetry::names;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument as _, Span, debug, error, field, info, warn};
use uuid::Uuid;

use super::Worker;
use crate::{
    context::TaskContext,
    queue::{self, Finished, Outcome},
    registry::{Step, TaskError},
};

/// Runs one claimed task and hands its outcome on. The slot is freed when the outcome is handed to the
/// completer (plain success or failure) or written (everything else); the claim stays in the heartbeat set
/// until its outcome is durable.
/// Its span carries the task's id, kind, instance, binding, attempt and the request that wrote it, and, once
/// known, the run's outcome.
#[tracing::instrument(
    name = "task",
    skip_all,
    fields(
        task_id = %task.id,
        kind = %task.kind,
        instance_id = task.instance_id.as_deref(),
        binding_id = task.binding_id.as_deref(),
        attempt = task.attempts,
        request_id = task.request_id.as_deref(),
        outcome = field::Empty,
    )
)]
pub(super) async fn run_task(
    worker: Arc<Worker>,
    task: TaskRow,
    cancel: CancellationToken,
    permit: OwnedSemaphorePermit,
) {
    let task = Arc::new(task);
    let started = Instant::now();
    let Some(outcome) = run_handler(&worker, task.clone(), cancel).await else {
        observe_run(&task, "stopped", started.elapsed());
        worker.forget(task.id, task.attempts);
        drop(permit);
        return;
    };
    observe_run(&task, outcome.label(), started.elapsed());
    if matches!(outcome, Outcome::Retry { .. }) {
        metrics::counter!(names::TASK_RETRIES, "kind" => task.kind.clone()).increment(1);
    }
    match &outcome {
        Outcome::Succeeded => info!("task succeeded"),
        Outcome::Failed { error } => warn!(%error, "task failed"),
        Outcome::Retry { after, error } => info!(%error, retry_in = ?after, "task will be retried"),
        Outcome::Wait { after, progress } => debug!(%progress, wait = ?after, "task waits"),
    }
    let batched = match &outcome {
        Outcome::Succeeded if !queue::owes_webhook(&task) => Some(None),
        Outcome::Failed { error } if !queue::owes_webhook(&task) => Some(Some(error.clone())),
        _ => None,
    };
    if let Some(error) = batched {
        if let Some(held) = worker
            .held
            .lock()
            .expect("heartbeat set")
            .get_mut(&task.id)
            .filter(|h| h.attempts == task.attempts)
        {
            held.finished = true;
        }
        let finished = Finished {
            id: task.id,
            attempts: task.attempts,
            error,
        };
        if worker.completions.send(finished).await.is_ok() {
            // The completer writes it and takes it out of the heartbeat set.
            drop(permit);
            return;
        }
        // The completer is gone (it only stops after every run): write it here.
    }
    record(&worker, &task, outcome).await;
    worker.forget(task.id, task.attempts);
    drop(permit);
}

/// The run's outcome on its span and in the task duration histogram.
fn observe_run(task: &TaskRow, outcome: &'static str, took: Duration) {
    Span::current().record("outcome", outcome);
    metrics::histogram!(names::TASK_DURATION, "kind" => task.kind.clone(), "outcome" => outcome)
        .record(took.as_secs_f64());
}

/// Runs the handler; `None` when the run was stopped (lease lost, or handed back at the end of the grace).
pub(super) async fn run_handler(
    worker: &Arc<Worker>,
    task: Arc<TaskRow>,
    cancel: CancellationToken,
) -> Option<Outcome> {
    let Some(handler) = worker.registry.get(&task.kind) else {
        let error = format!(
            "unknown task kind {:?}: no handler is registered for it",
            task.kind
        );
        error!("{error}");
        return Some(Outcome::Failed { error });
    };
    let started = Instant::now();
    let mut handle = {
        let (task, pool, services, cancel) = (
            task.clone(),
            worker.pool.clone(),
            worker.services.clone(),
            cancel.clone(),
        );
        let worker_id = worker.config.id.clone();
        tokio::spawn(
            async move {
                let ctx = TaskContext {
                    task: &task,
                    pool: &pool,
                    services: &services,
                    cancel,
                    worker_id: &worker_id,
                };
                // Tasks the handler enqueues carry the same request id.
                match task.request_id.clone() {
                    Some(id) => broker::request_context::scope(id, handler.run(&ctx)).await,
                    None => handler.run(&ctx).await,
                }
            }
            .in_current_span(),
        )
    };
    debug!("task started");
    let result = tokio::select! {
        joined = &mut handle => Some(joined),
        () = cancel.cancelled() => None,
    };
    worker.record_run_time(started.elapsed());

    Some(match result {
        None => {
            handle.abort();
            let _ = handle.await;
            if worker.hard_stop.is_cancelled() {
                match queue::release(&worker.pool, &task, &worker.config.id).await {
                    Ok(true) => info!("task handed back to the queue"),
                    Ok(false) => {}
                    Err(e) => {
                        warn!(error = %e, "handing the task back failed; its lease will expire")
                    }
                }
                worker.wake.notify_one();
            } else {
                warn!("lease lost: the task was stopped here and may run on another worker");
            }
            return None;
        }
        Some(Ok(Ok(Step::Done))) => Outcome::Succeeded,
        Some(Ok(Ok(Step::Wait { after, progress }))) => Outcome::Wait { after, progress },
        Some(Ok(Err(TaskError::Fatal(e)))) => Outcome::Failed {
            error: format!("{e:#}"),
        },
        Some(Ok(Err(TaskError::Retryable(e)))) => retry_or_fail(worker, &task, format!("{e:#}")),
        // A panic is a bug: running the same step again would panic again.
        Some(Err(joined)) if joined.is_panic() => Outcome::Failed {
            error: format!(
                "a bug in berth (the task panicked: {}); please report it",
                panic_message(joined.into_panic())
            ),
        },
        Some(Err(_)) => retry_or_fail(worker, &task, "the task was cancelled".into()),
    })
}

/// The panic's message when it is a literal (`panic!("…")`, `expect("…")`); a formatted one (an `unwrap` on an
/// error, say) may carry a value such as a connection string, and the task's error is shown to platforms.
pub(super) fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    payload.downcast_ref::<&'static str>().map_or_else(
        || "its message is not recorded: it may hold a secret".to_owned(),
        |text| (*text).to_owned(),
    )
}

pub(super) fn retry_or_fail(worker: &Worker, task: &TaskRow, error: String) -> Outcome {
    if task.attempts_spent() >= task.max_attempts {
        Outcome::Failed { error }
    } else {
        let after = queue::backoff(
            task.attempts,
            worker.config.backoff_base,
            worker.config.backoff_cap,
        );
        Outcome::Retry { after, error }
    }
}

/// Writes the outcome; a few quick retries ride out a blip, after that the lease expiry takes over.
pub(super) async fn record(worker: &Worker, task: &TaskRow, outcome: Outcome) {
    let rescheduled = matches!(outcome, Outcome::Retry { .. } | Outcome::Wait { .. });
    for attempt in 1..=3 {
        match queue::finish(&worker.pool, task, &worker.config.id, &outcome).await {
            Ok(true) => {
                if rescheduled {
                    worker.wake.notify_one();
                }
                return;
            }
            Ok(false) => {
                warn!(
                    "the task's lease was lost before its outcome was recorded; outcome discarded"
                );
                return;
            }
            Err(e) if attempt < 3 => {
                warn!(error = %e, "recording the task's outcome failed; trying again");
                tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
            }
            Err(e) => {
                error!(error = %e, "recording the task's outcome failed; its lease will expire and it will run again")
            }
        }
    }
}

/// One heartbeat per worker: extends the leases of every claim it holds (buffered, running, or waiting for
/// its outcome's batch), cancels the runs whose lease is gone.
pub(super) async fn heartbeat(worker: Arc<Worker>, stop: CancellationToken) {
    let every = worker.config.lease / 3;
    // When leases were last known to be ours: past `lease` without a heartbeat, assume they are gone.
    let mut last_ok = Instant::now();
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = stop.cancelled() => return,
        }
        let ids: Vec<Uuid> = worker
            .held
            .lock()
            .expect("heartbeat set")
            .keys()
            .copied()
            .collect();
        if ids.is_empty() {
            last_ok = Instant::now();
            continue;
        }
        match queue::heartbeat(&worker.pool, &worker.config.id, &ids, worker.config.lease).await {
            Ok(kept) => {
                last_ok = Instant::now();
                let kept: std::collections::HashSet<Uuid> = kept.into_iter().collect();
                let held = worker.held.lock().expect("heartbeat set");
                for id in ids.iter().filter(|id| !kept.contains(id)) {
                    // A claim that ended meanwhile is no longer held; one whose outcome waits for its batch
                    // has nothing left to stop (the batch's fence discards it).
                    if let Some(h) = held.get(id).filter(|h| !h.finished) {
                        warn!(task_id = %id, "lease lost; stopping the run");
                        h.cancel.cancel();
                    }
                }
            }
            Err(e) if last_ok.elapsed() >= worker.config.lease => {
                // Another worker may be running these by now: stop ours rather than run them twice.
                warn!(error = %e, held = ids.len(), "no heartbeat for a whole lease; stopping every run");
                for h in worker.held.lock().expect("heartbeat set").values() {
                    h.cancel.cancel();
                }
            }
            Err(e) => warn!(error = %e, "heartbeat failed; leases may expire"),
        }
    }
}
