//! The claim loop: wakes on NOTIFY (poll fallback), claims due tasks in batches (the free slots plus, when tasks
//! run much faster than a claim round trip, a small local buffer), runs each under a lease kept alive by one
//! heartbeat per worker ([`task_run`]), records the outcome (fenced; plain successes and failures in batches,
//! see [`completer`]), and sweeps expired leases of dead workers back into the queue ([`background`]).

mod background;
mod completer;
mod task_run;

use background::{listen, sweep};
use task_run::{heartbeat, run_task};

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use broker::{config::Settings, db::tasks::TaskRow, telemetry::names};
use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tokio::{
    sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc},
    task::{JoinHandle, JoinSet},
};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};
use uuid::Uuid;

use crate::{
    context::Services,
    queue::{self, Finished},
    registry::Registry,
};

/// The NOTIFY channel the tasks insert trigger uses.
pub const CHANNEL: &str = "berth_tasks";

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Unique per process: it fences every write this worker makes to a task.
    pub id: String,
    /// Tasks run at once.
    pub concurrency: usize,
    /// At most this many claimed tasks wait in a local buffer for a free slot. The buffer is sized to what
    /// the slots get through during two claim round trips (measured), so a buffered task waits about that
    /// long and tasks slower than a claim (any real provisioning) are not buffered at all: nothing is held
    /// back from other workers. Buffered tasks are leased and heartbeated like running ones and handed back
    /// on shutdown.
    pub prefetch: usize,
    /// How long a claim holds without a heartbeat; heartbeats come every `lease / 3`.
    pub lease: Duration,
    /// Longest sleep between claims when no NOTIFY arrives.
    pub poll_interval: Duration,
    /// Backoff of Retryable failures: full jitter over `base * 2^(attempt-1)`, at most `cap`.
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
    /// On shutdown, how long running tasks may take to finish before they are handed back.
    pub shutdown_grace: Duration,
    /// Where the claim loop notes that it went round, for `/health` ([`crate::http`]).
    pub liveness: Arc<Liveness>,
}

/// When the claim loop last went round (it does at least once per poll interval, busy or idle).
#[derive(Debug)]
pub struct Liveness {
    started: Instant,
    /// Milliseconds after `started`.
    last_round_ms: AtomicU64,
}

impl Default for Liveness {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            last_round_ms: AtomicU64::new(0),
        }
    }
}

impl Liveness {
    fn beat(&self) {
        let now = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_round_ms.store(now, Ordering::Relaxed);
    }

    /// How long ago the claim loop last went round (since start, before its first round).
    pub fn age(&self) -> Duration {
        let last = Duration::from_millis(self.last_round_ms.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(last)
    }
}

impl WorkerConfig {
    /// Defaults: 8 at once, up to 1024 buffered, 30 s lease, 1 s poll, backoff 1 s .. 5 min, 20 s grace.
    pub fn new(id: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            concurrency: 8,
            prefetch: 1024,
            lease: Duration::from_secs(30),
            poll_interval: Duration::from_secs(1),
            backoff_base: Duration::from_secs(1),
            backoff_cap: Duration::from_secs(300),
            shutdown_grace: Duration::from_secs(20),
            liveness: Arc::default(),
        }
    }

    /// From `WORKER_CONCURRENCY`, `WORKER_PREFETCH`, `WORKER_LEASE_SECS`, `WORKER_POLL_MS` and `WORKER_ID`
    /// (default: a fresh unique id).
    pub fn from_settings(settings: &Settings) -> Self {
        let id = settings.worker_id.clone().unwrap_or_else(default_worker_id);
        Self {
            concurrency: settings.worker_concurrency,
            prefetch: settings.worker_prefetch,
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
    /// The heartbeat set: every claim this worker holds (buffered, running, or finished but not yet
    /// recorded), keyed by task id. The heartbeat extends all their leases.
    held: Mutex<HashMap<Uuid, Held>>,
    /// Cancelled when the shutdown grace is over: running tasks are handed back.
    hard_stop: CancellationToken,
    /// Wakes the claim loop (NOTIFY, a reclaim, a task rescheduled).
    wake: Notify,
    /// Plain successes and failures on their way to the batched write ([`completer`]).
    completions: mpsc::Sender<Finished>,
    /// Average run time of a task in microseconds (moving average; `u64::MAX` before the first).
    run_micros: AtomicU64,
}

/// One claim in the heartbeat set.
struct Held {
    /// The claim's attempt: a later claim of the same task is another entry.
    attempts: i32,
    /// Cancelled when the lease is lost (or the shutdown grace is over).
    cancel: CancellationToken,
    /// The run is over and its outcome waits for the completer's batch.
    finished: bool,
}

impl Worker {
    /// Drops a claim from the heartbeat set (only that attempt's).
    fn forget(&self, id: Uuid, attempts: i32) {
        let mut held = self.held.lock().expect("heartbeat set");
        if held.get(&id).is_some_and(|h| h.attempts == attempts) {
            held.remove(&id);
        }
    }

    /// How many claimed tasks to keep buffered beyond the slots: what the slots get through during two
    /// claim round trips (Little's law), at most `config.prefetch`. Zero for tasks slower than a claim.
    fn prefetch_target(&self, claim_micros: Option<f64>) -> usize {
        let run = self.run_micros.load(Ordering::Relaxed);
        let (Some(claim), false) = (claim_micros, run == u64::MAX) else {
            return 0;
        };
        let slots = self.config.concurrency as f64;
        let target = 2.0 * slots * claim / run.max(1) as f64;
        (target.floor() as usize).min(self.config.prefetch)
    }

    fn record_run_time(&self, took: Duration) {
        let sample = u64::try_from(took.as_micros()).unwrap_or(u64::MAX - 1);
        let previous = self.run_micros.load(Ordering::Relaxed);
        let next = if previous == u64::MAX {
            sample
        } else {
            // Races between runs lose a sample now and then: harmless for an estimate.
            previous - previous / 8 + sample / 8
        };
        self.run_micros.store(next, Ordering::Relaxed);
    }
}

/// Runs a worker until `shutdown` is cancelled: stops claiming (buffered tasks go back to the queue), lets
/// running tasks finish for `config.shutdown_grace`, hands back what is left, writes the outcomes still
/// waiting for a batch, and returns.
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
    let (completions, finished) = mpsc::channel(completer::QUEUE);
    let worker = Arc::new(Worker {
        pool,
        services,
        registry,
        config,
        held: Mutex::new(HashMap::new()),
        hard_stop: CancellationToken::new(),
        wake: Notify::new(),
        completions,
        run_micros: AtomicU64::new(u64::MAX),
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
    helpers.spawn(crate::event_retention::run(
        worker.pool.clone(),
        worker.services.settings.event_retention_days,
        background.clone(),
    ));
    helpers.spawn(crate::backup_scheduler::run(
        worker.pool.clone(),
        worker.services.clone(),
        background.clone(),
    ));
    helpers.spawn(crate::pools::run(
        worker.pool.clone(),
        worker.services.clone(),
        background.clone(),
    ));
    let completer_stop = CancellationToken::new();
    let completer = tokio::spawn(completer::run(
        worker.clone(),
        finished,
        completer_stop.clone(),
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
    // Every run is over: write the outcomes still waiting for a batch (the heartbeat keeps their leases
    // until then).
    completer_stop.cancel();
    if let Err(e) = completer.await {
        error!(error = %e, "the completer stopped abnormally; unrecorded outcomes will run again after their lease");
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

/// Where the next claim starts its walk of the pending index (see [`queue::claim`]).
#[derive(Debug, Clone, Copy)]
struct Scan {
    /// The latest run_at claimed.
    floor: Option<DateTime<Utc>>,
    /// When a claim last walked the index from its start.
    last_full: Instant,
}

/// What one claim round trip brought.
struct Claimed {
    tasks: Vec<TaskRow>,
    scan: Scan,
    took: Duration,
    /// Fewer than asked for: nothing more is due now. Sleep this long unless woken.
    idle_for: Option<Duration>,
}

async fn claim_loop(worker: &Arc<Worker>, runs: &mut JoinSet<()>, shutdown: &CancellationToken) {
    let config = &worker.config;
    let slots = Arc::new(Semaphore::new(config.concurrency));
    // Claimed tasks waiting for a slot (in the heartbeat set already).
    let mut buffer: VecDeque<TaskRow> = VecDeque::new();
    let mut scan = Scan {
        floor: None,
        last_full: Instant::now(),
    };
    // At most one claim in flight; it runs while the slots work through what is here.
    let mut claiming: Option<JoinHandle<sqlx::Result<Claimed>>> = None;
    let mut idle_until: Option<tokio::time::Instant> = None;
    // Moving average of a claim's round trip, in microseconds.
    let mut claim_micros: Option<f64> = None;
    // Goes round at least this often, also while every slot is busy, so `/health` sees the loop alive.
    let mut alive = tokio::time::interval(config.poll_interval);
    alive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        config.liveness.beat();
        while !buffer.is_empty() {
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                break;
            };
            let task = buffer.pop_front().expect("not empty");
            start(worker, runs, task, permit);
        }
        while runs.try_join_next().is_some() {}

        if claiming.is_none() && idle_until.is_none() {
            let free = slots.available_permits();
            let busy = config.concurrency - free;
            let capacity = config.concurrency + worker.prefetch_target(claim_micros);
            let wanted = capacity.saturating_sub(busy + buffer.len());
            // Claim for a starving slot at once; otherwise wait until half the capacity is free, so the
            // claims stay large.
            if wanted > 0 && ((buffer.is_empty() && free > 0) || wanted * 2 >= capacity) {
                claiming = Some(tokio::spawn(claim(worker.clone(), wanted, scan)));
            }
        }

        let idle_deadline = idle_until.unwrap_or_else(tokio::time::Instant::now);
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            joined = async {
                match claiming.as_mut() {
                    Some(handle) => handle.await,
                    None => std::future::pending().await,
                }
            } => {
                claiming = None;
                match joined.expect("a claim does not panic") {
                    Ok(claimed) => {
                        scan = claimed.scan;
                        let micros = claimed.took.as_micros() as f64;
                        claim_micros = Some(claim_micros.map_or(micros, |m| m * 0.875 + micros * 0.125));
                        hold(worker, &claimed.tasks);
                        buffer.extend(claimed.tasks);
                        idle_until = claimed.idle_for.map(|d| tokio::time::Instant::now() + d);
                    }
                    Err(e) => {
                        warn!(error = %e, "claiming tasks failed; retrying after the poll interval");
                        idle_until = Some(tokio::time::Instant::now() + config.poll_interval);
                    }
                }
            }
            permit = slots.clone().acquire_owned(), if !buffer.is_empty() => {
                let task = buffer.pop_front().expect("not empty");
                start(worker, runs, task, permit.expect("the semaphore is never closed"));
            }
            Some(_) = runs.join_next(), if !runs.is_empty() => {}
            () = worker.wake.notified(), if idle_until.is_some() => idle_until = None,
            () = tokio::time::sleep_until(idle_deadline), if idle_until.is_some() => idle_until = None,
            _ = alive.tick() => {}
        }
    }

    // Stopping: what was claimed but not started goes back to the queue now, for other workers.
    if let Some(handle) = claiming
        && let Ok(Ok(claimed)) = handle.await
    {
        hold(worker, &claimed.tasks);
        buffer.extend(claimed.tasks);
    }
    if !buffer.is_empty() {
        let claims: Vec<(Uuid, i32)> = buffer.iter().map(|t| (t.id, t.attempts)).collect();
        match queue::release_many(&worker.pool, &config.id, &claims).await {
            Ok(n) => info!(
                released = n,
                "claimed tasks not started are back in the queue"
            ),
            Err(e) => {
                warn!(error = %e, "handing back claimed tasks failed; their leases will expire")
            }
        }
        for (id, attempts) in claims {
            worker.forget(id, attempts);
        }
    }
}

/// Puts claimed tasks into the heartbeat set.
fn hold(worker: &Worker, tasks: &[TaskRow]) {
    if tasks.is_empty() {
        return;
    }
    let mut held = worker.held.lock().expect("heartbeat set");
    for task in tasks {
        held.insert(
            task.id,
            Held {
                attempts: task.attempts,
                cancel: worker.hard_stop.child_token(),
                finished: false,
            },
        );
    }
}

/// Starts a buffered task in a free slot, unless its lease was lost while it waited.
fn start(
    worker: &Arc<Worker>,
    runs: &mut JoinSet<()>,
    task: TaskRow,
    permit: OwnedSemaphorePermit,
) {
    let cancel = worker
        .held
        .lock()
        .expect("heartbeat set")
        .get(&task.id)
        .filter(|h| h.attempts == task.attempts)
        .map(|h| h.cancel.clone());
    match cancel {
        Some(cancel) if !cancel.is_cancelled() => {
            runs.spawn(run_task(worker.clone(), task, cancel, permit));
        }
        _ => {
            warn!(task_id = %task.id, "lease lost before the task started; it may run on another worker");
            worker.forget(task.id, task.attempts);
        }
    }
}

/// Claims up to `wanted` tasks: from the scan's floor on while the queue is deep, from the start of the
/// index when that finds too little or a poll interval has passed (see [`queue::claim`]). When it finds
/// fewer than `wanted`, also works out how long to sleep: until the next pending task is due, at most a
/// poll interval.
async fn claim(worker: Arc<Worker>, wanted: usize, mut scan: Scan) -> sqlx::Result<Claimed> {
    let config = &worker.config;
    let started = Instant::now();
    let mut claimed = Vec::new();
    if let Some(from) = scan.floor
        && scan.last_full.elapsed() < config.poll_interval
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
        scan.last_full = Instant::now();
    }
    let took = started.elapsed();
    let now = Utc::now();
    for task in &claimed {
        let waited = (now - task.run_at).to_std().unwrap_or_default();
        metrics::histogram!(names::TASK_QUEUE_WAIT, "kind" => task.kind.clone())
            .record(waited.as_secs_f64());
    }
    if let Some(latest) = claimed.iter().map(|t| t.run_at).max() {
        scan.floor = Some(scan.floor.map_or(latest, |f| f.max(latest)));
    }
    let idle_for = if claimed.len() < wanted {
        Some(match queue::next_due_in(&worker.pool).await {
            // Due now but not claimable: another worker is claiming it. Don't spin.
            Ok(Some(due)) => due.max(Duration::from_millis(5)).min(config.poll_interval),
            Ok(None) => config.poll_interval,
            Err(e) => {
                warn!(error = %e, "reading the next due task failed");
                config.poll_interval
            }
        })
    } else {
        None
    };
    Ok(Claimed {
        tasks: claimed,
        scan,
        took,
        idle_for,
    })
}
