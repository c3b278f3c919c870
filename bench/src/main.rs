//! `berth-bench`: the measuring half of `bench/run.sh`. Each subcommand prints one JSON line per figure on
//! stdout; `report` turns the collected lines into the final table.
//!
//!   berth-bench queue --database-url U --backlog B --sample N --workers 1,4 [--concurrency C] [--label L]
//!   berth-bench provision --url U --username X --password Y [--count N] [--pg-url U (interleaved anchor)]
//!   berth-bench ddl --pg-url U [--count N]
//!   berth-bench dedicated --url U --username X --password Y --work-dir D [--count N]   (bench/src/dedicated.rs)
//!   berth-bench snapshot-seal | snapshot-cycle ...                                     (bench/src/snapshots.rs)
//!   berth-bench ec2-reconcile --database-url U --moto-url M --key K --secret S --vm-ids FILE   (bench/src/ec2.rs)
//!   berth-bench ha --url U --username X --password Y --servers-dir D --name-prefix P --label L [--count N]
//!   berth-bench pools --url U --username X --password Y --pg-url PG --work-dir D --targets shared=2,dedicated=2
//!                     [--pooled false] [--count N]                                  (bench/src/pools.rs)
//!   berth-bench report FILE
//!   berth-bench gen-key FILE          (a master key for the broker processes)

mod dedicated;
mod ec2;
mod ha;
mod pools;
mod queue;
mod report;
mod snapshots;

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use serde_json::{Value, json};
use sqlx::{Connection, PgConnection};

const SERVICE_ID: &str = "3bdd3b6c-801f-470b-a45f-bc1849fa2124";
const SHARED_PLAN_ID: &str = "707a3e6f-f8db-4339-88da-1533837a9810";

/// `--name value` pairs after the subcommand.
pub struct Args(HashMap<String, String>);

impl Args {
    fn parse(raw: &[String]) -> anyhow::Result<Self> {
        let mut map = HashMap::new();
        let mut it = raw.iter();
        while let Some(key) = it.next() {
            let Some(name) = key.strip_prefix("--") else {
                bail!("unexpected argument {key}")
            };
            let value = it.next().with_context(|| format!("{key} needs a value"))?;
            map.insert(name.to_string(), value.clone());
        }
        Ok(Self(map))
    }

    pub fn get(&self, name: &str) -> anyhow::Result<&str> {
        self.0
            .get(name)
            .map(String::as_str)
            .with_context(|| format!("--{name} is required"))
    }

    pub fn num<T: std::str::FromStr>(&self, name: &str, default: T) -> anyhow::Result<T> {
        match self.0.get(name) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| anyhow::anyhow!("--{name}: not a number: {v}")),
        }
    }

    pub fn opt(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }
}

/// Nearest-rank percentile of sorted samples.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn summary(mut ms: Vec<f64>) -> Value {
    ms.sort_by(f64::total_cmp);
    let mean = ms.iter().sum::<f64>() / ms.len() as f64;
    json!({
        "count": ms.len(),
        "p50_ms": percentile(&ms, 50.0),
        "p99_ms": percentile(&ms, 99.0),
        "mean_ms": mean,
        "min_ms": ms.first(),
        "max_ms": ms.last(),
    })
}

fn emit(mut line: Value, part: &str) {
    line["part"] = json!(part);
    println!("{line}");
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = argv.first() else {
        bail!("usage: berth-bench queue|provision|ddl|report ...")
    };
    match cmd.as_str() {
        "report" => report::print(argv.get(1).context("report FILE")?),
        "gen-key" => broker::crypto::generate_key_file(std::path::Path::new(
            argv.get(1).context("gen-key FILE")?,
        )),
        "queue" => queue::run(&Args::parse(&argv[1..])?).await,
        "provision" => provision(&Args::parse(&argv[1..])?).await,
        "ddl" => ddl(&Args::parse(&argv[1..])?).await,
        "dedicated" => dedicated::run(&Args::parse(&argv[1..])?).await,
        "snapshot-seal" => snapshots::seal(&Args::parse(&argv[1..])?),
        "snapshot-cycle" => snapshots::cycle(&Args::parse(&argv[1..])?).await,
        "ec2-reconcile" => ec2::run(&Args::parse(&argv[1..])?).await,
        "ha" => ha::run(&Args::parse(&argv[1..])?).await,
        "pools" => pools::run(&Args::parse(&argv[1..])?).await,
        other => bail!("unknown subcommand {other}"),
    }
}

/// Sequential `shared` provisions on an idle broker: PUT (async), then GET last_operation every 5 ms until
/// it says succeeded. With `--pg-url`, each provision alternates with one bare `CREATE ROLE` + `CREATE DATABASE`
/// (the anchor), so both see the same server conditions. One unmeasured warm-up of each first.
async fn provision(args: &Args) -> anyhow::Result<()> {
    let target = Target {
        base: args.get("url")?.trim_end_matches('/').to_string(),
        user: args.get("username")?.to_string(),
        pass: args.get("password")?.to_string(),
        poll: Duration::from_millis(args.num("poll-ms", 5)?),
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()?,
    };
    let count: usize = args.num("count", 30)?;
    let mut anchor = match args.opt("pg-url") {
        Some(url) => Some(
            PgConnection::connect(url)
                .await
                .context("connecting to the bench Postgres")?,
        ),
        None => None,
    };
    let tag = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
    let (mut berth, mut ddl_ms) = (Vec::with_capacity(count), Vec::with_capacity(count));
    for i in 0..=count {
        if let Some(conn) = anchor.as_mut() {
            let ms = ddl_once(conn, &format!("ddl_{tag}_{i}")).await?;
            if i > 0 {
                ddl_ms.push(ms);
            }
        }
        let ms = target.provision_once(&format!("bench-{tag}-{i}")).await?;
        if i > 0 {
            berth.push(ms);
        }
    }
    let mut line = summary(berth);
    line["poll_ms"] = json!(target.poll.as_millis());
    line["interleaved"] = json!(anchor.is_some());
    emit(line, "provision");
    if anchor.is_some() {
        let mut line = summary(ddl_ms);
        line["interleaved"] = json!(true);
        emit(line, "ddl");
    }
    Ok(())
}

struct Target {
    base: String,
    user: String,
    pass: String,
    poll: Duration,
    http: reqwest::Client,
}

impl Target {
    /// Milliseconds from the PUT to a last_operation that says succeeded.
    async fn provision_once(&self, id: &str) -> anyhow::Result<f64> {
        let base = &self.base;
        let t0 = Instant::now();
        let resp = self
            .http
            .put(format!(
                "{base}/v2/service_instances/{id}?accepts_incomplete=true"
            ))
            .basic_auth(&self.user, Some(&self.pass))
            .header("X-Broker-API-Version", "2.17")
            .json(&json!({"service_id": SERVICE_ID, "plan_id": SHARED_PLAN_ID,
                          "organization_guid": "o", "space_guid": "s"}))
            .send()
            .await?;
        let status = resp.status().as_u16();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        match status {
            201 => return Ok(t0.elapsed().as_secs_f64() * 1e3),
            202 => {}
            _ => bail!("provision {id}: HTTP {status}: {body}"),
        }
        let mut url = format!("{base}/v2/service_instances/{id}/last_operation");
        if let Some(op) = body.get("operation").and_then(Value::as_str) {
            url = format!("{url}?operation={op}");
        }
        let deadline = t0 + Duration::from_secs(60);
        loop {
            let r = self
                .http
                .get(&url)
                .basic_auth(&self.user, Some(&self.pass))
                .header("X-Broker-API-Version", "2.17")
                .send()
                .await?;
            let st = r.status();
            let b: Value = r.json().await.unwrap_or(Value::Null);
            match b.get("state").and_then(Value::as_str) {
                Some("succeeded") => return Ok(t0.elapsed().as_secs_f64() * 1e3),
                Some("failed") => bail!("provision {id} failed: {b}"),
                _ if !st.is_success() => bail!("last_operation {id}: HTTP {st}: {b}"),
                _ => {}
            }
            if Instant::now() > deadline {
                bail!("provision {id} not done within 60 s");
            }
            tokio::time::sleep(self.poll).await;
        }
    }
}

/// Milliseconds for `CREATE ROLE name LOGIN PASSWORD …` + `CREATE DATABASE name OWNER name`.
async fn ddl_once(conn: &mut PgConnection, name: &str) -> anyhow::Result<f64> {
    let t0 = Instant::now();
    sqlx::raw_sql(&format!("CREATE ROLE {name} LOGIN PASSWORD 'pw-{name}'"))
        .execute(&mut *conn)
        .await?;
    sqlx::raw_sql(&format!("CREATE DATABASE {name} OWNER {name}"))
        .execute(&mut *conn)
        .await?;
    Ok(t0.elapsed().as_secs_f64() * 1e3)
}

/// The limit for a provision alone: `CREATE ROLE` + `CREATE DATABASE` on an open superuser connection,
/// sequentially. One unmeasured warm-up first.
async fn ddl(args: &Args) -> anyhow::Result<()> {
    let count: usize = args.num("count", 30)?;
    let mut conn = PgConnection::connect(args.get("pg-url")?)
        .await
        .context("connecting to the bench Postgres")?;
    let tag = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
    let mut samples = Vec::with_capacity(count);
    for i in 0..=count {
        let ms = ddl_once(&mut conn, &format!("ddl_{tag}_{i}")).await?;
        if i > 0 {
            samples.push(ms);
        }
    }
    emit(summary(samples), "ddl");
    Ok(())
}
