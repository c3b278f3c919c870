//! No-op task throughput of berth's queue.
//!
//! For each worker count K: tops the queue up to `--backlog` pending no-op tasks, then starts K workers and times
//! how long the `--sample` oldest pending tasks (by `run_at`, the claim order) take to leave `pending`/`running`.
//! With backlog == sample that is a whole drain; with a large backlog it is the drain rate of the first `sample`
//! tasks while the rest stay queued. Tasks finished beyond the sample are not counted, so the rate is conservative.
//!
//! A worker is, by default (`--mode in-process`), `berth_worker::run` with its own pool (size
//! `DATABASE_POOL_SIZE`, as in `berth-worker`), the real task registry and `WorkerConfig` defaults but
//! `concurrency`; with `--mode process` it is a `berth-worker` process (`--worker-bin`, `WORKER_CONCURRENCY`).
//! Other settings (key file, plans, shared server) come from this process's environment, as for `berth-worker`.

use std::{
    path::PathBuf,
    process::Stdio,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use berth_worker::{Services, WorkerConfig, tasks};
use broker::{config::Settings, crypto::Cipher};
use secrecy::SecretString;
use serde_json::json;
use sqlx::{Connection, PgConnection, postgres::PgConnectOptions};
use tokio::{
    process::{Child, Command},
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;

use crate::{Args, emit};

const CHUNK: i64 = 100_000;

pub async fn run(args: &Args) -> anyhow::Result<()> {
    let url = args.get("database-url")?.to_string();
    let backlog: i64 = args.num("backlog", 10_000)?;
    let sample: i64 = args.num("sample", backlog)?;
    let concurrency: usize = args.num("concurrency", 8)?;
    let timeout = Duration::from_secs(args.num("timeout-secs", 1800)?);
    let label = args.opt("label").unwrap_or("").to_string();
    let in_process = match args.opt("mode").unwrap_or("in-process") {
        "in-process" => true,
        "process" => false,
        other => bail!("--mode: in-process or process, not {other}"),
    };
    let worker_bin = PathBuf::from(args.opt("worker-bin").unwrap_or("berth-worker"));
    let log_dir = PathBuf::from(args.opt("log-dir").unwrap_or("/tmp"));
    let workers: Vec<usize> = args
        .get("workers")
        .unwrap_or("1,4")
        .split(',')
        .map(|w| {
            w.trim()
                .parse()
                .context("--workers: comma-separated counts")
        })
        .collect::<anyhow::Result<_>>()?;
    if sample > backlog || sample <= 0 {
        bail!("--sample must be in 1..=--backlog");
    }

    let options: PgConnectOptions = url.parse().context("--database-url")?;
    let mut db = PgConnection::connect_with(&options.application_name("berth-bench")).await?;
    broker::MIGRATOR
        .run(&mut db)
        .await
        .context("migrating the bench database")?;
    sqlx::raw_sql("TRUNCATE tasks CASCADE")
        .execute(&mut db)
        .await?;
    let base: String = sqlx::query_scalar("SELECT (now() - interval '1 day')::text")
        .fetch_one(&mut db)
        .await?;
    // Microseconds after `base` of the next task's run_at, so claim order is insertion order.
    let mut next: i64 = 0;

    for &k in &workers {
        let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks WHERE state = 'pending'")
            .fetch_one(&mut db)
            .await?;
        let t_enqueue = Instant::now();
        let mut added = 0;
        while pending + added < backlog {
            let n = (backlog - pending - added).min(CHUNK);
            // Ids from berth's own generator (time-ordered), as `tasks::enqueue` gives them.
            let ids: Vec<uuid::Uuid> = (0..n).map(|_| broker::model::TaskId::new().0).collect();
            sqlx::query(
                "INSERT INTO tasks (id, kind, payload, run_at)
                 SELECT u.id, 'noop', '{}', $1::timestamptz + (($2 + u.i) * interval '1 microsecond')
                 FROM unnest($3::uuid[]) WITH ORDINALITY AS u(id, i)",
            )
            .bind(&base)
            .bind(next)
            .bind(&ids)
            .execute(&mut db)
            .await?;
            next += n;
            added += n;
        }
        let enqueue_secs = t_enqueue.elapsed().as_secs_f64();
        // Settle: vacuumed (so autovacuum does not start mid-run), statistics for the planner, dirty pages flushed.
        for settle in ["VACUUM (ANALYZE) tasks", "CHECKPOINT"] {
            sqlx::raw_sql(settle).execute(&mut db).await?;
        }
        // The sample's last task (claim order is run_at order): its id and run_at.
        let (last_id, cutoff): (uuid::Uuid, chrono::DateTime<chrono::Utc>) = sqlx::query_as(
            "SELECT id, run_at FROM tasks WHERE state = 'pending'
             ORDER BY run_at OFFSET $1 - 1 LIMIT 1",
        )
        .bind(sample)
        .fetch_one(&mut db)
        .await?;
        let queued: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks WHERE state = 'pending'")
            .fetch_one(&mut db)
            .await?;
        let succeeded_before: i64 =
            sqlx::query_scalar("SELECT count(*) FROM tasks WHERE state = 'succeeded'")
                .fetch_one(&mut db)
                .await?;

        // In-process workers connect before the clock starts; processes are timed from their spawn.
        let mut workers = Vec::with_capacity(k);
        if in_process {
            for i in 0..k {
                workers.push(Worker::start(&url, concurrency, i).await?);
            }
        }
        let t0 = Instant::now();
        let mut children = Vec::with_capacity(k);
        if in_process {
            for w in &mut workers {
                w.go.cancel();
            }
        } else {
            for i in 0..k {
                children.push(spawn_worker(&worker_bin, &url, concurrency, i, &log_dir)?);
            }
        }
        let deadline = t0 + timeout;
        // Progress, cheaply: the query that counts what is left of the sample walks the dead index entries
        // claims and completions leave behind (milliseconds on a deep queue, taken from the machine under
        // test), so it only runs once the sample's last task has left the queue, found by primary key; then
        // every 10 ms until nothing of the sample is left. drain.js polls graphile-worker the same way.
        let mut last_done = false;
        let result = loop {
            if !last_done {
                let state: String = sqlx::query_scalar("SELECT state FROM tasks WHERE id = $1")
                    .bind(last_id)
                    .fetch_one(&mut db)
                    .await?;
                last_done = state != "pending" && state != "running";
            }
            if last_done {
                let left: i64 = sqlx::query_scalar(
                    "SELECT (SELECT count(*) FROM (SELECT 1 FROM tasks WHERE state = 'pending'
                                                   AND run_at <= $1 LIMIT 1) p)
                          + (SELECT count(*) FROM tasks WHERE state = 'running' AND run_at <= $1)",
                )
                .bind(cutoff)
                .fetch_one(&mut db)
                .await?;
                if left == 0 {
                    break Ok(t0.elapsed());
                }
            }
            if Instant::now() > deadline {
                break Err(anyhow::anyhow!(
                    "queue: {sample} tasks not done within {timeout:?}"
                ));
            }
            if let Some(status) = children
                .iter_mut()
                .find_map(|c| c.try_wait().ok().flatten())
            {
                break Err(anyhow::anyhow!(
                    "a berth-worker exited early ({status}); see {}",
                    log_dir.display()
                ));
            }
            if workers.iter().any(|w| w.handle.is_finished()) {
                break Err(anyhow::anyhow!("a worker stopped early"));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        for child in &mut children {
            stop(child).await;
        }
        for w in workers {
            w.stop().await?;
        }
        let elapsed = result?;
        let succeeded_after: i64 =
            sqlx::query_scalar("SELECT count(*) FROM tasks WHERE state = 'succeeded'")
                .fetch_one(&mut db)
                .await?;
        let failed: i64 =
            sqlx::query_scalar("SELECT count(*) FROM tasks WHERE state = 'failed' OR attempts > 1")
                .fetch_one(&mut db)
                .await?;
        if succeeded_after - succeeded_before < sample {
            bail!(
                "queue: only {} tasks succeeded of {sample}",
                succeeded_after - succeeded_before
            );
        }
        let secs = elapsed.as_secs_f64();
        emit(
            json!({
                "label": label, "backlog": backlog, "queued_at_start": queued, "sample": sample, "workers": k,
                "concurrency": concurrency, "mode": if in_process { "in-process" } else { "process" }, "secs": secs, "tasks_per_s": sample as f64 / secs,
                "succeeded_during_run": succeeded_after - succeeded_before, "retried_or_failed": failed,
                "enqueued": added, "enqueue_secs": enqueue_secs,
            }),
            "queue",
        );
    }
    Ok(())
}

fn spawn_worker(
    bin: &PathBuf,
    url: &str,
    concurrency: usize,
    i: usize,
    log_dir: &std::path::Path,
) -> anyhow::Result<Child> {
    let log = std::fs::File::create(log_dir.join(format!("bench-worker-{i}.log")))?;
    Command::new(bin)
        .env("DATABASE_URL", url)
        .env("WORKER_CONCURRENCY", concurrency.to_string())
        .env("WORKER_ID", format!("bench-{i}"))
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log))
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))
}

/// SIGTERM (graceful), then SIGKILL after 10 s.
async fn stop(child: &mut Child) {
    if let Some(pid) = child.id() {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status()
            .await;
        if tokio::time::timeout(Duration::from_secs(10), child.wait())
            .await
            .is_ok()
        {
            return;
        }
    }
    let _ = child.kill().await;
}

/// One in-process worker: waits for `go`, then runs `berth_worker::run` until `shutdown`.
struct Worker {
    go: CancellationToken,
    shutdown: CancellationToken,
    handle: JoinHandle<anyhow::Result<()>>,
}

impl Worker {
    async fn start(url: &str, concurrency: usize, i: usize) -> anyhow::Result<Self> {
        let settings = Settings::load()?;
        let prefetch = settings.worker_prefetch;
        let pool = broker::db::connect(
            &SecretString::from(url.to_string()),
            settings.database_pool_size,
        )
        .await?;
        // Open the pool's connections now, so the timed part does not pay for them.
        let conns = settings.database_pool_size.min(4);
        let mut held = Vec::new();
        for _ in 0..conns {
            held.push(pool.acquire().await?);
        }
        drop(held);
        let cipher = Cipher::from_key_file(&settings.key_path())?;
        let services = Arc::new(Services::new(settings, cipher)?);
        let config = WorkerConfig {
            concurrency,
            prefetch,
            ..WorkerConfig::new(format!("bench-{i}-{}", std::process::id()))
        };
        let go = CancellationToken::new();
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn({
            let (go, shutdown) = (go.clone(), shutdown.clone());
            async move {
                go.cancelled().await;
                berth_worker::run(
                    pool,
                    services,
                    Arc::new(tasks::registry()),
                    config,
                    shutdown,
                )
                .await
            }
        });
        Ok(Self {
            go,
            shutdown,
            handle,
        })
    }

    async fn stop(self) -> anyhow::Result<()> {
        self.go.cancel();
        self.shutdown.cancel();
        match tokio::time::timeout(Duration::from_secs(30), self.handle).await {
            Ok(joined) => joined?,
            Err(_) => bail!("a worker did not stop within 30 s"),
        }
    }
}
