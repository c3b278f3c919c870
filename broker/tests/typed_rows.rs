//! Rows are read into typed values: a word in a text column that berth does not know is an error naming it,
//! never a value guessed for it (an unknown task state once read as `failed`).

use broker::{
    db::{
        snapshots,
        tasks::{self, NewTask},
        webhooks,
    },
    model::{Operation, TaskId, TaskState},
};
use serde_json::json;
use sqlx::PgPool;

async fn a_task(pool: &PgPool) -> TaskId {
    let mut task = NewTask::new(Operation::Provision.task_kind(), json!({}));
    task.instance_id = Some("i-1".into());
    task.operation = Some(Operation::Provision);
    tasks::enqueue(pool, task).await.unwrap()
}

#[track_caller]
fn assert_names(error: sqlx::Error, column: &str, word: &str) {
    let text = error.to_string();
    assert!(
        matches!(error, sqlx::Error::ColumnDecode { .. }),
        "a decode error, not {error:?}"
    );
    assert!(
        text.contains(column) && text.contains(word),
        "names the column and the word: {text}"
    );
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn a_task_reads_back_typed_and_is_stored_as_before(pool: PgPool) {
    let id = a_task(&pool).await;
    let row = tasks::get(&pool, id).await.unwrap().unwrap();
    assert_eq!(row.state, TaskState::Pending);
    assert_eq!(row.operation, Some(Operation::Provision));
    let stored: (String, String) =
        sqlx::query_as("SELECT state, operation FROM tasks WHERE id = $1")
            .bind(id.0)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(stored, ("pending".into(), "provision".into()));
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn an_unknown_task_state_is_an_error_not_failed(pool: PgPool) {
    let id = a_task(&pool).await;
    // The table's CHECK keeps such a word out; a newer berth (or a hand edit) might not.
    sqlx::raw_sql("ALTER TABLE tasks DROP CONSTRAINT tasks_state_check")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("UPDATE tasks SET state = 'paused' WHERE id = $1")
        .bind(id.0)
        .execute(&pool)
        .await
        .unwrap();
    assert_names(tasks::get(&pool, id).await.unwrap_err(), "state", "paused");
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn an_unknown_operation_is_an_error(pool: PgPool) {
    let id = a_task(&pool).await;
    sqlx::query("UPDATE tasks SET operation = 'teleport' WHERE id = $1")
        .bind(id.0)
        .execute(&pool)
        .await
        .unwrap();
    assert_names(
        tasks::latest_instance_operation(&pool, "i-1")
            .await
            .unwrap_err(),
        "operation",
        "teleport",
    );
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn an_unknown_snapshot_state_is_an_error(pool: PgPool) {
    let mut conn = pool.acquire().await.unwrap();
    let (backup, _) = snapshots::enqueue_backup(&mut conn, "i-1", "test")
        .await
        .unwrap();
    let row = snapshots::get(&pool, backup).await.unwrap().unwrap();
    assert_eq!(row.state, snapshots::SnapshotState::Pending);
    sqlx::raw_sql("ALTER TABLE snapshots DROP CONSTRAINT snapshots_state_check")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("UPDATE snapshots SET state = 'lost' WHERE id = $1")
        .bind(backup)
        .execute(&pool)
        .await
        .unwrap();
    assert_names(
        snapshots::get(&pool, backup).await.unwrap_err(),
        "state",
        "lost",
    );
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn an_unknown_webhook_delivery_state_is_an_error(pool: PgPool) {
    let task = a_task(&pool).await;
    let id = uuid::Uuid::new_v4();
    webhooks::insert(
        &pool,
        id,
        task.0,
        "https://x.example/h",
        b"sealed",
        &json!({}),
    )
    .await
    .unwrap();
    let row = webhooks::get(&pool, id).await.unwrap().unwrap();
    assert_eq!(row.state, webhooks::DeliveryState::Pending);
    sqlx::raw_sql("ALTER TABLE webhook_deliveries DROP CONSTRAINT webhook_deliveries_state_check")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("UPDATE webhook_deliveries SET state = 'bounced' WHERE id = $1")
        .bind(id)
        .execute(&pool)
        .await
        .unwrap();
    assert_names(
        webhooks::get(&pool, id).await.unwrap_err(),
        "state",
        "bounced",
    );
}
