//! The audit trail: every task on an instance becomes an event (the triggers on `tasks`), takes the task's
//! outcome when it ends, reads back newest first a page at a time, and is pruned only once the instance is gone
//! for the retention period.

use broker::{
    db::{
        events,
        tasks::{self, NewTask},
    },
    identity::Actor,
    model::{Operation, TaskId, kinds},
    request_context,
};
use serde_json::json;
use sqlx::PgPool;

async fn enqueue(pool: &PgPool, operation: Operation, instance: &str) -> TaskId {
    let mut task = NewTask::new(
        operation.task_kind(),
        json!({ "plan_id": "p-1", "parameters": {"password": "x"} }),
    );
    task.instance_id = Some(instance.into());
    task.operation = Some(operation);
    task.originating_identity =
        Some(json!({"platform": "cloudfoundry", "value": {"user_id": "u-1", "email": "e@x"}}));
    tasks::enqueue(pool, task).await.unwrap()
}

async fn finish(pool: &PgPool, id: TaskId, state: &str, error: Option<&str>) {
    sqlx::query("UPDATE tasks SET state = $2, last_error = $3, finished_at = now() WHERE id = $1")
        .bind(id.0)
        .bind(state)
        .bind(error)
        .execute(pool)
        .await
        .unwrap();
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn each_task_on_an_instance_is_an_event_with_who_asked_and_how_it_ended(pool: PgPool) {
    let provision =
        request_context::scope("req-1".into(), enqueue(&pool, Operation::Provision, "i-1")).await;
    let bind = enqueue(&pool, Operation::Bind, "i-1").await;
    // Queue-internal tasks (webhook deliveries, tasks on no instance) are not events.
    tasks::enqueue(&pool, NewTask::new(kinds::DELIVER_WEBHOOK, json!({})))
        .await
        .unwrap();
    tasks::enqueue(&pool, NewTask::new(kinds::NOOP, json!({})))
        .await
        .unwrap();

    let listed = events::for_instance(&pool, "i-1", None, 10).await.unwrap();
    assert_eq!(listed.len(), 2);
    let (newest, oldest) = (&listed[0], &listed[1]);
    assert_eq!((newest.action.as_str(), newest.task_id), ("bind", bind.0));
    assert_eq!(
        (oldest.action.as_str(), oldest.task_id),
        ("provision", provision.0)
    );
    assert_eq!(oldest.request_id.as_deref(), Some("req-1"));
    assert_eq!(newest.request_id, None);
    assert_eq!(
        oldest.actor,
        Some(Actor {
            platform: "cloudfoundry".into(),
            user_id: Some("u-1".into())
        })
    );
    // Only the safe fields of the payload.
    assert_eq!(oldest.detail, json!({"plan_id": "p-1"}));
    assert_eq!(oldest.outcome, None);

    finish(
        &pool,
        provision,
        "succeeded",
        Some("an error of an earlier attempt"),
    )
    .await;
    finish(&pool, bind, "failed", Some("role exists")).await;
    let listed = events::for_instance(&pool, "i-1", None, 10).await.unwrap();
    assert_eq!(listed[0].outcome.as_deref(), Some("failed"));
    assert_eq!(listed[0].error.as_deref(), Some("role exists"));
    assert_eq!(listed[1].outcome.as_deref(), Some("succeeded"));
    assert_eq!(listed[1].error, None);
    assert!(listed[1].finished_at.is_some());

    // Paging: `before` an event gives the older ones.
    let page = events::for_instance(&pool, "i-1", Some(listed[0].id), 10)
        .await
        .unwrap();
    assert_eq!(page.len(), 1);
    assert_eq!(page[0].action, "provision");
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn a_trail_is_pruned_only_when_its_instance_is_gone_past_the_retention(pool: PgPool) {
    sqlx::query(
        "INSERT INTO service_instances (id, service_id, plan_id, organization_guid, space_guid)
         VALUES ('kept', 's', 'p', 'o', 's')",
    )
    .execute(&pool)
    .await
    .unwrap();
    for instance in ["kept", "gone-recently", "gone-long-ago"] {
        enqueue(&pool, Operation::Provision, instance).await;
    }
    sqlx::query(
        "UPDATE instance_events SET requested_at = now() - interval '100 days'
         WHERE instance_id IN ('kept', 'gone-long-ago')",
    )
    .execute(&pool)
    .await
    .unwrap();

    assert_eq!(events::prune(&pool, 90).await.unwrap(), 1);
    let left = |id: &'static str| {
        let pool = pool.clone();
        async move {
            events::for_instance(&pool, id, None, 10)
                .await
                .unwrap()
                .len()
        }
    };
    assert_eq!(left("kept").await, 1, "the instance still exists");
    assert_eq!(left("gone-recently").await, 1, "within the retention");
    assert_eq!(left("gone-long-ago").await, 0);
}
