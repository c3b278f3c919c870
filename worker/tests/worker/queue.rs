//! The queue: exclusivity, retries and backoff, fatal errors, waits, leases, shutdown, wake-up, the plan.

use std::{
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use berth_worker::{Registry, WorkerConfig, queue, tasks};
use broker::{db::tasks::NewTask, model::kinds};
use serde_json::json;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio_util::sync::CancellationToken;

use crate::helpers::*;

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn two_workers_never_run_the_same_task(_: PgPoolOptions, opts: PgConnectOptions) {
    let setup = pool(&opts, 2).await;
    sqlx::query(
        "INSERT INTO tasks (id, kind) SELECT gen_random_uuid(), $1 FROM generate_series(1, 500)",
    )
    .bind(RECORD)
    .execute(&setup)
    .await
    .unwrap();
    let record = Record::default();
    let registry = || Registry::new().with(record.clone());
    let (a, b) = (pool(&opts, 10).await, pool(&opts, 10).await);
    let mut config_a = config("worker-a");
    config_a.concurrency = 6;
    let mut config_b = config("worker-b");
    config_b.concurrency = 6;
    tokio::join!(
        drain(&a, services(), registry(), config_a),
        drain(&b, services(), registry(), config_b)
    );

    assert_eq!(
        record.duplicates.load(Ordering::SeqCst),
        0,
        "a task ran twice"
    );
    assert_eq!(record.seen.lock().unwrap().len(), 500);
    let (succeeded, once, by_a, by_b): (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE state = 'succeeded'), count(*) FILTER (WHERE attempts = 1),
                count(*) FILTER (WHERE worker_id = 'worker-a'), count(*) FILTER (WHERE worker_id = 'worker-b')
         FROM tasks",
    )
    .fetch_one(&setup)
    .await
    .unwrap();
    assert_eq!((succeeded, once), (500, 500));
    assert_eq!(by_a + by_b, 500);
}

/// The claim statement itself under a barrier: eight claimers on their own connections are released together,
/// round after round, each asking for the same due tasks; no task is claimed twice and none is missed.
#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn claims_released_together_by_a_barrier_never_overlap(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    const CLAIMERS: usize = 8;
    const TASKS: i64 = 400;
    let setup = pool(&opts, 2).await;
    sqlx::query(
        "INSERT INTO tasks (id, kind) SELECT gen_random_uuid(), $1 FROM generate_series(1, $2)",
    )
    .bind(RECORD)
    .bind(TASKS)
    .execute(&setup)
    .await
    .unwrap();
    let claimers = pool(&opts, CLAIMERS as u32).await;
    let barrier = Arc::new(tokio::sync::Barrier::new(CLAIMERS));
    let mut handles = Vec::new();
    for n in 0..CLAIMERS {
        let (claimers, barrier) = (claimers.clone(), barrier.clone());
        handles.push(tokio::spawn(async move {
            let mut conn = claimers.acquire().await.unwrap();
            let mut got = Vec::new();
            // 12 rounds x 8 claimers x 7 tasks is more than the queue holds: the last rounds find it empty.
            for _ in 0..12 {
                barrier.wait().await;
                let claimed = queue::claim(
                    &mut *conn,
                    &format!("claimer-{n}"),
                    7,
                    Duration::from_secs(60),
                    None,
                )
                .await
                .unwrap();
                got.extend(claimed.into_iter().map(|t| (t.id, t.worker_id)));
            }
            got
        }));
    }
    let mut seen = std::collections::HashMap::new();
    for (n, handle) in handles.into_iter().enumerate() {
        for (id, worker) in handle.await.unwrap() {
            assert_eq!(worker.as_deref(), Some(format!("claimer-{n}").as_str()));
            assert!(seen.insert(id, n).is_none(), "task {id} claimed twice");
        }
    }
    assert_eq!(seen.len() as i64, TASKS, "every task claimed once");
    let (running, once): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE state = 'running'), count(*) FILTER (WHERE attempts = 1) FROM tasks",
    )
    .fetch_one(&setup)
    .await
    .unwrap();
    assert_eq!((running, once), (TASKS, TASKS));
}

/// `concurrency` is a ceiling the worker reaches and never passes, however many tasks are due.
#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn a_worker_runs_at_most_its_concurrency(_: PgPoolOptions, opts: PgConnectOptions) {
    let pool = pool(&opts, 8).await;
    sqlx::query(
        "INSERT INTO tasks (id, kind) SELECT gen_random_uuid(), $1 FROM generate_series(1, 60)",
    )
    .bind(GAUGE)
    .execute(&pool)
    .await
    .unwrap();
    let gauge = Gauge::default();
    let mut cfg = config("w");
    cfg.concurrency = 3;
    drain(&pool, services(), Registry::new().with(gauge.clone()), cfg).await;
    assert_eq!(
        gauge.most.load(Ordering::SeqCst),
        3,
        "three at once, never more"
    );
    let succeeded: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks WHERE state = 'succeeded'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(succeeded, 60);
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn retryable_errors_back_off_then_succeed(_: PgPoolOptions, opts: PgConnectOptions) {
    let pool = pool(&opts, 8).await;
    let flaky = Flaky {
        fail_times: 2,
        ..Default::default()
    };
    let id = enqueue(&pool, FLAKY, json!({})).await;
    let cfg = WorkerConfig {
        backoff_base: Duration::from_millis(100),
        ..config("w")
    };
    drain(
        &pool,
        services(),
        Registry::new().with(flaky.clone()),
        cfg.clone(),
    )
    .await;

    let row = task(&pool, id).await;
    assert_eq!(row.state, "succeeded");
    assert_eq!(row.attempts, 3);
    // The error of the last failure is kept, with its context.
    assert_eq!(
        row.last_error.as_deref(),
        Some("doing the flaky thing: flaky failure 2")
    );
    let runs = flaky.runs.lock().unwrap().clone();
    assert_eq!(runs.iter().map(|r| r.0).collect::<Vec<_>>(), vec![1, 2, 3]);
    // Each retry was scheduled after the failure, within its attempt's (growing) backoff ceiling. The gap
    // also holds the time to record the failure, which a loaded machine can stretch: hence the slack (the
    // backoff arithmetic itself is checked exactly by backoff_grows_exponentially_up_to_the_cap).
    for window in runs.windows(2) {
        let (attempt, _, failed_at) = window[0];
        let (_, scheduled, _) = window[1];
        let gap = (scheduled - failed_at).to_std().unwrap_or_default();
        let ceiling = queue::backoff_ceiling(attempt, cfg.backoff_base, cfg.backoff_cap);
        assert!(
            gap <= ceiling + Duration::from_millis(1500),
            "attempt {attempt}: gap {gap:?} > {ceiling:?}"
        );
    }
}

#[test]
fn backoff_grows_exponentially_up_to_the_cap() {
    let (base, cap) = (Duration::from_secs(1), Duration::from_secs(300));
    let ceilings: Vec<_> = (1..=10)
        .map(|a| queue::backoff_ceiling(a, base, cap))
        .collect();
    assert_eq!(ceilings[0], Duration::from_secs(1));
    assert_eq!(ceilings[1], Duration::from_secs(2));
    assert_eq!(ceilings[4], Duration::from_secs(16));
    assert_eq!(ceilings[9], cap);
    assert_eq!(queue::backoff_ceiling(1000, base, cap), cap);
    for attempt in 1..=12 {
        assert!(queue::backoff(attempt, base, cap) <= queue::backoff_ceiling(attempt, base, cap));
    }
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn max_attempts_is_honoured(_: PgPoolOptions, opts: PgConnectOptions) {
    let pool = pool(&opts, 8).await;
    let flaky = Flaky {
        fail_times: i32::MAX,
        ..Default::default()
    };
    let mut new = NewTask::new(FLAKY, json!({}));
    new.max_attempts = 4;
    let id = enqueue_with(&pool, new).await;
    drain(
        &pool,
        services(),
        Registry::new().with(flaky.clone()),
        config("w"),
    )
    .await;

    let row = task(&pool, id).await;
    assert_eq!(row.state, "failed");
    assert_eq!(row.attempts, 4);
    assert_eq!(flaky.runs.lock().unwrap().len(), 4);
    assert_eq!(
        row.last_error.as_deref(),
        Some("doing the flaky thing: flaky failure 4")
    );
    assert!(row.finished_at.is_some());
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn fatal_errors_and_unknown_kinds_fail_at_once(_: PgPoolOptions, opts: PgConnectOptions) {
    let pool = pool(&opts, 8).await;
    let doomed = enqueue(&pool, DOOMED, json!({})).await;
    let unknown = enqueue(&pool, "test.nobody-handles-this", json!({})).await;
    drain(&pool, services(), Registry::new().with(Doomed), config("w")).await;

    let row = task(&pool, doomed).await;
    assert_eq!((row.state.as_str(), row.attempts), ("failed", 1));
    assert_eq!(
        row.last_error.as_deref(),
        Some("this cannot work: fix the input")
    );
    let row = task(&pool, unknown).await;
    assert_eq!((row.state.as_str(), row.attempts), ("failed", 1));
    assert!(row.last_error.unwrap().contains("unknown task kind"));
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn waiting_spends_no_attempts_and_resumes_on_time(_: PgPoolOptions, opts: PgConnectOptions) {
    let pool = pool(&opts, 8).await;
    let waiter = Waiter {
        waits: 3,
        ..Default::default()
    };
    let id = enqueue(&pool, WAITER, json!({})).await;
    // A long poll interval: resuming on time must come from sleeping until the next run_at, not from polling.
    let cfg = WorkerConfig {
        poll_interval: Duration::from_secs(30),
        ..config("w")
    };

    let shutdown = CancellationToken::new();
    let registry = Arc::new(Registry::new().with(waiter.clone()));
    let worker = tokio::spawn(berth_worker::run(
        pool.clone(),
        services(),
        registry,
        cfg,
        shutdown.clone(),
    ));
    let started = Instant::now();
    let progress = eventually(Duration::from_secs(10), "the first wait", || async {
        let row = task(&pool, id).await;
        (row.state == "pending" && row.progress.is_some()).then_some(row.progress)
    })
    .await;
    assert_eq!(progress.as_deref(), Some("waiting (1)"));
    let row = eventually(Duration::from_secs(10), "the task to finish", || async {
        let row = task(&pool, id).await;
        row.state().is_finished().then_some(row)
    })
    .await;
    let took = started.elapsed();
    shutdown.cancel();
    worker.await.unwrap().unwrap();

    assert_eq!(row.state, "succeeded");
    assert_eq!(row.attempts, 1, "waits must not spend attempts");
    assert_eq!(waiter.runs.load(Ordering::SeqCst), 4);
    assert_eq!(row.progress.as_deref(), Some("waiting (3)"));
    assert!(
        took < Duration::from_secs(5),
        "three 200 ms waits took {took:?}"
    );
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn an_idle_worker_wakes_on_notify(_: PgPoolOptions, opts: PgConnectOptions) {
    let pool = pool(&opts, 8).await;
    let (shutdown, worker) = start_worker(&pool, Duration::from_secs(60));
    // Let it go idle (first claim finds nothing), then enqueue.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let id = enqueue(&pool, kinds::NOOP, json!({})).await;
    eventually(Duration::from_secs(10), "the noop task", || async {
        (task(&pool, id).await.state == "succeeded").then_some(())
    })
    .await;
    let took = started.elapsed();
    shutdown.cancel();
    worker.await.unwrap().unwrap();
    assert!(
        took < Duration::from_secs(5),
        "an idle worker took {took:?} to pick up a task"
    );
}

/// A worker with the standard task kinds and this poll interval, running until the token is cancelled.
fn start_worker(
    pool: &sqlx::PgPool,
    poll_interval: Duration,
) -> (
    CancellationToken,
    tokio::task::JoinHandle<anyhow::Result<()>>,
) {
    let cfg = WorkerConfig {
        poll_interval,
        ..config("w")
    };
    let shutdown = CancellationToken::new();
    let worker = tokio::spawn(berth_worker::run(
        pool.clone(),
        services(),
        Arc::new(tasks::registry()),
        cfg,
        shutdown.clone(),
    ));
    (shutdown, worker)
}

/// With no NOTIFY (the insert trigger switched off for the inserting session), an idle worker still finds a
/// new task on its next poll.
#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn without_notify_the_poll_finds_the_task(_: PgPoolOptions, opts: PgConnectOptions) {
    let pool = pool(&opts, 8).await;
    let (shutdown, worker) = start_worker(&pool, Duration::from_millis(300));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut conn = pool.acquire().await.unwrap();
    // `replica` skips ordinary triggers: the insert sends no NOTIFY.
    sqlx::query("SET session_replication_role = replica")
        .execute(&mut *conn)
        .await
        .unwrap();
    let id: uuid::Uuid = sqlx::query_scalar(
        "INSERT INTO tasks (id, kind) VALUES (gen_random_uuid(), $1) RETURNING id",
    )
    .bind(kinds::NOOP)
    .fetch_one(&mut *conn)
    .await
    .unwrap();
    sqlx::query("SET session_replication_role = origin")
        .execute(&mut *conn)
        .await
        .unwrap();
    drop(conn);
    let id = broker::model::TaskId(id);
    eventually(
        Duration::from_secs(10),
        "the task found by polling",
        || async { (task(&pool, id).await.state == "succeeded").then_some(()) },
    )
    .await;
    shutdown.cancel();
    worker.await.unwrap().unwrap();
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn an_expired_lease_is_reclaimed_by_another_worker(_: PgPoolOptions, opts: PgConnectOptions) {
    let pool = pool(&opts, 8).await;
    let id = enqueue(&pool, kinds::NOOP, json!({})).await;
    // A worker claims it and dies: nobody extends its 300 ms lease.
    let claimed = queue::claim(&pool, "dead-worker", 10, Duration::from_millis(300), None)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    let stale = claimed.into_iter().next().unwrap();

    drain(&pool, services(), tasks::registry(), config("rescuer")).await;
    let row = task(&pool, id).await;
    assert_eq!(row.state, "succeeded");
    assert_eq!(row.attempts, 2);
    assert_eq!(row.worker_id.as_deref(), Some("rescuer"));

    // The dead worker comes back: its writes are fenced off.
    let outcome = queue::Outcome::Failed {
        error: "late".into(),
    };
    assert!(
        !queue::finish(&pool, &stale, "dead-worker", &outcome)
            .await
            .unwrap()
    );
    assert!(!queue::release(&pool, &stale, "dead-worker").await.unwrap());
    assert_eq!(task(&pool, id).await.state, "succeeded");
}

/// A worker running only [`Hang`], once its run of the queued task has started; `shutdown` stops it.
async fn hanging_worker(
    pool: &sqlx::PgPool,
    hang: &Hang,
    config: WorkerConfig,
    shutdown: &CancellationToken,
) -> tokio::task::JoinHandle<anyhow::Result<()>> {
    let registry = Arc::new(Registry::new().with(hang.clone()));
    let worker = tokio::spawn(berth_worker::run(
        pool.clone(),
        services(),
        registry,
        config,
        shutdown.clone(),
    ));
    eventually(Duration::from_secs(10), "the run to start", || async {
        (hang.started.load(Ordering::SeqCst) == 1).then_some(())
    })
    .await;
    worker
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn lease_lost_stops_the_run_and_lost_runs_have_a_budget_of_their_own(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let pool = pool(&opts, 8).await;
    let hang = Hang::default();
    let id = enqueue(&pool, HANG, json!({})).await;
    let cfg = WorkerConfig {
        lease: Duration::from_millis(600),
        ..config("w")
    };
    let shutdown = CancellationToken::new();
    let worker = hanging_worker(&pool, &hang, cfg, &shutdown).await;
    // Someone else takes the task over (as a reclaim after a network partition would).
    sqlx::query("UPDATE tasks SET worker_id = 'thief', lease_until = now() + interval '1 hour' WHERE id = $1").bind(id.0).execute(&pool).await.unwrap();
    eventually(
        Duration::from_secs(10),
        "the heartbeat to stop the run",
        || async { (hang.stopped.load(Ordering::SeqCst) == 1).then_some(()) },
    )
    .await;
    shutdown.cancel();
    worker.await.unwrap().unwrap();
    let row = task(&pool, id).await;
    assert_eq!(
        (row.state.as_str(), row.worker_id.as_deref()),
        ("running", Some("thief")),
        "fenced: not overwritten"
    );

    // A lost run does not spend an attempt: on its last attempt, the task goes back to pending, saying why.
    sqlx::query("UPDATE tasks SET lease_until = now() - interval '1 second', max_attempts = 1 WHERE id = $1")
        .bind(id.0)
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(queue::reclaim_expired(&pool).await.unwrap(), 1);
    let row = task(&pool, id).await;
    assert_eq!(
        (row.state.as_str(), row.lost_leases, row.attempts_spent()),
        ("pending", 1, 0)
    );
    assert_eq!(
        row.last_error.as_deref(),
        Some("worker lost (lease expired) 1 time")
    );

    // Lost runs have a budget of their own: the last one it allows fails the task.
    let factor = broker::db::tasks::LOST_LEASE_FACTOR;
    sqlx::query(
        "UPDATE tasks SET state = 'running', worker_id = 'w', lease_until = now() - interval '1 second',
         lost_leases = $2 - 1 WHERE id = $1",
    )
    .bind(id.0)
    .bind(factor)
    .execute(&pool)
    .await
    .unwrap();
    assert_eq!(queue::reclaim_expired(&pool).await.unwrap(), 0);
    let row = task(&pool, id).await;
    assert_eq!(row.state, "failed");
    assert_eq!(
        row.last_error,
        Some(format!("worker lost (lease expired) {factor} times"))
    );
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn shutdown_hands_unfinished_tasks_back(_: PgPoolOptions, opts: PgConnectOptions) {
    let pool = pool(&opts, 8).await;
    let hang = Hang::default();
    let id = enqueue(&pool, HANG, json!({})).await;
    let cfg = WorkerConfig {
        shutdown_grace: Duration::from_millis(300),
        ..config("w")
    };
    let shutdown = CancellationToken::new();
    let worker = hanging_worker(&pool, &hang, cfg, &shutdown).await;
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), worker)
        .await
        .expect("run returns after the grace")
        .unwrap()
        .unwrap();

    assert_eq!(hang.stopped.load(Ordering::SeqCst), 1);
    let row = task(&pool, id).await;
    assert_eq!(row.state, "pending");
    assert_eq!(row.attempts, 0, "a handed-back run does not count");
    assert!(row.worker_id.is_none() && row.lease_until.is_none());
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn the_claim_walks_the_pending_index(_: PgPoolOptions, opts: PgConnectOptions) {
    let pool = pool(&opts, 2).await;
    // A long history of finished tasks and a deep queue.
    sqlx::query(
        "INSERT INTO tasks (id, kind, state, run_at, finished_at)
         SELECT gen_random_uuid(), 'noop', 'succeeded', now() - interval '1 day', now() FROM generate_series(1, 100000)",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO tasks (id, kind, run_at)
         SELECT gen_random_uuid(), 'noop', now() - (g || ' milliseconds')::interval FROM generate_series(1, 100000) g",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query("ANALYZE tasks").execute(&pool).await.unwrap();
    // The claim's text (queue::claim), with and without a floor, as a generic plan would see it.
    for floor in ["NULL::timestamptz", "now() - interval '50 milliseconds'"] {
        let plan: Vec<String> = sqlx::query_scalar(&format!(
            "EXPLAIN WITH next AS (
                 SELECT id FROM tasks
                 WHERE state = 'pending' AND run_at <= now()
                   AND run_at >= COALESCE({floor}, '-infinity'::timestamptz)
                 ORDER BY run_at LIMIT 8 FOR UPDATE SKIP LOCKED)
             UPDATE tasks SET state = 'running', attempts = attempts + 1,
                    lease_until = now() + make_interval(secs => 30), worker_id = 'w', updated_at = now()
             WHERE id IN (SELECT id FROM next) RETURNING *"
        ))
        .fetch_all(&pool)
        .await
        .unwrap();
        let plan = plan.join("\n");
        assert!(plan.contains("tasks_pending_run_at"), "{plan}");
        assert!(
            !plan.contains("Seq Scan") && !plan.contains("Sort"),
            "{plan}"
        );
    }
}

// ---- batched completions and claims ----

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn many_outcomes_are_recorded_in_batches(_: PgPoolOptions, opts: PgConnectOptions) {
    let pool = pool(&opts, 10).await;
    // Fast successes and fast fatal failures, enough for claims and completions to come in batches.
    sqlx::query(
        "INSERT INTO tasks (id, kind, run_at)
         SELECT gen_random_uuid(), CASE WHEN g % 10 = 0 THEN $1 ELSE $2 END,
                now() - interval '1 minute' + g * interval '1 microsecond'
         FROM generate_series(1, 3000) g",
    )
    .bind(DOOMED)
    .bind(kinds::NOOP)
    .execute(&pool)
    .await
    .unwrap();
    let mut registry = tasks::registry();
    registry.add(Arc::new(Doomed));
    let cfg = WorkerConfig {
        concurrency: 8,
        ..config("w")
    };
    drain(&pool, services(), registry, cfg).await;

    // kind, state, attempts, last_error, then: ours, lease cleared, finished_at set (with updated_at).
    type Row = (String, String, i32, Option<String>, bool, bool, bool);
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT kind, state, attempts, last_error, worker_id = 'w', lease_until IS NULL,
                finished_at IS NOT NULL AND finished_at >= created_at AND finished_at = updated_at
         FROM tasks",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), 3000);
    for (kind, state, attempts, last_error, ours, no_lease, finished) in rows {
        assert_eq!(attempts, 1);
        assert!(ours && no_lease && finished, "{kind} {state}");
        if kind == DOOMED {
            assert_eq!(state, "failed");
            assert_eq!(
                last_error.as_deref(),
                Some("this cannot work: fix the input")
            );
        } else {
            assert_eq!(state, "succeeded");
            assert_eq!(last_error, None);
        }
    }
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn a_stale_batch_entry_is_not_overwritten(_: PgPoolOptions, opts: PgConnectOptions) {
    let pool = pool(&opts, 4).await;
    let lost = enqueue(&pool, kinds::NOOP, json!({})).await;
    let kept = enqueue(&pool, kinds::NOOP, json!({})).await;
    let again = enqueue(&pool, kinds::NOOP, json!({})).await;
    let lease = Duration::from_secs(30);
    let claimed = queue::claim(&pool, "a", 10, lease, None).await.unwrap();
    assert_eq!(claimed.len(), 3);
    let attempt = |id: uuid::Uuid| claimed.iter().find(|t| t.id == id).unwrap().attempts;

    // `lost`: its lease expired, it was reclaimed and another worker holds it now.
    // `again`: reclaimed and claimed once more by the same worker (a later attempt).
    sqlx::query(
        "UPDATE tasks SET state = 'pending', worker_id = NULL, lease_until = NULL WHERE id = ANY($1)",
    )
    .bind(vec![lost.0, again.0])
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query("UPDATE tasks SET run_at = now() + interval '1 hour' WHERE id = $1")
        .bind(again.0)
        .execute(&pool)
        .await
        .unwrap();
    let stolen = queue::claim(&pool, "b", 10, lease, None).await.unwrap();
    assert_eq!(
        stolen.iter().map(|t| t.id).collect::<Vec<_>>(),
        vec![lost.0]
    );
    sqlx::query("UPDATE tasks SET run_at = now() WHERE id = $1")
        .bind(again.0)
        .execute(&pool)
        .await
        .unwrap();
    let reclaimed = queue::claim(&pool, "a", 10, lease, None).await.unwrap();
    assert_eq!(reclaimed.len(), 1);
    assert_eq!(reclaimed[0].attempts, 2);

    let batch = [lost.0, kept.0, again.0].map(|id| queue::Finished {
        id,
        attempts: attempt(id),
        error: None,
    });
    let recorded = queue::finish_batch(&pool, "a", &batch).await.unwrap();
    assert_eq!(
        recorded,
        vec![kept.0],
        "only the claim still held is recorded"
    );

    let row = task(&pool, lost).await;
    assert_eq!(
        (row.state.as_str(), row.worker_id.as_deref(), row.attempts),
        ("running", Some("b"), 2)
    );
    assert!(row.finished_at.is_none() && row.lease_until.is_some());
    let row = task(&pool, again).await;
    assert_eq!(
        (row.state.as_str(), row.worker_id.as_deref(), row.attempts),
        ("running", Some("a"), 2)
    );
    assert!(row.finished_at.is_none());
    let row = task(&pool, kept).await;
    assert_eq!((row.state.as_str(), row.attempts), ("succeeded", 1));
    assert!(row.finished_at.is_some() && row.lease_until.is_none());

    // The stale entries' releases are fenced the same way.
    let claims = [(lost.0, 1), (again.0, 1)];
    assert_eq!(queue::release_many(&pool, "a", &claims).await.unwrap(), 0);
    assert_eq!(
        queue::release_many(&pool, "a", &[(again.0, 2)])
            .await
            .unwrap(),
        1
    );
    let row = task(&pool, again).await;
    assert_eq!((row.state.as_str(), row.attempts), ("pending", 1));
    assert!(row.worker_id.is_none() && row.lease_until.is_none());
}

/// Finishes at once; on its `stop_after`-th run it asks the worker to shut down (before returning Done).
#[derive(Clone)]
struct StopMidway {
    runs: Arc<std::sync::atomic::AtomicUsize>,
    stop_after: usize,
    shutdown: CancellationToken,
}

const STOP_MIDWAY: &str = "test.stop-midway";

#[async_trait::async_trait]
impl berth_worker::TaskHandler for StopMidway {
    fn kind(&self) -> &'static str {
        STOP_MIDWAY
    }

    async fn run(
        &self,
        _ctx: &berth_worker::TaskContext<'_>,
    ) -> Result<berth_worker::Step, berth_worker::TaskError> {
        if self.runs.fetch_add(1, Ordering::SeqCst) + 1 == self.stop_after {
            self.shutdown.cancel();
        }
        Ok(berth_worker::Step::Done)
    }
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn shutdown_writes_pending_outcomes_and_hands_back_the_buffer(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let pool = pool(&opts, 8).await;
    sqlx::query(
        "INSERT INTO tasks (id, kind, run_at)
         SELECT gen_random_uuid(), $1, now() - interval '1 minute' + g * interval '1 microsecond'
         FROM generate_series(1, 5000) g",
    )
    .bind(STOP_MIDWAY)
    .execute(&pool)
    .await
    .unwrap();
    let shutdown = CancellationToken::new();
    let handler = StopMidway {
        runs: Arc::default(),
        stop_after: 1500,
        shutdown: shutdown.clone(),
    };
    let cfg = WorkerConfig {
        concurrency: 8,
        ..config("w")
    };
    tokio::time::timeout(
        Duration::from_secs(60),
        berth_worker::run(
            pool.clone(),
            services(),
            Arc::new(Registry::new().with(handler.clone())),
            cfg,
            shutdown,
        ),
    )
    .await
    .expect("the worker stops")
    .unwrap();

    // Every run that ended is recorded by the time `run` returns; everything else (buffered, or claimed
    // while stopping) is back in the queue as if never claimed.
    let runs = handler.runs.load(Ordering::SeqCst) as i64;
    assert!(runs >= 1500);
    let (succeeded, pending, other, pending_clean): (i64, i64, i64, bool) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE state = 'succeeded' AND attempts = 1 AND finished_at IS NOT NULL),
                count(*) FILTER (WHERE state = 'pending'),
                count(*) FILTER (WHERE state NOT IN ('succeeded', 'pending')),
                coalesce(bool_and(attempts = 0 AND worker_id IS NULL AND lease_until IS NULL)
                         FILTER (WHERE state = 'pending'), true)
         FROM tasks",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(other, 0, "nothing left running");
    assert_eq!(succeeded, runs, "every finished run is recorded");
    assert_eq!(pending, 5000 - runs);
    assert!(pending_clean, "handed-back tasks do not count an attempt");
}
