//! Expired bindings on the `shared` engine against the test server: the reconcile loop queues one
//! `binding.expire` task per expired binding (however many workers look), the task drops the login role and
//! ends its open session, records `revoked_at`, leaves other bindings alone, and an unbind afterwards works.

use berth_worker::{binding_expiry, reconcile};
use broker::{
    db::{bindings, tasks::NewTask},
    model::{Operation, kinds},
    names,
};
use chrono::Utc;
use serde_json::{Map, Value, json};
use sqlx::{
    Connection, PgConnection, PgPool,
    postgres::{PgConnectOptions, PgPoolOptions},
};

use crate::helpers::*;

const SERVICE: &str = "3bdd3b6c-801f-470b-a45f-bc1849fa2124";
const PLAN: &str = "707a3e6f-f8db-4339-88da-1533837a9810";
const PREFIX: &str = "bt_";

async fn role_exists(role: &str) -> bool {
    let mut admin = PgConnection::connect(&admin_url()).await.unwrap();
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)")
        .bind(role)
        .fetch_one(&mut admin)
        .await
        .unwrap()
}

async fn database_url_of(pool: &PgPool, binding_id: &str) -> String {
    let row = bindings::get(pool, binding_id).await.unwrap().unwrap();
    let creds: Map<String, Value> = cipher().open_json(&row.credentials.unwrap()).unwrap();
    creds["DATABASE_URL"].as_str().unwrap().to_string()
}

async fn expire_now(pool: &PgPool, binding_id: &str) {
    sqlx::query(
        "UPDATE service_bindings SET expires_at = now() - interval '1 second' WHERE id = $1",
    )
    .bind(binding_id)
    .execute(pool)
    .await
    .unwrap();
}

async fn revocation_tasks(pool: &PgPool, binding_id: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM tasks WHERE kind = $1 AND binding_id = $2")
        .bind(kinds::EXPIRE_BINDING)
        .bind(binding_id)
        .fetch_one(pool)
        .await
        .unwrap()
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn an_expired_shared_binding_loses_its_role_and_its_session(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let pool = pool(&opts, 8).await;
    let services = services();
    let instance = insert_instance(&pool, SERVICE, PLAN, json!({}), json!({})).await;
    succeeded(
        &operate(
            &pool,
            &services,
            Operation::Provision,
            &instance,
            None,
            json!({}),
        )
        .await,
    );
    let expiring = insert_binding(
        &pool,
        &instance,
        SERVICE,
        PLAN,
        json!({ "expires_in": 600 }),
    )
    .await;
    let lasting = insert_binding(&pool, &instance, SERVICE, PLAN, json!({})).await;
    for binding in [&expiring, &lasting] {
        succeeded(
            &operate(
                &pool,
                &services,
                Operation::Bind,
                &instance,
                Some(binding),
                json!({}),
            )
            .await,
        );
    }
    let expiring_role = names::binding_role(PREFIX, &expiring);

    // Not expired yet: nothing is queued.
    sqlx::query(
        "UPDATE service_bindings SET expires_at = now() + interval '10 minutes' WHERE id = $1",
    )
    .bind(&expiring)
    .execute(&pool)
    .await
    .unwrap();
    reconcile::once(&pool, &services).await;
    assert_eq!(revocation_tasks(&pool, &expiring).await, 0);

    // An app holds a session open as the expiring binding.
    let mut session = PgConnection::connect(&database_url_of(&pool, &expiring).await)
        .await
        .unwrap();
    sqlx::query("SELECT 1").execute(&mut session).await.unwrap();

    expire_now(&pool, &expiring).await;
    // Three workers' reconcile passes at once queue one revocation.
    let (a, b, c) = tokio::join!(
        binding_expiry::enqueue_revocations(&pool),
        binding_expiry::enqueue_revocations(&pool),
        binding_expiry::enqueue_revocations(&pool),
    );
    assert_eq!(a.unwrap() + b.unwrap() + c.unwrap(), 1);
    reconcile::once(&pool, &services).await;
    assert_eq!(
        revocation_tasks(&pool, &expiring).await,
        1,
        "queued once while one is pending"
    );
    assert!(
        role_exists(&expiring_role).await,
        "revoked by the task, not before"
    );

    let before = Utc::now();
    drain(
        &pool,
        services.clone(),
        berth_worker::tasks::registry(),
        config("w"),
    )
    .await;
    let after = Utc::now();
    let state: String =
        sqlx::query_scalar("SELECT state FROM tasks WHERE kind = $1 AND binding_id = $2")
            .bind(kinds::EXPIRE_BINDING)
            .bind(&expiring)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(state, "succeeded");
    assert!(
        !role_exists(&expiring_role).await,
        "the expired binding's role is dropped"
    );
    assert!(
        sqlx::query("SELECT 1").execute(&mut session).await.is_err(),
        "the expired binding's open session is ended"
    );
    assert!(
        PgConnection::connect(&database_url_of(&pool, &expiring).await)
            .await
            .is_err(),
        "the expired credentials no longer log in"
    );
    let row = bindings::get(&pool, &expiring).await.unwrap().unwrap();
    let revoked_at = row.revoked_at.expect("revoked_at recorded");
    assert!(before <= revoked_at && revoked_at <= after, "{revoked_at}");
    // The binding that does not expire works on.
    let mut other = PgConnection::connect(&database_url_of(&pool, &lasting).await)
        .await
        .unwrap();
    sqlx::query("SELECT 1").execute(&mut other).await.unwrap();
    other.close().await.unwrap();

    // Revoked: later passes queue nothing; a duplicate task (a rerun after a crash) changes nothing.
    reconcile::once(&pool, &services).await;
    assert_eq!(revocation_tasks(&pool, &expiring).await, 1);
    let mut again = NewTask::new(kinds::EXPIRE_BINDING, json!({}));
    again.instance_id = Some(instance.clone());
    again.binding_id = Some(expiring.clone());
    let again = enqueue_with(&pool, again).await;
    drain(
        &pool,
        services.clone(),
        berth_worker::tasks::registry(),
        config("w"),
    )
    .await;
    succeeded(&task(&pool, again).await);
    assert_eq!(
        bindings::get(&pool, &expiring)
            .await
            .unwrap()
            .unwrap()
            .revoked_at,
        Some(revoked_at)
    );

    // The platform's unbind after expiry finds nothing left to revoke and removes the row.
    succeeded(
        &operate(
            &pool,
            &services,
            Operation::Unbind,
            &instance,
            Some(&expiring),
            json!({}),
        )
        .await,
    );
    assert!(bindings::get(&pool, &expiring).await.unwrap().is_none());
}

/// A bind still running when its binding expires is waited for: the revocation comes after it, so a role the
/// bind makes late is not left behind. A revocation that failed for good is queued again after a pause.
#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn revocation_waits_for_a_running_bind_and_pauses_after_failing(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let pool = pool(&opts, 8).await;
    let services = services();
    let instance = insert_instance(&pool, SERVICE, PLAN, json!({}), json!({})).await;
    succeeded(
        &operate(
            &pool,
            &services,
            Operation::Provision,
            &instance,
            None,
            json!({}),
        )
        .await,
    );
    let binding = insert_binding(
        &pool,
        &instance,
        SERVICE,
        PLAN,
        json!({ "expires_in": 600 }),
    )
    .await;
    let mut bind = NewTask::new(Operation::Bind.task_kind(), json!({}));
    bind.instance_id = Some(instance.clone());
    bind.binding_id = Some(binding.clone());
    bind.operation = Some(Operation::Bind);
    let bind = enqueue_with(&pool, bind).await;
    expire_now(&pool, &binding).await;
    assert_eq!(binding_expiry::enqueue_revocations(&pool).await.unwrap(), 0);
    sqlx::query("UPDATE tasks SET state = 'failed', finished_at = now() WHERE id = $1")
        .bind(bind.0)
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(binding_expiry::enqueue_revocations(&pool).await.unwrap(), 1);
    // A revocation that failed for good is queued again after ten minutes, not every pass.
    let fail = |ago: &'static str| {
        let pool = pool.clone();
        async move {
            sqlx::query(&format!(
                "UPDATE tasks SET state = 'failed', finished_at = now() - interval '{ago}' WHERE kind = $1"
            ))
            .bind(kinds::EXPIRE_BINDING)
            .execute(&pool)
            .await
            .unwrap();
        }
    };
    fail("1 minute").await;
    assert_eq!(binding_expiry::enqueue_revocations(&pool).await.unwrap(), 0);
    fail("11 minutes").await;
    assert_eq!(binding_expiry::enqueue_revocations(&pool).await.unwrap(), 1);
}
