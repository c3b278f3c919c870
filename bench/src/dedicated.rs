//! `berth-bench dedicated`: provision→ready of a `dedicated` server on the `local` engine through the real API
//! (PUT, then last_operation polled every 5 ms until `succeeded`), interleaved with its anchor, a bare
//! `initdb` + `pg_ctl start -w` on the same machine with the same initdb flags (data checksums, scram), run
//! as the `postgres` OS user when we are root. Each berth instance is deprovisioned (untimed) before the
//! next round, so one server runs at a time. One unmeasured warm-up of each first.
//!
//!   berth-bench dedicated --url U --username X --password Y --work-dir D [--count N] [--poll-ms 5]

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::{Args, emit, summary};

pub async fn run(args: &Args) -> anyhow::Result<()> {
    let api = Api::from_args(args)?;
    let work = PathBuf::from(args.get("work-dir")?);
    let count: usize = args.num("count", 10)?;
    let (service, plan) = api.plan("dedicated").await?;
    let bin = broker::embedded::find_bin_dir()?;
    let run_as = if is_root() { Some("postgres") } else { None };
    let tag = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();

    let (mut berth, mut bare) = (Vec::with_capacity(count), Vec::with_capacity(count));
    for i in 0..=count {
        let ms = bare_once(&bin, run_as, &work.join(format!("bare-{i}"))).await?;
        if i > 0 {
            bare.push(ms);
        }
        let id = format!("bench-dedicated-{tag}-{i}");
        let ms = api.provision(&service, &plan, &id, json!({})).await?;
        api.deprovision(&service, &plan, &id).await?;
        if i > 0 {
            berth.push(ms);
        }
    }
    let (b50, a50) = (median(&berth), median(&bare));
    let mut line = summary(berth);
    line["anchor"] = summary(bare);
    line["ratio_p50"] = json!(b50 / a50);
    line["poll_ms"] = json!(api.poll.as_millis());
    emit(line, "dedicated");
    eprintln!(
        "dedicated: berth provision→ready p50 {b50:.0} ms, bare initdb + pg_ctl start p50 {a50:.0} ms, ratio {:.2} (target <= 1.3)",
        b50 / a50
    );
    Ok(())
}

pub(crate) fn median(ms: &[f64]) -> f64 {
    let mut v = ms.to_vec();
    v.sort_by(f64::total_cmp);
    crate::percentile(&v, 50.0)
}

pub(crate) fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn command(bin: &Path, run_as: Option<&str>, program: &str) -> tokio::process::Command {
    match run_as {
        Some(user) => {
            let mut cmd = tokio::process::Command::new("runuser");
            cmd.arg("-u").arg(user).arg("--").arg(bin.join(program));
            cmd
        }
        None => tokio::process::Command::new(bin.join(program)),
    }
}

async fn checked(cmd: &mut tokio::process::Command, what: &str) -> anyhow::Result<()> {
    let out = cmd
        .stdout(Stdio::null())
        .output()
        .await
        .with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// initdb + pg_ctl start -w (timed), then stop and remove (untimed).
pub(crate) async fn bare_once(bin: &Path, run_as: Option<&str>, dir: &Path) -> anyhow::Result<f64> {
    std::fs::create_dir_all(dir)?;
    let pwfile = dir.join("pw");
    std::fs::write(&pwfile, "bench-password")?;
    if let Some(user) = run_as {
        checked(
            tokio::process::Command::new("chown")
                .arg("-R")
                .arg(user)
                .arg(dir),
            "chown",
        )
        .await?;
    }
    let data = dir.join("data");
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let t0 = Instant::now();
    checked(
        command(bin, run_as, "initdb")
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "--auth-host=scram-sha-256",
                "--auth-local=trust",
            ])
            .args(["--encoding=UTF8", "--locale=C", "--data-checksums"])
            .arg("--pwfile")
            .arg(&pwfile),
        "initdb",
    )
    .await?;
    checked(
        command(bin, run_as, "pg_ctl")
            .arg("start")
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(dir.join("log"))
            .args(["-w", "-t", "60", "-o"])
            .arg(format!(
                "-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={}",
                data.display()
            )),
        "pg_ctl start",
    )
    .await?;
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    checked(
        command(bin, run_as, "pg_ctl")
            .arg("stop")
            .arg("-D")
            .arg(&data)
            .args(["-m", "fast", "-w"]),
        "pg_ctl stop",
    )
    .await?;
    std::fs::remove_dir_all(dir)?;
    Ok(ms)
}

/// The broker's OSB API, as the benchmarks drive it.
pub(crate) struct Api {
    base: String,
    user: String,
    pass: String,
    pub poll: Duration,
    http: reqwest::Client,
}

impl Api {
    /// `--url`, `--username`, `--password`, `--poll-ms` (5).
    pub(crate) fn from_args(args: &Args) -> anyhow::Result<Self> {
        Ok(Self {
            base: args.get("url")?.trim_end_matches('/').to_string(),
            user: args.get("username")?.to_string(),
            pass: args.get("password")?.to_string(),
            poll: Duration::from_millis(args.num("poll-ms", 5)?),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()?,
        })
    }

    pub(crate) fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base))
            .basic_auth(&self.user, Some(&self.pass))
            .header("X-Broker-API-Version", "2.17")
    }

    /// Service and plan ids of the plan named `name`.
    pub(crate) async fn plan(&self, name: &str) -> anyhow::Result<(String, String)> {
        let catalog: Value = self
            .request(reqwest::Method::GET, "/v2/catalog")
            .send()
            .await?
            .json()
            .await?;
        for service in catalog["services"].as_array().into_iter().flatten() {
            for plan in service["plans"].as_array().into_iter().flatten() {
                if plan["name"] == name {
                    let id = |v: &Value| v.as_str().unwrap_or_default().to_string();
                    return Ok((id(&service["id"]), id(&plan["id"])));
                }
            }
        }
        bail!("no {name} plan in the catalog: start the broker with LOCAL_ENGINE=on")
    }

    /// Polls last_operation until it says succeeded (or 410: gone, after a deprovision).
    pub(crate) async fn wait(&self, id: &str) -> anyhow::Result<()> {
        self.wait_path(&format!("/v2/service_instances/{id}/last_operation"), id)
            .await
    }

    /// Polls a last_operation path until it says succeeded (or 410).
    pub(crate) async fn wait_path(&self, path: &str, id: &str) -> anyhow::Result<()> {
        loop {
            let resp = self.request(reqwest::Method::GET, path).send().await?;
            let status = resp.status();
            if status.as_u16() == 410 {
                return Ok(());
            }
            let body: Value = resp.json().await.unwrap_or(Value::Null);
            match body.get("state").and_then(Value::as_str) {
                Some("succeeded") => return Ok(()),
                Some("failed") => bail!("operation on {id} failed: {body}"),
                _ if !status.is_success() => bail!("last_operation {id}: HTTP {status}: {body}"),
                _ => tokio::time::sleep(self.poll).await,
            }
        }
    }

    /// PUT, then last_operation until succeeded: milliseconds.
    pub(crate) async fn provision(
        &self,
        service: &str,
        plan: &str,
        id: &str,
        parameters: Value,
    ) -> anyhow::Result<f64> {
        let t0 = Instant::now();
        let resp = self
            .request(reqwest::Method::PUT, &format!("/v2/service_instances/{id}?accepts_incomplete=true"))
            .json(&json!({"service_id": service, "plan_id": plan, "organization_guid": "o", "space_guid": "s",
                          "parameters": parameters}))
            .send()
            .await?;
        if resp.status().as_u16() != 202 {
            bail!(
                "provision {id}: HTTP {}: {}",
                resp.status(),
                resp.text().await.unwrap_or_default()
            );
        }
        self.wait(id).await?;
        Ok(t0.elapsed().as_secs_f64() * 1e3)
    }

    pub(crate) async fn deprovision(
        &self,
        service: &str,
        plan: &str,
        id: &str,
    ) -> anyhow::Result<()> {
        let path = format!(
            "/v2/service_instances/{id}?service_id={service}&plan_id={plan}&accepts_incomplete=true"
        );
        let resp = self.request(reqwest::Method::DELETE, &path).send().await?;
        if resp.status().as_u16() != 202 {
            bail!("deprovision {id}: HTTP {}", resp.status());
        }
        self.wait(id).await
    }
}
