//! `berth-bench pools`: provision→`succeeded` of the `shared`, `dedicated` and `ha` plans taken from a warm pool,
//! or (`--pooled false`, a broker without pools) built from nothing, each round beside its anchor on the same
//! machine: a bare `CREATE ROLE` + `CREATE DATABASE` on the shared server for `shared`, a bare `initdb` +
//! `pg_ctl start -w` for `dedicated` (`ha` has no bare anchor: its figure without a pool is the comparison).
//! Rounds are sequential; with a pool each round first waits until the pool is full (so every provision finds it
//! warm), and after each take records how long the pool took to be full again. Each instance is deprovisioned
//! (untimed) before the next round. With a pool, also: how long a drained pool takes to fill again (all its items
//! taken at once), and the synchronous answer (`201` without `accepts_incomplete`).
//!
//!   berth-bench pools --url U --username X --password Y --pg-url PG --work-dir D --targets shared=2,dedicated=2
//!                     [--pooled true] [--count N] [--poll-ms 5]

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use serde_json::json;
use sqlx::{Connection, PgConnection};

use crate::{
    Args, ddl_once,
    dedicated::{Api, bare_once, is_root, median},
    emit, summary,
};

pub async fn run(args: &Args) -> anyhow::Result<()> {
    let api = Api::from_args(args)?;
    let work = PathBuf::from(args.get("work-dir")?);
    let count: usize = args.num("count", 20)?;
    let pooled = args.opt("pooled") != Some("false");
    let mut pg = PgConnection::connect(args.get("pg-url")?)
        .await
        .context("connecting to the bench Postgres")?;
    let targets: Vec<(String, usize)> = args
        .get("targets")?
        .split(',')
        .filter_map(|p| {
            let (plan, n) = p.split_once('=')?;
            Some((plan.trim().to_string(), n.trim().parse().ok()?))
        })
        .collect();
    let bin = broker::embedded::find_bin_dir()?;
    let run_as = if is_root() { Some("postgres") } else { None };
    let tag = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();

    for (plan_name, target) in &targets {
        let (service, plan) = api.plan(plan_name).await?;
        let (mut berth, mut anchor, mut refill, mut sync) = (vec![], vec![], vec![], vec![]);
        for i in 0..=count {
            let ms = match plan_name.as_str() {
                "dedicated" => {
                    Some(bare_once(&bin, run_as, &work.join(format!("bare-{i}"))).await?)
                }
                "shared" => {
                    Some(ddl_once(&mut pg, &format!("pool_ddl_{tag}_{plan_name}_{i}")).await?)
                }
                _ => None,
            };
            if pooled {
                wait_full(&api, plan_name, *target).await?;
            }
            let id = format!("bench-pool-{tag}-{plan_name}-{i}");
            let ms_berth = api.provision(&service, &plan, &id, json!({})).await?;
            // The refill after this take, timed from the provision's success (the anchor's time, spent before
            // the next round, must not hide it).
            if pooled && i > 0 {
                refill.push(wait_full(&api, plan_name, *target).await?);
            }
            api.deprovision(&service, &plan, &id).await?;
            if i > 0 {
                anchor.extend(ms);
                berth.push(ms_berth);
            }
            if pooled && i > 0 {
                wait_full(&api, plan_name, *target).await?;
                let id = format!("bench-pool-sync-{tag}-{plan_name}-{i}");
                sync.push(provision_sync(&api, &service, &plan, &id).await?);
                api.deprovision(&service, &plan, &id).await?;
            }
        }
        let b50 = median(&berth);
        let a50 = (!anchor.is_empty()).then(|| median(&anchor));
        let mut line = summary(berth);
        line["plan"] = json!(plan_name);
        line["pooled"] = json!(pooled);
        line["anchor"] = if anchor.is_empty() {
            json!(null)
        } else {
            summary(anchor)
        };
        line["ratio_p50"] = json!(a50.map(|a| b50 / a));
        line["poll_ms"] = json!(api.poll.as_millis());
        if pooled {
            line["target"] = json!(target);
            line["refill_one"] = summary(refill);
            line["sync_201"] = summary(sync);
            line["refill_drained_ms"] =
                json!(drained_refill(&api, &service, &plan, plan_name, *target, &tag).await?);
        }
        eprintln!(
            "pools: {plan_name} ({}) provision→succeeded p50 {b50:.1} ms, anchor p50 {}",
            if pooled { "from the pool" } else { "no pool" },
            a50.map_or("none".to_string(), |a| format!("{a:.1} ms"))
        );
        emit(line, "pools");
    }
    Ok(())
}

/// Takes every item of the pool at once, then milliseconds until the pool is full again.
async fn drained_refill(
    api: &Api,
    service: &str,
    plan: &str,
    plan_name: &str,
    target: usize,
    tag: &str,
) -> anyhow::Result<f64> {
    wait_full(api, plan_name, target).await?;
    let ids: Vec<String> = (0..target)
        .map(|i| format!("bench-pool-drain-{tag}-{plan_name}-{i}"))
        .collect();
    for id in &ids {
        api.provision(service, plan, id, json!({})).await?;
    }
    let t0 = Instant::now();
    wait_full(api, plan_name, target).await?;
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    for id in &ids {
        api.deprovision(service, plan, id).await?;
    }
    Ok(ms)
}

/// PUT without `accepts_incomplete`: milliseconds to the `201`.
async fn provision_sync(api: &Api, service: &str, plan: &str, id: &str) -> anyhow::Result<f64> {
    let t0 = Instant::now();
    let resp = api
        .request(reqwest::Method::PUT, &format!("/v2/service_instances/{id}"))
        .json(&json!({"service_id": service, "plan_id": plan, "organization_guid": "o", "space_guid": "s"}))
        .send()
        .await?;
    let status = resp.status().as_u16();
    if status != 201 {
        bail!(
            "provision {id} without accepts_incomplete: HTTP {status}: {}",
            resp.text().await.unwrap_or_default()
        );
    }
    Ok(t0.elapsed().as_secs_f64() * 1e3)
}

/// Waits until `/metrics` shows `target` ready items for the plan; milliseconds waited.
async fn wait_full(api: &Api, plan_name: &str, target: usize) -> anyhow::Result<f64> {
    let t0 = Instant::now();
    let wanted = format!("plan=\"{plan_name}\",state=\"ready\"");
    loop {
        let text = api
            .request(reqwest::Method::GET, "/metrics")
            .send()
            .await?
            .text()
            .await?;
        let ready = text
            .lines()
            .filter(|l| l.starts_with("berth_pool_items{") && l.contains(&wanted))
            .find_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0);
        if ready as usize >= target {
            return Ok(t0.elapsed().as_secs_f64() * 1e3);
        }
        if t0.elapsed() > Duration::from_secs(300) {
            bail!("the {plan_name} pool did not fill to {target} within 300 s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
