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
    // Each retry was scheduled after the failure, within its attempt's (growing) backoff ceiling.
    for window in runs.windows(2) {
        let (attempt, _, failed_at) = window[0];
        let (_, scheduled, _) = window[1];
        let gap = (scheduled - failed_at).to_std().unwrap_or_default();
        let ceiling = queue::backoff_ceiling(attempt, cfg.backoff_base, cfg.backoff_cap);
        assert!(
            gap <= ceiling + Duration::from_millis(100),
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
    let cfg = WorkerConfig {
        poll_interval: Duration::from_secs(60),
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

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn lease_lost_stops_the_run_and_is_exhausted_after_max_attempts(
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
    let registry = Arc::new(Registry::new().with(hang.clone()));
    let worker = tokio::spawn(berth_worker::run(
        pool.clone(),
        services(),
        registry,
        cfg,
        shutdown.clone(),
    ));
    eventually(Duration::from_secs(10), "the run to start", || async {
        (hang.started.load(Ordering::SeqCst) == 1).then_some(())
    })
    .await;
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

    // A task that lost its worker on its last attempt fails, saying why.
    sqlx::query("UPDATE tasks SET lease_until = now() - interval '1 second', max_attempts = 1 WHERE id = $1")
        .bind(id.0)
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(queue::reclaim_expired(&pool).await.unwrap(), 0);
    let row = task(&pool, id).await;
    assert_eq!(row.state, "failed");
    assert_eq!(
        row.last_error.as_deref(),
        Some("worker lost (lease expired) 1 time")
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
    let registry = Arc::new(Registry::new().with(hang.clone()));
    let worker = tokio::spawn(berth_worker::run(
        pool.clone(),
        services(),
        registry,
        cfg,
        shutdown.clone(),
    ));
    eventually(Duration::from_secs(10), "the run to start", || async {
        (hang.started.load(Ordering::SeqCst) == 1).then_some(())
    })
    .await;
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
        assert!(!plan.contains("Seq Scan") && !plan.contains("Sort"), "{plan}");
    }
}
