//! Settings, read once at start from the environment (and an optional TOML file named by `BERTH_CONFIG`).
//! Every field has a row in `config/table.rs` (its default and meaning, for `--help` and docs/settings.md).
//! Names follow the Akkeris brokers where they overlap: `PORT`, `BROKER_USERNAME`, `BROKER_PASSWORD`,
//! `DATABASE_URL`, `NAME_PREFIX`.

use std::path::PathBuf;

use secrecy::SecretString;
use serde::Deserialize;

use crate::catalog::Engine;

pub mod flags;
pub mod other_variables;
mod sources;
pub mod table;
#[cfg(test)]
mod tests;

pub use sources::SettingSources;

#[derive(Debug, Clone, Deserialize)]
pub struct Settings {
    /// HTTP port of the API.
    #[serde(default = "default_port")]
    pub port: u16,
    /// Address the API listens on.
    #[serde(default = "default_bind_address")]
    pub bind_address: String,
    pub broker_username: Option<SecretString>,
    pub broker_password: Option<SecretString>,
    /// The broker's own database. Absent means the embedded default.
    pub database_url: Option<SecretString>,
    /// Prefix of every name berth gives a resource (databases, roles, buckets).
    #[serde(default = "default_name_prefix")]
    pub name_prefix: String,
    /// Folder with one catalog file per service.
    #[serde(default = "default_plans_dir")]
    pub plans_dir: PathBuf,
    /// Where the embedded default keeps its Postgres, key and credentials.
    #[serde(default = "default_data_dir", rename = "berth_data_dir")]
    pub data_dir: PathBuf,
    /// The 32-byte key that seals secrets at rest (base64 in a file).
    #[serde(rename = "berth_key_file")]
    pub key_file: Option<PathBuf>,
    /// Admin URL of the Postgres server that hosts `shared` plan databases.
    pub shared_postgres_url: Option<SecretString>,
    /// Host and port written into `shared` credentials, when apps reach the server under another name.
    pub shared_postgres_public_host: Option<String>,
    pub shared_postgres_public_port: Option<u16>,
    /// Seconds a client connection has to send a request's head, counted from when it opens or from its
    /// previous response (so an idle keep-alive connection is closed after it too).
    #[serde(default = "default_header_read_timeout_secs")]
    pub http_header_read_timeout_secs: u64,
    /// Most client connections open at once (kept below the open-file limit); at the cap a new one closes the
    /// oldest idle one, or waits in the backlog while all are busy.
    #[serde(default = "default_max_connections")]
    pub http_max_connections: usize,
    /// Largest accepted request body, in bytes.
    #[serde(default = "default_body_limit")]
    pub max_body_bytes: usize,
    #[serde(default = "default_worker_concurrency")]
    pub worker_concurrency: usize,
    /// Most claimed tasks a worker keeps buffered beyond its running ones (only for tasks quicker than a claim).
    #[serde(default = "default_worker_prefetch")]
    pub worker_prefetch: usize,
    #[serde(default = "default_lease_secs")]
    pub worker_lease_secs: u64,
    #[serde(default = "default_poll_ms")]
    pub worker_poll_ms: u64,
    pub worker_id: Option<String>,
    /// Failed basic-auth attempts one source address may make within `auth_failure_window_secs` before it gets
    /// 429 until that window ends (0: no limit).
    #[serde(default = "default_auth_failure_limit")]
    pub auth_failure_limit: u32,
    #[serde(default = "default_auth_failure_window_secs")]
    pub auth_failure_window_secs: u64,
    /// How long the API waits for an operation it answers synchronously (a request without
    /// `accepts_incomplete=true`) before answering 504 so that the platform cleans up. Below the API's 30 s
    /// request timeout, which answers 408 (which platforms take as "never received": no cleanup).
    #[serde(default = "default_sync_wait_secs")]
    pub sync_wait_secs: u64,
    /// Connections in the pool of each process.
    #[serde(default = "default_db_pool_size")]
    pub database_pool_size: u32,
    /// AWS, read the way the SDK's standard chain reads it. The API only looks at which are present (it never
    /// links the SDK); the worker hands them to the SDK, which also reads profiles and roles itself.
    pub aws_region: Option<String>,
    pub aws_access_key_id: Option<String>,
    pub aws_secret_access_key: Option<SecretString>,
    pub aws_session_token: Option<SecretString>,
    pub aws_profile: Option<String>,
    pub aws_web_identity_token_file: Option<String>,
    pub aws_container_credentials_full_uri: Option<String>,
    pub aws_container_credentials_relative_uri: Option<String>,
    /// Another endpoint for every AWS service (moto, LocalStack); apps get it as `S3_ENDPOINT`.
    pub aws_endpoint_url: Option<String>,
    /// KMS key (id or ARN) for `encrypted` S3 plans on AWS; unset = SSE-S3 (AES256).
    pub s3_kms_key_id: Option<String>,
    /// An S3-compatible store (SeaweedFS, MinIO, Garage, R2): endpoint URL and admin keys.
    pub s3_compatible_endpoint: Option<String>,
    pub s3_compatible_access_key: Option<SecretString>,
    pub s3_compatible_secret_key: Option<SecretString>,
    #[serde(default = "default_s3_compatible_region")]
    pub s3_compatible_region: String,
    /// The store's IAM-style identity API (SeaweedFS: the S3 endpoint itself); unset = bindings share the
    /// configured keys.
    pub s3_compatible_iam_endpoint: Option<String>,
    /// `LOCAL_ENGINE=on`: serve plans on the `local` engine (a Postgres server per instance on the worker's
    /// machine). Off unless set; the embedded default turns it on.
    #[serde(default)]
    pub local_engine: bool,
    /// Where `local` instance servers live (default `<BERTH_DATA_DIR>/servers`).
    pub local_servers_dir: Option<PathBuf>,
    /// Name of this machine for the `local` engine (default: the host name). An instance belongs to the host
    /// that provisioned it; workers elsewhere leave its tasks and its reconciling alone.
    pub local_engine_host: Option<String>,
    /// Patroni timings (seconds) of new `ha` clusters (both engines); default 7, 1, 3. The worker
    /// refuses to start unless `loop_wait + 2 × retry_timeout ≤ ttl`.
    pub ha_patroni_ttl: Option<u32>,
    pub ha_patroni_loop_wait: Option<u32>,
    pub ha_patroni_retry_timeout: Option<u32>,
    /// How often a worker reconciles (restarts stopped `local` servers, deprovisions expired instances).
    #[serde(default = "default_reconcile_ms")]
    pub reconcile_interval_ms: u64,
    /// Where presets and backups are stored: `file:///dir` or `s3://bucket/prefix` (default
    /// `file://<BERTH_DATA_DIR>/snapshots`).
    pub snapshot_store_url: Option<String>,
    /// An S3-compatible endpoint and keys for an `s3://` snapshot store; unset = the AWS standard chain.
    pub snapshot_s3_endpoint: Option<String>,
    pub snapshot_s3_access_key: Option<SecretString>,
    pub snapshot_s3_secret_key: Option<SecretString>,
    pub snapshot_s3_region: Option<String>,
    /// The key snapshots are sealed with (`berth gen-key` writes one). Default `<BERTH_DATA_DIR>/snapshot.key`,
    /// made on first start when absent; a configured file must exist.
    pub snapshot_key_file: Option<PathBuf>,
    /// zstd level of snapshots (1-19).
    #[serde(default = "default_snapshot_zstd_level")]
    pub snapshot_zstd_level: i32,
    /// How often a worker looks for due scheduled backups.
    #[serde(default = "default_backup_scheduler_ms")]
    pub backup_scheduler_ms: u64,
    /// Engine of the `dedicated` plan: `local` (default) or `ec2` (needs AWS settings).
    #[serde(default = "default_dedicated_engine")]
    pub dedicated_engine: String,
    /// Engine of the `ha` plan: `local` (default: Patroni + etcd on the worker's machine) or `ec2` (a VM per
    /// member, spread over availability zones; needs AWS settings).
    #[serde(default = "default_ha_engine")]
    pub ha_engine: String,
    /// AMIs (Debian 12 or Ubuntu, cloud-init) per CPU architecture; unset = the newest Debian 12 image.
    pub ec2_ami_x86_64: Option<String>,
    pub ec2_ami_arm64: Option<String>,
    /// Comma list of subnets berth may launch into (one per zone used); unset = the default VPC's.
    pub ec2_subnet_ids: Option<String>,
    /// Who may reach port 5432 (and 22 with `ssh_keys`).
    #[serde(default = "default_allowed_cidr")]
    pub ec2_allowed_cidr: String,
    /// JSON file `{"m6g.large": 0.077, ...}`: on-demand USD/hour per type (default: the list shipped in the
    /// worker, us-east-1 Linux list prices).
    pub ec2_on_demand_prices_file: Option<PathBuf>,
    /// How old cached instance types and prices may be before a worker refreshes them.
    #[serde(default = "default_offers_ttl")]
    pub ec2_offers_ttl_secs: u64,
    /// Wait for Postgres to accept TLS connections before a VM counts as ready (off where nothing listens,
    /// as under moto).
    #[serde(default = "yes")]
    pub ec2_readiness_probe: bool,
    /// Connection delivery (pg-spot-operator's names): push `{connstr, instance_name, ...}` to this bucket.
    pub connstr_bucket: Option<String>,
    /// Object key; `{instance_id}` and `{instance_name}` are replaced.
    #[serde(default = "default_connstr_key")]
    pub connstr_bucket_key: String,
    pub connstr_bucket_region: Option<String>,
    pub connstr_bucket_endpoint: Option<String>,
    pub connstr_bucket_access_key: Option<String>,
    pub connstr_bucket_access_secret: Option<SecretString>,
    /// An executable run after every (re)creation of a dedicated server with 4 arguments: instance name,
    /// private connection string, public one or "", tags as JSON.
    pub setup_finished_callback: Option<PathBuf>,
    /// Seconds before the callback is killed.
    #[serde(default = "default_callback_secs")]
    pub setup_finished_callback_timeout_secs: u64,
    /// Webhooks may call loopback addresses (127.0.0.0/8, ::1, `localhost`). Off; the embedded default turns
    /// it on. Link-local and metadata addresses are refused regardless (see `webhook_target`).
    #[serde(default)]
    pub webhook_allow_loopback: bool,
    /// Comma list of the only webhook targets allowed: host names, `.domain` suffixes, IP addresses, CIDRs.
    /// Unset = any address the fixed rules allow (private ranges included).
    pub webhook_allowed_targets: Option<String>,
    /// Comma list of the key files that seal secrets in the broker's database (docs/keys.md): the first seals,
    /// all of them open. Unset = `BERTH_KEY_FILE` alone (default `<BERTH_DATA_DIR>/master.key`); setting both is
    /// an error.
    #[serde(rename = "berth_key_files")]
    pub key_files: Option<String>,
    /// Comma list of snapshot key files: the first seals new presets and backups, all of them open. Unset =
    /// `SNAPSHOT_KEY_FILE` alone; setting both is an error.
    pub snapshot_key_files: Option<String>,
    /// TLS on the API: a PEM file with the certificate chain, leaf first. Set with `TLS_KEY_FILE`, or neither
    /// (plain HTTP). See docs/tls.md.
    pub tls_cert_file: Option<PathBuf>,
    /// The PEM private key of the leaf certificate (PKCS#8, SEC1 EC or PKCS#1 RSA).
    pub tls_key_file: Option<PathBuf>,
    /// Seconds between checks of the TLS files for a new certificate (10); a changed pair serves new
    /// connections without a restart.
    #[serde(default = "default_tls_reload_secs")]
    pub tls_reload_secs: u64,
    /// How both binaries write their log lines: `text` (for people) or `json` (one object a line, for log
    /// collectors); docs/observability.md lists the fields.
    #[serde(default)]
    pub log_format: crate::telemetry::LogFormat,
    /// `host:port` where a worker serves `/health` and `/metrics` (no credentials: keep it on a private address).
    /// Unset = no HTTP listener. Each worker on a machine needs a port of its own.
    pub worker_http_addr: Option<String>,
    /// Days an instance's audit trail (`/berth/v1/instances/{id}/events`) is kept once the instance is gone.
    #[serde(default = "default_event_retention_days")]
    pub event_retention_days: u64,
    /// The broker's address as browsers reach it (`https://broker.example.com`), the base of dashboard links;
    /// unset = the scheme and `Host` of the request that asks for the link.
    pub broker_public_url: Option<String>,
    /// How long a dashboard link stays good, in seconds (a fresh one comes with every GET of the instance).
    #[serde(default = "default_dashboard_link_ttl_secs")]
    pub dashboard_link_ttl_secs: u64,
    /// Warm pools: how many items each plan keeps ready, as `plan=count` pairs separated by commas (plan name or
    /// id). Unset: none, except under the embedded default (see docs/pools.md).
    pub pool_targets: Option<String>,
    /// Seconds a pooled item may wait for a provision before it is removed and made again.
    #[serde(default = "default_pool_max_age_secs")]
    pub pool_max_age_secs: u64,
    /// Milliseconds between a worker's checks of the pools (fill, recycle, drain).
    #[serde(default = "default_pool_check_ms")]
    pub pool_check_ms: u64,
}

/// 30 days: a platform stores the link of the provision answer and shows it for a while.
fn default_dashboard_link_ttl_secs() -> u64 {
    30 * 24 * 3600
}

fn yes() -> bool {
    true
}
fn default_dedicated_engine() -> String {
    "local".into()
}
fn default_ha_engine() -> String {
    "local".into()
}
fn default_allowed_cidr() -> String {
    "0.0.0.0/0".into()
}
fn default_offers_ttl() -> u64 {
    3600
}
fn default_connstr_key() -> String {
    "berth/{instance_id}/connstr.json".into()
}
/// pg-spot-operator's limit for its setup-finished callback.
pub const DEFAULT_CALLBACK_SECS: u64 = 30;
fn default_callback_secs() -> u64 {
    DEFAULT_CALLBACK_SECS
}

fn default_event_retention_days() -> u64 {
    90
}

fn default_port() -> u16 {
    8080
}
fn default_bind_address() -> String {
    "0.0.0.0".into()
}
fn default_name_prefix() -> String {
    "berth_".into()
}
fn default_plans_dir() -> PathBuf {
    "plans".into()
}
fn default_data_dir() -> PathBuf {
    ".berth".into()
}
fn default_header_read_timeout_secs() -> u64 {
    10
}
fn default_max_connections() -> usize {
    1024
}
fn default_body_limit() -> usize {
    256 * 1024
}
fn default_worker_concurrency() -> usize {
    8
}
fn default_worker_prefetch() -> usize {
    1024
}
fn default_lease_secs() -> u64 {
    30
}
fn default_poll_ms() -> u64 {
    1000
}
fn default_auth_failure_limit() -> u32 {
    20
}
fn default_auth_failure_window_secs() -> u64 {
    60
}
/// Longest `SYNC_WAIT_SECS`: the API's request timeout (30 s) less time for the writes before the wait.
pub const MAX_SYNC_WAIT_SECS: u64 = 25;
fn default_sync_wait_secs() -> u64 {
    20
}
fn default_db_pool_size() -> u32 {
    16
}
fn default_s3_compatible_region() -> String {
    "us-east-1".into()
}
fn default_reconcile_ms() -> u64 {
    5000
}
fn default_snapshot_zstd_level() -> i32 {
    6
}
fn default_backup_scheduler_ms() -> u64 {
    1000
}

/// Whether `program` is an executable file on the PATH.
pub fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

/// The store behind the `s3` plans (see [`Settings::s3_backend`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum S3Backend {
    /// AWS S3 and IAM through the SDK's standard chain (or any endpoint given by `AWS_ENDPOINT_URL`).
    Aws,
    /// `S3_COMPATIBLE_ENDPOINT` with admin keys.
    Compatible,
}

/// What credentials an `s3` binding gets (see [`Settings::s3_credentials`]); published in the catalog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum S3Credentials {
    /// An IAM user and access key of its own, scoped to the bucket: unbinding revokes only that binding.
    PerBinding,
    /// The store keys berth was configured with, the same for every binding.
    Shared,
}

impl S3Credentials {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PerBinding => "per-binding",
            Self::Shared => "shared",
        }
    }

    /// The catalog bullet that says so.
    pub fn bullet(self) -> &'static str {
        match self {
            Self::PerBinding => "Access key per binding",
            Self::Shared => {
                "Bindings share the store's keys (no key of their own, no read-only keys)"
            }
        }
    }
}

impl Settings {
    /// Reads the environment (and `BERTH_CONFIG`, if set). Fails with a message naming the bad setting.
    /// The binaries call [`SettingSources::load`] with their flags instead.
    pub fn load() -> anyhow::Result<Self> {
        SettingSources::default().load()
    }

    pub(crate) fn check(&self) -> anyhow::Result<()> {
        crate::names::check_prefix(&self.name_prefix)?;
        if self.worker_concurrency == 0 {
            anyhow::bail!("WORKER_CONCURRENCY must be at least 1");
        }
        if self.http_header_read_timeout_secs == 0 {
            anyhow::bail!("HTTP_HEADER_READ_TIMEOUT_SECS must be at least 1");
        }
        if self.http_max_connections == 0 {
            anyhow::bail!("HTTP_MAX_CONNECTIONS must be at least 1");
        }
        if self.worker_lease_secs < 2 {
            anyhow::bail!("WORKER_LEASE_SECS must be at least 2");
        }
        if !(1..=MAX_SYNC_WAIT_SECS).contains(&self.sync_wait_secs) {
            anyhow::bail!(
                "SYNC_WAIT_SECS must be from 1 to {MAX_SYNC_WAIT_SECS} (the API answers 408 after 30 s, and a 408 \
                 tells a platform not to clean up)"
            );
        }
        if !(1..=19).contains(&self.snapshot_zstd_level) {
            anyhow::bail!("SNAPSHOT_ZSTD_LEVEL must be from 1 to 19");
        }
        if let Some(url) = &self.snapshot_store_url
            && !(url.starts_with("file:///") || url.starts_with("s3://"))
        {
            anyhow::bail!(
                "SNAPSHOT_STORE_URL must be file:///<absolute dir> or s3://<bucket>/<prefix>"
            );
        }
        for (list, one, list_name, one_name) in [
            (
                &self.key_files,
                &self.key_file,
                "BERTH_KEY_FILES",
                "BERTH_KEY_FILE",
            ),
            (
                &self.snapshot_key_files,
                &self.snapshot_key_file,
                "SNAPSHOT_KEY_FILES",
                "SNAPSHOT_KEY_FILE",
            ),
        ] {
            if list.as_deref().is_some_and(|l| !l.trim().is_empty()) {
                anyhow::ensure!(
                    one.as_ref().is_none_or(|p| p.as_os_str().is_empty()),
                    "{one_name} and {list_name} are both set: list every key in {list_name} (the first seals) \
                     and unset {one_name}"
                );
                anyhow::ensure!(
                    !split_paths(list.as_deref()).is_empty(),
                    "{list_name} lists no key file"
                );
            }
        }
        if self.reconcile_interval_ms < 100 {
            anyhow::bail!("RECONCILE_INTERVAL_MS must be at least 100");
        }
        match self.dedicated_engine.as_str() {
            "local" => {}
            "ec2" if self.aws_configured() => {}
            "ec2" => anyhow::bail!(
                "DEDICATED_ENGINE=ec2 needs AWS settings (AWS_REGION and a credential source)"
            ),
            other => anyhow::bail!("DEDICATED_ENGINE must be local or ec2, not {other:?}"),
        }
        match self.ha_engine.as_str() {
            "local" => {}
            "ec2" if self.aws_configured() => {}
            "ec2" => anyhow::bail!(
                "HA_ENGINE=ec2 needs AWS settings (AWS_REGION and a credential source)"
            ),
            other => anyhow::bail!("HA_ENGINE must be local or ec2, not {other:?}"),
        }
        if self.connstr_bucket.is_none()
            && (self.connstr_bucket_endpoint.is_some() || self.connstr_bucket_access_key.is_some())
        {
            anyhow::bail!(
                "CONNSTR_BUCKET_* settings are given but CONNSTR_BUCKET (the bucket) is not"
            );
        }
        if self.setup_finished_callback_timeout_secs == 0 {
            anyhow::bail!("SETUP_FINISHED_CALLBACK_TIMEOUT_SECS must be at least 1");
        }
        crate::webhook_target::TargetPolicy::from_settings(self)?;
        Ok(())
    }

    /// Engines this process can serve: a plan appears in the catalog only when its engine is here.
    pub fn available_engines(&self) -> Vec<Engine> {
        let mut engines = Vec::new();
        if self.shared_postgres_url.is_some() {
            engines.push(Engine::Shared);
        }
        if self.s3_backend().is_some() {
            engines.push(Engine::S3);
        }
        if self.local_engine {
            engines.push(Engine::Local);
            // HA clusters of Patroni + etcd on the same machine, where Debian's etcd-server and patroni are.
            if on_path("etcd") && on_path("patroni") {
                engines.push(Engine::HaLocal);
            }
        }
        if self.aws_configured() {
            engines.push(Engine::Ec2);
            engines.push(Engine::HaEc2);
        }
        engines
    }

    /// Plans whose engine the operator chose (`DEDICATED_ENGINE`, `HA_ENGINE`): plan name → engine.
    pub fn plan_engines(&self) -> Vec<(&'static str, String)> {
        let ha = if self.ha_engine == "ec2" {
            "ha_ec2"
        } else {
            "ha_local"
        };
        vec![
            ("dedicated", self.dedicated_engine.clone()),
            ("ha", ha.to_string()),
        ]
    }

    /// AWS counts as configured with a region and a credential source the SDK's chain can use.
    pub fn aws_configured(&self) -> bool {
        self.aws_region.is_some()
            && (self.aws_access_key_id.is_some()
                || self.aws_profile.is_some()
                || self.aws_web_identity_token_file.is_some()
                || self.aws_container_credentials_full_uri.is_some()
                || self.aws_container_credentials_relative_uri.is_some())
    }

    /// The folder of `local` instance servers, absolute.
    pub fn servers_dir(&self) -> PathBuf {
        let dir = self
            .local_servers_dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("servers"));
        if dir.is_absolute() {
            dir
        } else {
            std::env::current_dir()
                .map(|cwd| cwd.join(&dir))
                .unwrap_or(dir)
        }
    }

    /// This machine's name for the `local` engine: `LOCAL_ENGINE_HOST`, else the kernel's host name.
    pub fn local_host(&self) -> String {
        self.local_engine_host.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .ok()
                .filter(|h| !h.is_empty())
                .or_else(|| std::env::var("HOSTNAME").ok())
                .unwrap_or_else(|| "localhost".into())
        })
    }

    /// Where the `s3` plans make their buckets. An S3-compatible store, when configured, wins over AWS: its
    /// settings are berth's own and name a store for buckets, while AWS settings may be there for other
    /// engines (EC2). AWS counts as configured with a region and a credential source the chain can use.
    pub fn s3_backend(&self) -> Option<S3Backend> {
        let compatible = self.s3_compatible_endpoint.is_some()
            && self.s3_compatible_access_key.is_some()
            && self.s3_compatible_secret_key.is_some();
        let aws = self.aws_configured();
        if compatible {
            Some(S3Backend::Compatible)
        } else if aws {
            Some(S3Backend::Aws)
        } else {
            None
        }
    }

    /// Which credentials `s3` bindings get: their own on AWS and on an S3-compatible store with an identity
    /// API (`S3_COMPATIBLE_IAM_ENDPOINT`), else the configured store keys. `None` without an S3 store.
    pub fn s3_credentials(&self) -> Option<S3Credentials> {
        match self.s3_backend()? {
            S3Backend::Aws => Some(S3Credentials::PerBinding),
            S3Backend::Compatible if self.s3_compatible_iam_endpoint.is_some() => {
                Some(S3Credentials::PerBinding)
            }
            S3Backend::Compatible => Some(S3Credentials::Shared),
        }
    }

    /// The snapshot store URL: the configured one, or `file://` + `<data dir>/snapshots` (absolute).
    pub fn snapshot_store(&self) -> String {
        self.snapshot_store_url.clone().unwrap_or_else(|| {
            let dir = self.data_dir.join("snapshots");
            let dir = if dir.is_absolute() {
                dir
            } else {
                std::env::current_dir()
                    .map(|cwd| cwd.join(&dir))
                    .unwrap_or(dir)
            };
            format!("file://{}", dir.display())
        })
    }

    /// The snapshot key file, and whether berth may create it (only the default one).
    pub fn snapshot_key_path(&self) -> (PathBuf, bool) {
        if let Some(first) = split_paths(self.snapshot_key_files.as_deref())
            .into_iter()
            .next()
        {
            return (first, false);
        }
        match &self.snapshot_key_file {
            Some(path) => (path.clone(), false),
            None => (self.data_dir.join("snapshot.key"), true),
        }
    }

    /// The key file: the configured one, or `<data dir>/master.key`. With `BERTH_KEY_FILES`, its first (the
    /// primary).
    pub fn key_path(&self) -> PathBuf {
        if let Some(first) = split_paths(self.key_files.as_deref()).into_iter().next() {
            return first;
        }
        self.key_file
            .clone()
            .unwrap_or_else(|| self.data_dir.join("master.key"))
    }

    /// The master key files, the primary first: `BERTH_KEY_FILES`, else the one [`Settings::key_path`].
    pub fn key_paths(&self) -> Vec<PathBuf> {
        let listed = split_paths(self.key_files.as_deref());
        if listed.is_empty() {
            vec![self.key_path()]
        } else {
            listed
        }
    }

    /// The snapshot key files, the primary first, and whether berth may create the primary (only the default
    /// one): `SNAPSHOT_KEY_FILES`, else [`Settings::snapshot_key_path`].
    pub fn snapshot_key_paths(&self) -> (Vec<PathBuf>, bool) {
        let listed = split_paths(self.snapshot_key_files.as_deref());
        if listed.is_empty() {
            let (path, may_create) = self.snapshot_key_path();
            (vec![path], may_create)
        } else {
            (listed, false)
        }
    }
}

/// A comma list of paths (blanks around the commas and empty items ignored).
fn split_paths(list: Option<&str>) -> Vec<PathBuf> {
    list.unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .collect()
}

fn default_tls_reload_secs() -> u64 {
    10
}
fn default_pool_max_age_secs() -> u64 {
    86_400
}
fn default_pool_check_ms() -> u64 {
    1000
}
