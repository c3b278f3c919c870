//! The claim loop: wakes on NOTIFY (poll fallback), claims as many tasks as it has free slots in one query,
//! runs each under a lease kept alive by one heartbeat per worker, records the outcome (fenced), and sweeps
//! expired leases of dead workers back into the queue.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use broker::{config::Settings, db::tasks::TaskRow};
use chrono::{DateTime, Utc};
use sqlx::{PgPool, postgres::PgListener};
use tokio::{
    sync::{Notify, OwnedSemaphorePermit, Semaphore},
    task::JoinSet,
};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument as _, debug, error, info, warn};
use uuid::Uuid;

use crate::{
    context::{Services, TaskContext},
    queue::{self, Outcome},
    registry::{Registry, Step, TaskError},
};

/// The NOTIFY channel the tasks insert trigger uses.
pub const CHANNEL: &str = "berth_tasks";

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Unique per process: it fences every write this worker makes to a task.
    pub id: String,
    /// Tasks run at once.
    pub concurrency: usize,
    /// How long a claim holds without a heartbeat; heartbeats come every `lease / 3`.
    pub lease: Duration,
    /// Longest sleep between claims when no NOTIFY arrives.
    pub poll_interval: Duration,
    /// Backoff of Retryable failures: full jitter over `base * 2^(attempt-1)`, at most `cap`.
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
    /// On shutdown, how long running tasks may take to finish before they are handed back.
    pub shutdown_grace: Duration,
}

impl WorkerConfig {
    /// Defaults: 8 at once, 30 s lease, 1 s poll, backoff 1 s .. 5 min, 20 s grace.
    pub fn new(id: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            concurrency: 8,
            lease: Duration::from_secs(30),
            poll_interval: Duration::from_secs(1),
            backoff_base: Duration::from_secs(1),
            backoff_cap: Duration::from_secs(300),
            shutdown_grace: Duration::from_secs(20),
        }
    }

    /// From `WORKER_CONCURRENCY`, `WORKER_LEASE_SECS`, `WORKER_POLL_MS` and `WORKER_ID` (default: a
    /// fresh unique id).
    pub fn from_settings(settings: &Settings) -> Self {
        let id = settings.worker_id.clone().unwrap_or_else(default_worker_id);
        Self {
            concurrency: settings.worker_concurrency,
            lease: Duration::from_secs(settings.worker_lease_secs),
            poll_interval: Duration::from_millis(settings.worker_poll_ms),
            ..Self::new(id)
        }
    }

    fn sweep_interval(&self) -> Duration {
        (self.lease / 2).clamp(Duration::from_millis(250), Duration::from_secs(5))
    }
}

/// `<host>-<pid>-<random>`: unique per process, readable in `tasks.worker_id`.
pub fn default_worker_id() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "worker".into());
    let suffix = &Uuid::new_v4().simple().to_string()[..8];
    format!("{host}-{}-{suffix}", std::process::id())
}

struct Worker {
    pool: PgPool,
    services: Arc<Services>,
    registry: Arc<Registry>,
    config: WorkerConfig,
    /// Cancellation token per running task, cancelled when its lease is lost.
    running: Mutex<HashMap<Uuid, CancellationToken>>,
    /// Cancelled when the shutdown grace is over: running tasks are handed back.
    hard_stop: CancellationToken,
    /// Wakes the claim loop (NOTIFY, a reclaim, a task rescheduled).
    wake: Notify,
}

/// Runs a worker until `shutdown` is cancelled: stops claiming, lets running tasks finish for
/// `config.shutdown_grace`, hands back what is left, and returns.
pub async fn run(
    pool: PgPool,
    services: Arc<Services>,
    registry: Arc<Registry>,
    config: WorkerConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        config.concurrency > 0,
        "worker concurrency must be at least 1"
    );
    anyhow::ensure!(
        config.poll_interval >= Duration::from_millis(10),
        "worker poll interval must be at least 10 ms"
    );
    anyhow::ensure!(
        config.lease >= Duration::from_millis(300),
        "worker lease is too short"
    );
    let worker = Arc::new(Worker {
        pool,
        services,
        registry,
        config,
        running: Mutex::new(HashMap::new()),
        hard_stop: CancellationToken::new(),
        wake: Notify::new(),
    });
    info!(worker_id = %worker.config.id, concurrency = worker.config.concurrency, "worker started");

    let background = CancellationToken::new();
    let mut helpers = JoinSet::new();
    helpers.spawn(listen(worker.clone(), background.clone()));
    helpers.spawn(heartbeat(worker.clone(), background.clone()));
    helpers.spawn(sweep(worker.clone(), background.clone()));
    helpers.spawn(crate::reconcile::run(
        worker.pool.clone(),
        worker.services.clone(),
        background.clone(),
    ));

    let mut runs = JoinSet::new();
    claim_loop(&worker, &mut runs, &shutdown).await;

    info!(
        running = runs.len(),
        "worker stopping: no new claims, waiting for running tasks"
    );
    let drained = tokio::time::timeout(worker.config.shutdown_grace, async {
        while runs.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        warn!(
            running = runs.len(),
            "shutdown grace over: handing running tasks back to the queue"
        );
        worker.hard_stop.cancel();
        while runs.join_next().await.is_some() {}
    }
    background.cancel();
    while helpers.join_next().await.is_some() {}
    info!("worker stopped");
    Ok(())
}

/// Runs a worker until no task is pending or running (retries and waits included), then shuts it down.
/// For tests and benchmarks; fails when `limit` passes first.
pub async fn run_until_idle(
    pool: PgPool,
    services: Arc<Services>,
    registry: Arc<Registry>,
    config: WorkerConfig,
    limit: Duration,
) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let worker = tokio::spawn(run(
        pool.clone(),
        services,
        registry,
        config,
        shutdown.clone(),
    ));
    let deadline = tokio::time::Instant::now() + limit;
    let outcome = loop {
        match queue::unfinished_count(&pool).await {
            Ok(0) => break Ok(()),
            Ok(_) if tokio::time::Instant::now() >= deadline => {
                break Err(anyhow::anyhow!("tasks still unfinished after {limit:?}"));
            }
            Ok(_) => {}
            Err(e) => break Err(e.into()),
        }
        if worker.is_finished() {
            break Err(anyhow::anyhow!(
                "the worker stopped before the queue was idle"
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    shutdown.cancel();
    worker.await??;
    outcome
}

async fn claim_loop(worker: &Arc<Worker>, runs: &mut JoinSet<()>, shutdown: &CancellationToken) {
    let config = &worker.config;
    let slots = Arc::new(Semaphore::new(config.concurrency));
    // The latest run_at claimed, and when the claim last walked the index from its start.
    let mut floor: Option<DateTime<Utc>> = None;
    let mut last_full_scan = Instant::now();
    loop {
        let first = tokio::select! {
            permit = slots.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
            () = shutdown.cancelled() => return,
        };
        let mut permits = vec![first];
        while permits.len() < config.concurrency {
            match slots.clone().try_acquire_owned() {
                Ok(permit) => permits.push(permit),
                Err(_) => break,
            }
        }
        while runs.try_join_next().is_some() {}

        let wanted = permits.len();
        let claimed = match claim(worker, wanted, &mut floor, &mut last_full_scan).await {
            Ok(claimed) => claimed,
            Err(e) => {
                warn!(error = %e, "claiming tasks failed; retrying after the poll interval");
                drop(permits);
                tokio::select! {
                    () = tokio::time::sleep(config.poll_interval) => {}
                    () = shutdown.cancelled() => return,
                }
                continue;
            }
        };
        let got = claimed.len();
        for task in claimed {
            let permit = permits
                .pop()
                .expect("claimed at most as many tasks as free slots");
            runs.spawn(run_task(worker.clone(), task, permit));
        }
        drop(permits);
        if got == wanted {
            // Every slot filled: there may be more waiting. Claim again as soon as a slot frees up.
            continue;
        }

        // Nothing more is due: sleep until the next pending task is due, a NOTIFY, or the poll interval.
        let delay = match queue::next_due_in(&worker.pool).await {
            // Due now but not claimable: another worker is claiming it. Don't spin.
            Ok(Some(due)) => due.max(Duration::from_millis(5)).min(config.poll_interval),
            Ok(None) => config.poll_interval,
            Err(e) => {
                warn!(error = %e, "reading the next due task failed");
                config.poll_interval
            }
        };
        tokio::select! {
            () = worker.wake.notified() => {}
            () = tokio::time::sleep(delay) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

/// Claims up to `wanted` tasks: from `floor` on while the queue is deep, from the start of the index
/// when that finds too little or a poll interval has passed (see [`queue::claim`]).
async fn claim(
    worker: &Worker,
    wanted: usize,
    floor: &mut Option<DateTime<Utc>>,
    last_full_scan: &mut Instant,
) -> sqlx::Result<Vec<TaskRow>> {
    let config = &worker.config;
    let mut claimed = Vec::new();
    if let Some(from) = *floor
        && last_full_scan.elapsed() < config.poll_interval
    {
        claimed = queue::claim(&worker.pool, &config.id, wanted, config.lease, Some(from)).await?;
    }
    if claimed.len() < wanted {
        let more = queue::claim(
            &worker.pool,
            &config.id,
            wanted - claimed.len(),
            config.lease,
            None,
        )
        .await?;
        claimed.extend(more);
        *last_full_scan = Instant::now();
    }
    if let Some(latest) = claimed.iter().map(|t| t.run_at).max() {
        *floor = Some(floor.map_or(latest, |f| f.max(latest)));
    }
    Ok(claimed)
}

/// Runs one claimed task and records how it ended.
async fn run_task(worker: Arc<Worker>, task: TaskRow, permit: OwnedSemaphorePermit) {
    run_task_inner(&worker, task).await;
    drop(permit);
}

#[tracing::instrument(skip_all, fields(task_id = %task.id, kind = %task.kind, attempt = task.attempts))]
async fn run_task_inner(worker: &Arc<Worker>, task: TaskRow) {
    let Some(handler) = worker.registry.get(&task.kind) else {
        let error = format!(
            "unknown task kind {:?}: no handler is registered for it",
            task.kind
        );
        error!("{error}");
        record(worker, &task, Outcome::Failed { error }).await;
        return;
    };
    let cancel = worker.hard_stop.child_token();
    worker
        .running
        .lock()
        .expect("running map")
        .insert(task.id, cancel.clone());

    let task = Arc::new(task);
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
                handler.run(&ctx).await
            }
            .in_current_span(),
        )
    };
    debug!("task started");
    let result = tokio::select! {
        joined = &mut handle => Some(joined),
        () = cancel.cancelled() => None,
    };
    worker.running.lock().expect("running map").remove(&task.id);

    let outcome = match result {
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
            return;
        }
        Some(Ok(Ok(Step::Done))) => Outcome::Succeeded,
        Some(Ok(Ok(Step::Wait { after, progress }))) => Outcome::Wait { after, progress },
        Some(Ok(Err(TaskError::Fatal(e)))) => Outcome::Failed {
            error: format!("{e:#}"),
        },
        Some(Ok(Err(TaskError::Retryable(e)))) => retry_or_fail(worker, &task, format!("{e:#}")),
        Some(Err(joined)) if joined.is_panic() => {
            retry_or_fail(worker, &task, "the task panicked".into())
        }
        Some(Err(_)) => retry_or_fail(worker, &task, "the task was cancelled".into()),
    };
    match &outcome {
        Outcome::Succeeded => info!("task succeeded"),
        Outcome::Failed { error } => warn!(%error, "task failed"),
        Outcome::Retry { after, error } => info!(%error, retry_in = ?after, "task will be retried"),
        Outcome::Wait { after, progress } => debug!(%progress, wait = ?after, "task waits"),
    }
    record(worker, &task, outcome).await;
}

fn retry_or_fail(worker: &Worker, task: &TaskRow, error: String) -> Outcome {
    if task.attempts >= task.max_attempts {
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
async fn record(worker: &Worker, task: &TaskRow, outcome: Outcome) {
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

/// One heartbeat per worker: extends the leases of all its running tasks, cancels runs whose lease is gone.
async fn heartbeat(worker: Arc<Worker>, stop: CancellationToken) {
    let every = worker.config.lease / 3;
    // When leases were last known to be ours: past `lease` without a heartbeat, assume they are gone.
    let mut last_ok = Instant::now();
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = stop.cancelled() => return,
        }
        let running: Vec<(Uuid, CancellationToken)> = worker
            .running
            .lock()
            .expect("running map")
            .iter()
            .map(|(id, t)| (*id, t.clone()))
            .collect();
        if running.is_empty() {
            last_ok = Instant::now();
            continue;
        }
        let ids: Vec<Uuid> = running.iter().map(|(id, _)| *id).collect();
        match queue::heartbeat(&worker.pool, &worker.config.id, &ids, worker.config.lease).await {
            Ok(kept) => {
                last_ok = Instant::now();
                for (id, token) in running {
                    // A run that finished meanwhile is no longer in the map; cancelling its token is harmless.
                    if !kept.contains(&id)
                        && worker
                            .running
                            .lock()
                            .expect("running map")
                            .contains_key(&id)
                    {
                        warn!(task_id = %id, "lease lost; stopping the run");
                        token.cancel();
                    }
                }
            }
            Err(e) if last_ok.elapsed() >= worker.config.lease => {
                // Another worker may be running these by now: stop ours rather than run them twice.
                warn!(error = %e, running = running.len(), "no heartbeat for a whole lease; stopping every run");
                for (_, token) in running {
                    token.cancel();
                }
            }
            Err(e) => warn!(error = %e, "heartbeat failed; leases may expire"),
        }
    }
}

/// Every few seconds: hand tasks of dead workers (expired leases) back to the queue.
async fn sweep(worker: Arc<Worker>, stop: CancellationToken) {
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
async fn listen(worker: Arc<Worker>, stop: CancellationToken) {
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
