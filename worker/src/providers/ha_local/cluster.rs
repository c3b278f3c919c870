//! One cluster's processes on this machine: its etcd and one Patroni per member (Patroni runs the member's
//! Postgres). Starting is idempotent (what runs is left alone); stopping escalates from SIGTERM to SIGKILL and
//! waits until nothing of it runs.

use std::{path::Path, time::Duration};

use anyhow::Context as _;
use serde_json::Value;
use sqlx::postgres::{PgConnectOptions, PgSslMode};
use tracing::{info, warn};

use super::{
    config::{self, HOST},
    state::{ClusterState, Layout, Member, Secrets},
};
use crate::providers::{
    local_processes,
    patroni::{Patroni, SUPERUSER, tls},
};

pub struct LocalCluster {
    pub layout: Layout,
    pub state: ClusterState,
    pub secrets: Secrets,
    /// The OS user the processes run as (`postgres` when the worker is root).
    pub run_as: Option<String>,
}

/// A member's REST API base URL.
pub fn api_base(member: &Member) -> String {
    format!("http://{HOST}:{}", member.api_port)
}

impl LocalCluster {
    /// Patroni's REST API on the cluster's members.
    pub fn patroni<'a>(&'a self, http: &'a reqwest::Client) -> Patroni<'a> {
        let bases = self.state.members.iter().map(api_base).collect();
        Patroni::at(http, bases, &self.secrets.restapi)
    }

    /// The folder's ownership, the members' folders and the certificates.
    pub async fn prepare(&self) -> anyhow::Result<()> {
        let root = &self.layout.root;
        std::fs::create_dir_all(self.layout.tls_dir())?;
        for member in &self.state.members {
            std::fs::create_dir_all(self.layout.member_dir(&member.name))?;
        }
        tls::ensure(&self.layout.tls_dir(), &self.state.scope)
            .await
            .context("making the cluster's certificates")?;
        set_mode(root, 0o700)?;
        for member in &self.state.members {
            set_mode(&self.layout.member_dir(&member.name), 0o700)?;
        }
        if let Some(user) = &self.run_as {
            broker::embedded::chown(root, user)?;
        }
        Ok(())
    }

    pub fn etcd_pids(&self) -> Vec<u32> {
        etcd_pids(&self.layout)
    }

    pub fn patroni_pids(&self, name: &str) -> Vec<u32> {
        patroni_pids(&self.layout, name)
    }

    pub fn postgres_pids(&self, name: &str) -> Vec<u32> {
        postgres_pids(&self.layout, name)
    }

    /// Starts etcd unless it runs, and waits until it answers (20 s at most). `true` when it had to start it.
    pub async fn ensure_etcd(&self, http: &reqwest::Client) -> anyhow::Result<bool> {
        let started = self.etcd_pids().is_empty();
        if started {
            let args = config::etcd_args(&self.state, &self.layout);
            let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
            local_processes::spawn_detached(
                self.run_as.as_deref(),
                "etcd",
                &args,
                &self.layout.etcd_log(),
            )
            .await?;
        }
        let url = format!("http://{HOST}:{}/health", self.state.etcd_client_port);
        let waited = tokio::time::Instant::now();
        let deadline = waited + Duration::from_secs(20);
        loop {
            let healthy = match http.get(&url).timeout(Duration::from_secs(1)).send().await {
                Ok(r) => r.json::<Value>().await.is_ok_and(|v| v["health"] == "true"),
                Err(_) => false,
            };
            if healthy {
                return Ok(started);
            }
            // Give a fresh etcd a second to show up in /proc; gone after that, it exited (bad flags, a taken port).
            if started && waited.elapsed() > Duration::from_secs(1) && self.etcd_pids().is_empty() {
                anyhow::bail!("etcd exited at once: {}", log_tail(&self.layout.etcd_log()));
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "etcd did not become healthy on port {} (log {})",
                self.state.etcd_client_port,
                self.layout.etcd_log().display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The pids of etcd and of each member's Patroni (in `state.members`' order), from one look at the processes.
    pub fn running_processes(&self) -> (Vec<u32>, Vec<Vec<u32>>) {
        let etcd = self.layout.etcd_dir();
        let configs: Vec<_> = self
            .state
            .members
            .iter()
            .map(|m| self.layout.member_config(&m.name))
            .collect();
        let mut args: Vec<&Path> = vec![etcd.as_path()];
        args.extend(configs.iter().map(|c| c.as_path()));
        let mut found = local_processes::pids_with_args(&args);
        let patroni = found.split_off(1);
        (found.remove(0), patroni)
    }

    /// Rewrites only the member's Patroni configuration, owned as its folder is (a running Patroni reads it
    /// again on a reload): none of [`Self::ensure_member`]'s folder and process work.
    pub fn write_member_config(&self, member: &Member, dcs: &Value) -> anyhow::Result<()> {
        use std::os::unix::fs::MetadataExt as _;
        let config = config::patroni_config(
            &self.state,
            &self.layout,
            member,
            &self.secrets,
            dcs.clone(),
        );
        let path = self.layout.member_config(&member.name);
        super::state::write_atomic(&path, &serde_json::to_vec_pretty(&config)?)?;
        let folder = std::fs::metadata(self.layout.member_dir(&member.name))?;
        std::os::unix::fs::chown(&path, Some(folder.uid()), Some(folder.gid()))
            .with_context(|| format!("handing {} to the member's owner", path.display()))?;
        Ok(())
    }

    /// Writes the member's Patroni configuration (its `bootstrap.dcs` is `dcs`: used only when the cluster is
    /// first made) and starts Patroni unless it runs; leftovers of a crashed Postgres are ended first, since
    /// they hold its shared memory. `true` when it had to start it.
    pub async fn ensure_member(&self, member: &Member, dcs: &Value) -> anyhow::Result<bool> {
        let path = self.layout.member_config(&member.name);
        let dir = self.layout.member_dir(&member.name);
        if !dir.exists() {
            std::fs::create_dir_all(&dir)?;
            set_mode(&dir, 0o700)?;
        }
        self.write_member_config(member, dcs)?;
        if let Some(user) = &self.run_as {
            broker::embedded::chown(&dir, user)?;
        }
        if !self.patroni_pids(&member.name).is_empty() {
            return Ok(false);
        }
        let name = member.name.clone();
        local_processes::kill(|| self.postgres_pids(&name), Duration::from_secs(10)).await?;
        local_processes::spawn_detached(
            self.run_as.as_deref(),
            "patroni",
            &[path.as_os_str()],
            &self.layout.member_log(&member.name),
        )
        .await?;
        Ok(true)
    }

    /// Stops a member: Patroni first (it stops its Postgres, handing over leadership if it has it), then
    /// whatever is left.
    pub async fn stop_member(&self, name: &str) -> anyhow::Result<()> {
        local_processes::stop(|| self.patroni_pids(name), Duration::from_secs(30)).await?;
        local_processes::stop(|| self.postgres_pids(name), Duration::from_secs(10)).await
    }

    /// Superuser connect options for `database` on the member listening on `port`, verifying the cluster's CA.
    pub fn superuser(&self, port: u16, database: &str) -> PgConnectOptions {
        PgConnectOptions::new()
            .host(HOST)
            .port(port)
            .username(SUPERUSER)
            .password(&self.secrets.superuser)
            .database(database)
            .ssl_mode(PgSslMode::VerifyCa)
            .ssl_root_cert(self.layout.ca_cert())
            .application_name("berth-worker")
    }

    /// Removes a member's folder (after [`Self::stop_member`]).
    pub fn remove_member_files(&self, name: &str) -> anyhow::Result<()> {
        let dir = self.layout.member_dir(name);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        }
        Ok(())
    }

    /// Wipes a member's data so Patroni clones it from the primary again (a member that cannot start).
    pub async fn replace_member(&self, member: &Member, dcs: &Value) -> anyhow::Result<()> {
        warn!(scope = %self.state.scope, member = %member.name, "replacing a member that cannot start: new data from the primary");
        self.stop_member(&member.name).await?;
        let data = self.layout.member_data(&member.name);
        if data.exists() {
            std::fs::remove_dir_all(&data)
                .with_context(|| format!("removing {}", data.display()))?;
        }
        self.ensure_member(member, dcs).await?;
        info!(scope = %self.state.scope, member = %member.name, "member replaced");
        Ok(())
    }
}

/// The last lines of a log, for an error message.
fn log_tail(path: &std::path::Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(5).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join("\n")
}

fn etcd_pids(layout: &Layout) -> Vec<u32> {
    local_processes::pids_with_arg(&layout.etcd_dir())
}

fn patroni_pids(layout: &Layout, name: &str) -> Vec<u32> {
    local_processes::pids_with_arg(&layout.member_config(name))
}

/// Postgres processes of a member (a postmaster and backends, orphaned ones included).
fn postgres_pids(layout: &Layout, name: &str) -> Vec<u32> {
    local_processes::processes_in(&layout.member_data(name))
}

/// Stops every process of the cluster in `layout`'s folder, whatever its state file says (a half-built one
/// too): the members' Patroni together (they stop their Postgres), then anything left, then etcd.
pub async fn stop_all(layout: &Layout) -> anyhow::Result<()> {
    let names: Vec<String> = member_folders(layout);
    let patroni = || {
        names
            .iter()
            .flat_map(|n| patroni_pids(layout, n))
            .collect::<Vec<_>>()
    };
    local_processes::stop(patroni, Duration::from_secs(30)).await?;
    local_processes::stop(
        || local_processes::processes_in(&layout.root),
        Duration::from_secs(10),
    )
    .await?;
    local_processes::stop(|| etcd_pids(layout), Duration::from_secs(10)).await
}

/// Names of the member folders present (`m<n>`), whatever the state file says: a deprovision stops them all.
fn member_folders(layout: &Layout) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(&layout.root) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| {
            n.strip_prefix('m')
                .is_some_and(|d| !d.is_empty() && d.chars().all(|c| c.is_ascii_digit()))
        })
        .collect()
}

fn set_mode(path: &std::path::Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", path.display()))
}
