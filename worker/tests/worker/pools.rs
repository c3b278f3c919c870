//! Warm pools at the worker and database level: concurrent claims under a barrier never share an item, and the
//! pool check fills a `shared` pool to its target, recycles nothing young, and drains it when the target is
//! gone, leaving nothing on the server.

use std::{sync::Arc, time::Duration};

use berth_worker::Services;
use broker::db::pools;
use sqlx::{
    PgPool,
    postgres::{PgConnectOptions, PgPoolOptions},
};

use crate::helpers::{admin_url, cipher, config, drain, pool, settings};

const SHARED_PLAN: &str = "707a3e6f-f8db-4339-88da-1533837a9810";

fn services_with_targets(targets: &str) -> Arc<Services> {
    let mut settings = settings();
    settings.pool_targets = Some(targets.to_string());
    Arc::new(Services::new(settings, cipher()).expect("services"))
}

async fn ready_items(pool: &PgPool) -> Vec<pools::PoolItem> {
    pools::list(pool)
        .await
        .unwrap()
        .into_iter()
        .filter(|i| i.state == pools::READY)
        .collect()
}

async fn database_exists(name: &str) -> bool {
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect(&admin_url())
        .await
        .unwrap();
    let exists = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
        .bind(name)
        .fetch_one(&admin)
        .await
        .unwrap();
    admin.close().await;
    exists
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn concurrent_claims_never_share_an_item(_: PgPoolOptions, opts: PgConnectOptions) {
    const ITEMS: usize = 3;
    const CLAIMS: usize = 10;
    let pool = pool(&opts, CLAIMS as u32 + 2).await;
    for i in 0..ITEMS {
        sqlx::query(
            "INSERT INTO pool_items (id, plan_id, state, ready_at) VALUES ($1, $2, 'ready', now())",
        )
        .bind(format!("pool-test-{i}"))
        .bind(SHARED_PLAN)
        .execute(&pool)
        .await
        .unwrap();
    }
    // Every claim runs in a transaction that stays open until all have claimed: the row locks are all held at
    // once, so only SKIP LOCKED keeps two from taking the same row.
    let start = Arc::new(tokio::sync::Barrier::new(CLAIMS));
    let claimed = Arc::new(tokio::sync::Barrier::new(CLAIMS));
    let mut handles = Vec::new();
    for _ in 0..CLAIMS {
        let (pool, start, claimed) = (pool.clone(), start.clone(), claimed.clone());
        handles.push(tokio::spawn(async move {
            let mut tx = pool.begin().await.unwrap();
            start.wait().await;
            let item = pools::claim(&mut *tx, SHARED_PLAN, None).await.unwrap();
            claimed.wait().await;
            tx.commit().await.unwrap();
            item.map(|i| i.id)
        }));
    }
    let mut taken = Vec::new();
    for handle in handles {
        if let Some(id) = tokio::time::timeout(Duration::from_secs(30), handle)
            .await
            .expect("no claim waits for another")
            .unwrap()
        {
            taken.push(id);
        }
    }
    taken.sort();
    let before = taken.len();
    taken.dedup();
    assert_eq!(taken.len(), before, "two claims took the same item");
    assert_eq!(taken.len(), ITEMS, "every ready item was taken once");
    assert!(pools::list(&pool).await.unwrap().is_empty());
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn the_check_fills_a_shared_pool_and_drains_it(_: PgPoolOptions, opts: PgConnectOptions) {
    let pool = pool(&opts, 8).await;
    let services = services_with_targets("shared=2");
    let checked = berth_worker::pools::check(&pool, &services).await.unwrap();
    assert_eq!(checked.fills, 2);
    drain(
        &pool,
        services.clone(),
        berth_worker::tasks::registry(),
        config("w1"),
    )
    .await;
    let ready = ready_items(&pool).await;
    assert_eq!(ready.len(), 2, "{ready:?}");
    let databases: Vec<String> = ready
        .iter()
        .map(|i| i.details["database"].as_str().unwrap().to_string())
        .collect();
    for db in &databases {
        assert!(database_exists(db).await, "{db} was not made");
    }
    // Full: another check starts nothing.
    assert_eq!(
        berth_worker::pools::check(&pool, &services).await.unwrap(),
        Default::default()
    );

    // The target is gone: the items are removed, and their databases with them.
    let services = services_with_targets("");
    let checked = berth_worker::pools::check(&pool, &services).await.unwrap();
    assert_eq!(checked.removals, 2);
    drain(
        &pool,
        services,
        berth_worker::tasks::registry(),
        config("w2"),
    )
    .await;
    assert!(pools::list(&pool).await.unwrap().is_empty());
    for db in &databases {
        assert!(!database_exists(db).await, "{db} survived the drain");
    }
}

#[tokio::test]
async fn pool_targets_are_checked_at_start() {
    let mut settings = settings();
    settings.pool_targets = Some("shared=x".into());
    let err = Services::new(settings, cipher()).unwrap_err();
    assert!(format!("{err:#}").contains("whole number"), "{err:#}");
    let services = services_with_targets("shared=3");
    assert_eq!(services.pool_targets.target(SHARED_PLAN), 3);

    // Pools of a preset's clones: `plan/preset` (the newest version) or `plan/preset@version`.
    let services = services_with_targets("shared/orders-demo=2,shared/orders-demo@3=1");
    let targets = &services.pool_targets;
    assert_eq!(targets.target(SHARED_PLAN), 0, "no pool of the defaults");
    assert!(targets.has_pool(SHARED_PLAN) && targets.has_preset_pool(SHARED_PLAN));
    let newest = broker::pools::PresetPin::parse("orders-demo").unwrap();
    let third = broker::pools::PresetPin::parse("orders-demo@3").unwrap();
    assert_eq!(targets.target_of(SHARED_PLAN, Some(&newest)), 2);
    assert_eq!(targets.target_of(SHARED_PLAN, Some(&third)), 1);
    for (bad, says) in [
        ("shared/=1", "preset name"),
        ("shared/orders@0=1", "positive whole number"),
        ("shared/orders@two=1", "positive whole number"),
        ("shared/../etc=1", "preset name"),
        ("shared/orders", "plan/preset[@version]=count"),
    ] {
        let mut bad_settings = crate::helpers::settings();
        bad_settings.pool_targets = Some(bad.into());
        let err = Services::new(bad_settings, cipher()).unwrap_err();
        assert!(format!("{err:#}").contains(says), "{bad}: {err:#}");
    }
}
