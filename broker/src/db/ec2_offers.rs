//! `ec2_offers`: the instance types and prices of each region, as the last worker refresh saw them.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use sqlx::{PgExecutor, PgPool};

use crate::ec2::Offer;

/// Replaces the region's offers in one transaction, so readers see the old set or the new one.
pub async fn replace_region(pool: &PgPool, region: &str, offers: &[Offer]) -> sqlx::Result<()> {
    let mut tx = pool.begin().await?;
    sqlx::query!("DELETE FROM ec2_offers WHERE region = $1", region)
        .execute(&mut *tx)
        .await?;
    let names: Vec<String> = offers.iter().map(|o| o.instance_type.clone()).collect();
    let vcpus: Vec<i32> = offers.iter().map(|o| o.vcpus as i32).collect();
    let memory: Vec<i64> = offers.iter().map(|o| o.memory_mib as i64).collect();
    // Postgres arrays cannot nest ragged: the architectures travel as comma lists and are split back.
    let archs: Vec<String> = offers.iter().map(|o| o.architectures.join(",")).collect();
    let burstable: Vec<bool> = offers.iter().map(|o| o.burstable).collect();
    let storage: Vec<i32> = offers
        .iter()
        .map(|o| o.instance_storage_gb as i32)
        .collect();
    let current: Vec<bool> = offers.iter().map(|o| o.current_generation).collect();
    let spot: Vec<bool> = offers.iter().map(|o| o.spot_supported).collect();
    let spot_prices: Vec<serde_json::Value> = offers
        .iter()
        .map(|o| serde_json::to_value(&o.spot_prices).unwrap_or_default())
        .collect();
    let on_demand: Vec<Option<f64>> = offers.iter().map(|o| o.on_demand_price).collect();
    sqlx::query!(
        "INSERT INTO ec2_offers (region, instance_type, vcpus, memory_mib, architectures, burstable,
                                 instance_storage_gb, current_generation, spot_supported, spot_prices, on_demand_price)
         SELECT $1, t.name, t.vcpus, t.memory, string_to_array(t.archs, ','), t.burstable, t.storage, t.current,
                t.spot, t.spot_prices, t.on_demand
         FROM UNNEST($2::text[], $3::int[], $4::bigint[], $5::text[], $6::bool[], $7::int[], $8::bool[], $9::bool[],
                     $10::jsonb[], $11::float8[])
              AS t(name, vcpus, memory, archs, burstable, storage, current, spot, spot_prices, on_demand)",
        region,
        &names,
        &vcpus,
        &memory,
        &archs,
        &burstable,
        &storage,
        &current,
        &spot,
        &spot_prices,
        &on_demand as &[Option<f64>],
    )
    .execute(&mut *tx)
    .await?;
    sqlx::query!(
        "INSERT INTO ec2_offer_regions (region, refreshed_at, types) VALUES ($1, now(), $2)
         ON CONFLICT (region) DO UPDATE SET refreshed_at = now(), types = EXCLUDED.types",
        region,
        offers.len() as i32,
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await
}

/// When the region was last refreshed, if ever.
pub async fn refreshed_at(
    db: impl PgExecutor<'_>,
    region: &str,
) -> sqlx::Result<Option<DateTime<Utc>>> {
    sqlx::query_scalar!(
        "SELECT refreshed_at FROM ec2_offer_regions WHERE region = $1",
        region
    )
    .fetch_optional(db)
    .await
}

/// The region's offers (empty when it was never refreshed).
pub async fn load_region(db: impl PgExecutor<'_>, region: &str) -> sqlx::Result<Vec<Offer>> {
    let rows = sqlx::query!(
        "SELECT instance_type, vcpus, memory_mib, architectures, burstable, instance_storage_gb,
                current_generation, spot_supported, spot_prices, on_demand_price
         FROM ec2_offers WHERE region = $1 ORDER BY instance_type",
        region
    )
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| Offer {
            instance_type: r.instance_type,
            vcpus: r.vcpus.max(0) as u32,
            memory_mib: r.memory_mib.max(0) as u64,
            architectures: r.architectures,
            burstable: r.burstable,
            instance_storage_gb: r.instance_storage_gb.max(0) as u32,
            current_generation: r.current_generation,
            spot_supported: r.spot_supported,
            spot_prices: serde_json::from_value::<BTreeMap<String, f64>>(r.spot_prices)
                .unwrap_or_default(),
            on_demand_price: r.on_demand_price,
        })
        .collect())
}

/// The regions with cached offers.
pub async fn regions(db: impl PgExecutor<'_>) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar!("SELECT region FROM ec2_offer_regions ORDER BY region")
        .fetch_all(db)
        .await
}
