//! `berth-bench ec2-reconcile`: the cost of the ec2 engine's reconcile loop per instance and cycle, with
//! `--count` provisioned instances whose VMs run on moto (launched by bench/run.sh with boto3, ids in
//! `--vm-ids FILE`). berth's pass lists the instances a page at a time and asks EC2 about every berth VM of the
//! region in one DescribeInstances page (1,000 VMs a page); the anchor asks about each VM on its own, as a
//! per-instance check would.
//!
//!   berth-bench ec2-reconcile --database-url U --moto-url M --key K --secret S --vm-ids FILE [--cycles 5]

use std::{sync::Arc, time::Instant};

use anyhow::Context as _;
use berth_worker::{Services, providers::ec2_postgres::Ec2Postgres};
use serde_json::json;
use sqlx::postgres::PgPoolOptions;

use crate::Args;

const SPOT_PLAN: &str = "8c4b2a71-3e5d-4f60-9a1b-7d2e6c0f5a13";
const REGION: &str = "us-east-1";

pub async fn run(args: &Args) -> anyhow::Result<()> {
    let cycles: usize = args.num("cycles", 5)?;
    let vm_ids: Vec<String> = std::fs::read_to_string(args.get("vm-ids")?)
        .context("reading --vm-ids")?
        .split_whitespace()
        .map(str::to_string)
        .collect();
    let count = vm_ids.len();
    anyhow::ensure!(count > 0, "no VM ids in --vm-ids");
    let pool = PgPoolOptions::new()
        .max_connections(8)
        .connect(args.get("database-url")?)
        .await?;
    broker::MIGRATOR.run(&pool).await?;
    let settings = serde_json::from_value(json!({
        "plans_dir": concat!(env!("CARGO_MANIFEST_DIR"), "/../plans"),
        "aws_region": REGION, "aws_endpoint_url": args.get("moto-url")?,
        "aws_access_key_id": args.get("key")?, "aws_secret_access_key": args.get("secret")?,
        "ec2_readiness_probe": false,
    }))?;
    let engine = Ec2Postgres::new(&settings)?;
    let key = broker::crypto::Cipher::from_key(&[1; 32]);
    let services = Arc::new(Services::new(settings, key)?);

    // Provisioned instances, one per VM, as a provision leaves them.
    sqlx::query(
        "INSERT INTO service_instances (id, service_id, plan_id, organization_guid, space_guid, details)
         SELECT 'bench-' || lpad(n::text, 6, '0'), '3bdd3b6c-801f-470b-a45f-bc1849fa2124', $1, 'o', 's',
                jsonb_build_object('ready_at', now(), 'host', '10.0.0.1',
                    'ec2', jsonb_build_object('region', $2::text, 'zone', 'us-east-1a', 'vm_id', vm))
         FROM unnest($3::text[]) WITH ORDINALITY AS t(vm, n)",
    )
    .bind(SPOT_PLAN)
    .bind(REGION)
    .bind(&vm_ids)
    .execute(&pool)
    .await?;

    // A first pass warms connections; then the timed ones.
    engine.reconcile_cycle(&pool, &services).await?;
    let mut ms = Vec::new();
    let mut own_ms = Vec::new();
    let mut calls = 0;
    for _ in 0..cycles {
        let t0 = Instant::now();
        let cycle = engine.reconcile_cycle(&pool, &services).await?;
        ms.push(t0.elapsed().as_secs_f64() * 1e3);
        own_ms.push(t0.elapsed().as_secs_f64() * 1e3 - cycle.describe_ms);
        anyhow::ensure!(
            cycle.instances == count,
            "the pass saw {} of {count} instances",
            cycle.instances
        );
        anyhow::ensure!(
            cycle.recovering == 0,
            "{} instances looked evicted",
            cycle.recovering
        );
        calls = cycle.describe_calls;
    }
    ms.sort_by(f64::total_cmp);
    own_ms.sort_by(f64::total_cmp);
    let berth_ms = ms[ms.len() / 2];
    let berth_own_ms = own_ms[own_ms.len() / 2];

    // The anchor: one DescribeInstances per VM.
    let t0 = Instant::now();
    for id in &vm_ids {
        let state = engine
            .vm_state(REGION, id)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        anyhow::ensure!(state.as_deref() == Some("running"), "VM {id} is {state:?}");
    }
    let anchor_ms = t0.elapsed().as_secs_f64() * 1e3;
    println!(
        "{}",
        json!({
            "part": "ec2_reconcile", "instances": count, "cycles": cycles,
            "cycle_ms_p50": berth_ms, "ms_per_instance": berth_ms / count as f64, "describe_calls_per_cycle": calls,
            "own_ms_p50": berth_own_ms, "own_ms_per_instance": berth_own_ms / count as f64,
            "anchor": { "cycle_ms": anchor_ms, "ms_per_instance": anchor_ms / count as f64, "describe_calls_per_cycle": count },
            "ratio": berth_ms / anchor_ms,
        })
    );
    Ok(())
}
