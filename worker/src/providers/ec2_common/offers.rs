//! Keeps the broker database's cache of a region's instance types and prices fresh (`ec2_offers`): every type
//! from DescribeInstanceTypes, the latest spot price per zone from DescribeSpotPriceHistory, and the on-demand
//! price from the operator's list. The worker picks types from it and the API's price check reads it.

use std::collections::{BTreeMap, HashMap};

use anyhow::Context as _;
use aws_sdk_ec2::{
    Client,
    primitives::DateTime,
    types::{InstanceTypeInfo, UsageClassType},
};
use broker::{db::ec2_offers, ec2::Offer};
use sqlx::PgPool;

use super::errors::classify;
use crate::registry::TaskError;

/// The on-demand list shipped with berth: approximate us-east-1 Linux list prices (USD/hour) of common types.
const DEFAULT_ON_DEMAND: &str = include_str!("on-demand-prices.json");

pub fn on_demand_prices(file: Option<&std::path::Path>) -> anyhow::Result<HashMap<String, f64>> {
    let text = match file {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("reading EC2_ON_DEMAND_PRICES_FILE {}", path.display()))?,
        None => DEFAULT_ON_DEMAND.to_string(),
    };
    serde_json::from_str(&text)
        .context("the on-demand price list must be a JSON object of type -> USD/hour")
}

/// Every instance type of the region with its prices, straight from EC2.
pub async fn fetch(
    client: &Client,
    on_demand: &HashMap<String, f64>,
) -> Result<Vec<Offer>, TaskError> {
    let mut offers = instance_types(client, on_demand).await?;
    let index: HashMap<String, usize> = offers
        .iter()
        .enumerate()
        .map(|(i, o)| (o.instance_type.clone(), i))
        .collect();
    for ((name, zone), price) in spot_prices(client).await? {
        if let Some(&i) = index.get(&name) {
            offers[i].spot_prices.insert(zone, price);
        }
    }
    Ok(offers)
}

/// Every instance type of the region, with its on-demand price from the operator's list (no spot prices yet).
async fn instance_types(
    client: &Client,
    on_demand: &HashMap<String, f64>,
) -> Result<Vec<Offer>, TaskError> {
    let mut offers = Vec::new();
    let mut pages = client
        .describe_instance_types()
        .max_results(100)
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        let page = page.map_err(|e| classify(e, "listing instance types"))?;
        offers.extend(
            page.instance_types()
                .iter()
                .filter_map(|t| offer(t, on_demand)),
        );
    }
    Ok(offers)
}

fn offer(t: &InstanceTypeInfo, on_demand: &HashMap<String, f64>) -> Option<Offer> {
    let name = t.instance_type()?.as_str().to_string();
    Some(Offer {
        vcpus: t
            .v_cpu_info()
            .and_then(|v| v.default_v_cpus())
            .unwrap_or(0)
            .max(0) as u32,
        memory_mib: t
            .memory_info()
            .and_then(|m| m.size_in_mib())
            .unwrap_or(0)
            .max(0) as u64,
        architectures: t
            .processor_info()
            .map(|p| {
                p.supported_architectures()
                    .iter()
                    .map(|a| a.as_str().to_string())
                    .collect()
            })
            .unwrap_or_default(),
        burstable: t.burstable_performance_supported().unwrap_or(false),
        instance_storage_gb: t
            .instance_storage_info()
            .and_then(|s| s.total_size_in_gb())
            .unwrap_or(0)
            .max(0) as u32,
        current_generation: t.current_generation().unwrap_or(false),
        spot_supported: t.supported_usage_classes().contains(&UsageClassType::Spot),
        spot_prices: BTreeMap::new(),
        on_demand_price: on_demand.get(&name).copied(),
        instance_type: name,
    })
}

/// The latest spot price per (type, zone): history from now on holds the price in force now.
async fn spot_prices(client: &Client) -> Result<HashMap<(String, String), f64>, TaskError> {
    let mut latest: HashMap<(String, String), (i64, f64)> = HashMap::new();
    let now = DateTime::from_secs(chrono::Utc::now().timestamp());
    let mut pages = client
        .describe_spot_price_history()
        .product_descriptions("Linux/UNIX")
        .start_time(now)
        .max_results(1000)
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        let page = page.map_err(|e| classify(e, "reading spot prices"))?;
        for p in page.spot_price_history() {
            let (Some(name), Some(zone), Some(price)) = (
                p.instance_type().map(|t| t.as_str().to_string()),
                p.availability_zone().map(str::to_string),
                p.spot_price().and_then(|s| s.parse::<f64>().ok()),
            ) else {
                continue;
            };
            let at = p.timestamp().map_or(0, |t| t.secs());
            let entry = latest.entry((name, zone)).or_insert((at, price));
            if at > entry.0 {
                *entry = (at, price);
            }
        }
    }
    Ok(latest
        .into_iter()
        .map(|(key, (_, price))| (key, price))
        .collect())
}

/// The region's offers, refreshed first when older than `ttl_secs` (or never fetched).
pub async fn fresh(
    pool: &PgPool,
    client: &Client,
    region: &str,
    ttl_secs: u64,
    on_demand: &HashMap<String, f64>,
) -> Result<Vec<Offer>, TaskError> {
    let at = ec2_offers::refreshed_at(pool, region)
        .await
        .context("reading the offers' age")?;
    let stale = at.is_none_or(|t| (chrono::Utc::now() - t).num_seconds() > ttl_secs as i64);
    if !stale {
        return Ok(ec2_offers::load_region(pool, region)
            .await
            .context("reading cached offers")?);
    }
    let offers = fetch(client, on_demand).await?;
    ec2_offers::replace_region(pool, region, &offers)
        .await
        .context("caching offers")?;
    tracing::info!(
        region,
        types = offers.len(),
        "refreshed EC2 instance types and prices"
    );
    Ok(offers)
}
