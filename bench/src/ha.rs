//! `berth-bench ha`: an `ha` cluster (3 members, synchronous) on the `ha_local` engine through the real
//! binaries, `--count` rounds of: provision→ready (PUT, then last_operation polled until `succeeded`), bind,
//! then kill -9 of the primary's Patroni and postmaster and the time until a write through the binding's
//! multi-host DATABASE_URL succeeds again (libpq's psql, tried every 50 ms). Each cluster is deprovisioned
//! (untimed) before the next. `bench/run.sh ha` runs it against a broker with berth's Patroni timings and
//! one with the seed's (HA_PATRONI_TTL=30 …), which is the anchor.
//!
//!   berth-bench ha --url U --username X --password Y --servers-dir D --name-prefix P --label L [--count N]

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::{
    Args,
    dedicated::{Api, median},
    emit, summary,
};

pub async fn run(args: &Args) -> anyhow::Result<()> {
    let api = Api::from_args(args)?;
    let servers = PathBuf::from(args.get("servers-dir")?);
    let prefix = args.get("name-prefix")?.to_string();
    let label = args.get("label")?.to_string();
    let count: usize = args.num("count", 5)?;
    let (service, plan) = api.plan("ha").await?;
    let tag = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
    let (mut provision, mut failover) = (Vec::new(), Vec::new());
    for i in 0..count {
        let id = format!("bench-ha-{tag}-{i}");
        let ms = api
            .provision(
                &service,
                &plan,
                &id,
                json!({"members": 3, "synchronous": true}),
            )
            .await?;
        provision.push(ms);
        let url = bind(&api, &service, &plan, &id).await?;
        psql(
            &url,
            "CREATE TABLE IF NOT EXISTS beat (at timestamptz DEFAULT now())",
        )?;
        let root = servers.join(broker::names::instance_cluster(&prefix, &id));
        let ms = crash_and_failover(&root, &url).await?;
        eprintln!(
            "ha [{label}] round {}: provision→ready {:.1} s, failover {:.1} s",
            i + 1,
            provision[i] / 1e3,
            ms / 1e3
        );
        failover.push(ms);
        api.deprovision(&service, &plan, &id).await?;
    }
    let (p50, f50) = (median(&provision), median(&failover));
    let mut line = json!({ "label": label });
    line["provision"] = summary(provision);
    line["failover"] = summary(failover);
    emit(line, "ha");
    eprintln!(
        "ha [{label}]: provision→ready p50 {:.1} s, crash failover p50 {:.1} s",
        p50 / 1e3,
        f50 / 1e3
    );
    Ok(())
}

/// Binds and returns the binding's DATABASE_URL.
async fn bind(api: &Api, service: &str, plan: &str, id: &str) -> anyhow::Result<String> {
    let path = format!("/v2/service_instances/{id}/service_bindings/bench");
    let resp = api
        .request(
            reqwest::Method::PUT,
            &format!("{path}?accepts_incomplete=true"),
        )
        .json(&json!({"service_id": service, "plan_id": plan}))
        .send()
        .await?;
    if resp.status().as_u16() != 202 {
        bail!(
            "bind {id}: HTTP {}: {}",
            resp.status(),
            resp.text().await.unwrap_or_default()
        );
    }
    api.wait_path(&format!("{path}/last_operation"), id).await?;
    let binding: Value = api
        .request(reqwest::Method::GET, &path)
        .send()
        .await?
        .json()
        .await?;
    binding["credentials"]["DATABASE_URL"]
        .as_str()
        .map(str::to_string)
        .context("the binding has no DATABASE_URL")
}

fn psql(url: &str, sql: &str) -> anyhow::Result<()> {
    let bin = broker::embedded::find_bin_dir()?.join("psql");
    let out = std::process::Command::new(bin)
        .arg(url)
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .env("PGCONNECT_TIMEOUT", "2")
        .output()?;
    if !out.status.success() {
        bail!("{}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Kills the primary's Patroni and postmaster, then times until a write through `url` succeeds.
async fn crash_and_failover(root: &Path, url: &str) -> anyhow::Result<f64> {
    let state: Value = serde_json::from_slice(&std::fs::read(root.join("cluster.json"))?)?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()?;
    let mut leader = None;
    for member in state["members"].as_array().into_iter().flatten() {
        let cluster = http
            .get(format!("http://127.0.0.1:{}/cluster", member["api_port"]))
            .send()
            .await;
        if let Ok(cluster) = cluster
            && let Ok(view) = cluster.json::<Value>().await
        {
            leader = view["members"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|m| m["role"] == "leader")
                .and_then(|m| m["name"].as_str().map(str::to_string));
            break;
        }
    }
    let leader = leader.context("no leader in Patroni's /cluster")?;
    let config = root.join(&leader).join("patroni.yml");
    let mut pids = pids_with_arg(&config);
    let postmaster = std::fs::read_to_string(root.join(&leader).join("data/postmaster.pid"))?;
    pids.push(
        postmaster
            .lines()
            .next()
            .unwrap_or_default()
            .trim()
            .parse()?,
    );
    let t0 = Instant::now();
    for pid in &pids {
        std::process::Command::new("kill")
            .arg("-KILL")
            .arg(pid.to_string())
            .status()?;
    }
    loop {
        if psql(url, "INSERT INTO beat DEFAULT VALUES").is_ok() {
            return Ok(t0.elapsed().as_secs_f64() * 1e3);
        }
        if t0.elapsed() > Duration::from_secs(180) {
            bail!("no write through DATABASE_URL within 180 s of the crash");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Pids of processes (not the runuser/setsid wrappers) with `arg` among their arguments.
fn pids_with_arg(arg: &Path) -> Vec<u32> {
    let arg = arg.as_os_str().as_encoded_bytes();
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.split(|b| *b == 0).skip(1).any(|a| a == arg))
        })
        .collect()
}
