//! The backup scheduler: exactly one backup per due schedule, whatever the number of schedulers; a schedule
//! overdue by many periods fires once; never two active backups of one instance.

use berth_worker::backup_scheduler;
use broker::db::backup_schedules;
use chrono::{Duration as Span, Utc};
use serde_json::json;
use sqlx::{
    PgPool,
    postgres::{PgConnectOptions, PgPoolOptions},
};

use crate::helpers::*;

const SERVICE: &str = "3bdd3b6c-801f-470b-a45f-bc1849fa2124";
const SHARED: &str = "707a3e6f-f8db-4339-88da-1533837a9810";

async fn backup_tasks(pool: &PgPool, instance: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM tasks WHERE kind = 'instance.backup' AND instance_id = $1",
    )
    .bind(instance)
    .fetch_one(pool)
    .await
    .unwrap()
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn many_schedulers_enqueue_a_due_backup_once(_: PgPoolOptions, opts: PgConnectOptions) {
    let db = pool(&opts, 20).await;
    let instance = insert_instance(&db, SERVICE, SHARED, json!({}), json!({})).await;
    // Overdue by a day on a schedule of every minute: one backup, not 1,440.
    let long_ago = Utc::now() - Span::days(1);
    backup_schedules::upsert(&db, &instance, "* * * * *", 3, long_ago)
        .await
        .unwrap();

    assert_eq!(concurrent_passes(&db, 8).await, 1);
    assert_eq!(backup_tasks(&db, &instance).await, 1);
    let schedule = backup_schedules::get(&db, &instance)
        .await
        .unwrap()
        .unwrap();
    assert!(
        schedule.next_run_at > Utc::now(),
        "moved on past now: {}",
        schedule.next_run_at
    );
    let row: (String, String) =
        sqlx::query_as("SELECT kind, state FROM snapshots WHERE instance_id = $1")
            .bind(&instance)
            .fetch_one(&db)
            .await
            .unwrap();
    assert_eq!(row, ("backup".to_string(), "pending".to_string()));

    // Due again while the first backup is still pending: refused, and the schedule still moves on.
    sqlx::query("UPDATE backup_schedules SET next_run_at = now() - interval '1 minute'")
        .execute(&db)
        .await
        .unwrap();
    assert_eq!(backup_scheduler::once(&db).await.unwrap(), 0);
    assert_eq!(backup_tasks(&db, &instance).await, 1);
    assert!(
        backup_schedules::get(&db, &instance)
            .await
            .unwrap()
            .unwrap()
            .next_run_at
            > Utc::now()
    );

    // Once it has finished, the next due run makes the next backup.
    sqlx::query("UPDATE tasks SET state = 'succeeded' WHERE kind = 'instance.backup'")
        .execute(&db)
        .await
        .unwrap();
    sqlx::query("UPDATE backup_schedules SET next_run_at = now() - interval '1 second'")
        .execute(&db)
        .await
        .unwrap();
    assert_eq!(backup_scheduler::once(&db).await.unwrap(), 1);
    assert_eq!(backup_tasks(&db, &instance).await, 2);
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn a_schedule_not_yet_due_waits_and_deleting_the_instance_removes_it(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let db = pool(&opts, 4).await;
    let instance = insert_instance(&db, SERVICE, SHARED, json!({}), json!({})).await;
    backup_schedules::upsert(&db, &instance, "0 3 * * *", 3, Utc::now() + Span::hours(1))
        .await
        .unwrap();
    assert_eq!(backup_scheduler::once(&db).await.unwrap(), 0);
    // Changing the retention keeps the next run; changing the schedule takes the new one.
    let before = backup_schedules::get(&db, &instance)
        .await
        .unwrap()
        .unwrap()
        .next_run_at;
    backup_schedules::upsert(&db, &instance, "0 3 * * *", 5, Utc::now())
        .await
        .unwrap();
    let kept = backup_schedules::get(&db, &instance)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((kept.next_run_at, kept.retention), (before, 5));
    sqlx::query("DELETE FROM service_instances WHERE id = $1")
        .bind(&instance)
        .execute(&db)
        .await
        .unwrap();
    assert!(
        backup_schedules::get(&db, &instance)
            .await
            .unwrap()
            .is_none()
    );
}

/// Runs `n` scheduler passes at once (each on its own connection) and adds up what they enqueued.
async fn concurrent_passes(db: &PgPool, n: usize) -> usize {
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..n {
        let db = db.clone();
        set.spawn(async move { backup_scheduler::once(&db).await.unwrap() });
    }
    set.join_all().await.into_iter().sum()
}
