//! A cluster's folder on this machine and what it remembers there: `cluster.json` (ports and members, chosen
//! once so a retry finds what the first try made) and `secrets.json` (its generated passwords, mode 0600;
//! Patroni's own config files need them in clear as well). Both are written atomically.
//!
//! ```text
//! <root>/cluster.json  secrets.json  tls/{ca.crt,ca.key,server.crt,server.key}
//!        etcd/ (data)  etcd.log
//!        m1/{patroni.yml, patroni.log, data/}  m2/ ...
//! ```

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use broker::embedded::free_port;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Member {
    pub name: String,
    pub pg_port: u16,
    pub api_port: u16,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterState {
    /// Patroni's scope: the folder's name.
    pub scope: String,
    pub postgres_version: String,
    pub bin_dir: PathBuf,
    pub etcd_client_port: u16,
    pub etcd_peer_port: u16,
    pub members: Vec<Member>,
    /// The number of the next member's name (`m<n>`): names are never reused, so a replacement is never
    /// mistaken for the member it replaces.
    pub next_member: u32,
}

/// The cluster's generated passwords (`secrets.json`).
pub use crate::providers::patroni::Passwords as Secrets;

/// The paths of a cluster folder.
#[derive(Debug, Clone)]
pub struct Layout {
    pub root: PathBuf,
}

impl Layout {
    pub fn new(root: PathBuf) -> Self {
        Self { root }
    }
    pub fn state_file(&self) -> PathBuf {
        self.root.join("cluster.json")
    }
    pub fn secrets_file(&self) -> PathBuf {
        self.root.join("secrets.json")
    }
    pub fn tls_dir(&self) -> PathBuf {
        self.root.join("tls")
    }
    pub fn ca_cert(&self) -> PathBuf {
        self.tls_dir().join("ca.crt")
    }
    pub fn etcd_dir(&self) -> PathBuf {
        self.root.join("etcd")
    }
    pub fn etcd_log(&self) -> PathBuf {
        self.root.join("etcd.log")
    }
    pub fn member_dir(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }
    pub fn member_config(&self, name: &str) -> PathBuf {
        self.member_dir(name).join("patroni.yml")
    }
    pub fn member_data(&self, name: &str) -> PathBuf {
        self.member_dir(name).join("data")
    }
    pub fn member_log(&self, name: &str) -> PathBuf {
        self.member_dir(name).join("patroni.log")
    }

    pub fn load_state(&self) -> anyhow::Result<Option<ClusterState>> {
        read_json(&self.state_file())
    }

    pub fn save_state(&self, state: &ClusterState) -> anyhow::Result<()> {
        write_atomic(&self.state_file(), &serde_json::to_vec_pretty(state)?)
    }

    pub fn load_secrets(&self) -> anyhow::Result<Option<Secrets>> {
        read_json(&self.secrets_file())
    }

    /// The passwords a pooled cluster is moving to while it is adopted (`secrets.next.json`): generated once, so
    /// a retry after a crash sets the same ones.
    pub fn next_secrets_file(&self) -> PathBuf {
        self.root.join("secrets.next.json")
    }

    /// The next passwords, if an earlier try kept them.
    pub fn load_next_secrets(&self) -> anyhow::Result<Option<Secrets>> {
        read_json(&self.next_secrets_file())
    }

    /// Keeps `next` as the next passwords (on disk when this returns).
    pub fn keep_next_secrets(&self, next: &Secrets) -> anyhow::Result<()> {
        write_atomic(&self.next_secrets_file(), &serde_json::to_vec(next)?)
    }

    /// `next` becomes the cluster's passwords (`secrets.json`), and the next ones are forgotten.
    pub fn commit_next_secrets(&self, next: &Secrets) -> anyhow::Result<()> {
        write_atomic(&self.secrets_file(), &serde_json::to_vec(next)?)?;
        match std::fs::remove_file(self.next_secrets_file()) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(anyhow::Error::new(e).context("removing secrets.next.json")),
        }
    }

    /// The secrets, generated and saved on first use.
    pub fn ensure_secrets(&self) -> anyhow::Result<Secrets> {
        if let Some(secrets) = self.load_secrets()? {
            return Ok(secrets);
        }
        let secrets = Secrets::generate();
        write_atomic(&self.secrets_file(), &serde_json::to_vec(&secrets)?)?;
        Ok(secrets)
    }
}

impl ClusterState {
    /// A new cluster of `members` members, each with free ports.
    pub fn new(
        scope: String,
        postgres_version: String,
        bin_dir: PathBuf,
        members: usize,
    ) -> anyhow::Result<Self> {
        let mut state = Self {
            scope,
            postgres_version,
            bin_dir,
            etcd_client_port: free_port()?,
            etcd_peer_port: free_port()?,
            members: Vec::new(),
            next_member: 1,
        };
        for _ in 0..members {
            state.add_member()?;
        }
        Ok(state)
    }

    /// Adds a member with a new name and free ports; returns its name.
    pub fn add_member(&mut self) -> anyhow::Result<String> {
        let taken: Vec<u16> = self
            .members
            .iter()
            .flat_map(|m| [m.pg_port, m.api_port])
            .chain([self.etcd_client_port, self.etcd_peer_port])
            .collect();
        let port = || -> anyhow::Result<u16> {
            for _ in 0..50 {
                let p = free_port()?;
                if !taken.contains(&p) {
                    return Ok(p);
                }
            }
            anyhow::bail!("no free port found")
        };
        let (pg_port, api_port) = (port()?, port()?);
        anyhow::ensure!(pg_port != api_port, "the same free port came up twice");
        let name = format!("m{}", self.next_member);
        self.next_member += 1;
        self.members.push(Member {
            name: name.clone(),
            pg_port,
            api_port,
        });
        Ok(name)
    }

    pub fn member(&self, name: &str) -> Option<&Member> {
        self.members.iter().find(|m| m.name == name)
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> anyhow::Result<Option<T>> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(
            serde_json::from_slice(&bytes)
                .with_context(|| format!("reading {}", path.display()))?,
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(anyhow::Error::new(e).context(format!("reading {}", path.display()))),
    }
}

/// Writes `content` to `path` (mode 0600) through a temporary file and a rename, so a crash leaves the old
/// file or the new one.
pub fn write_atomic(path: &Path, content: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    file.write_all(content)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("moving {} into place", path.display()))?;
    Ok(())
}
