//! Providers carry out the OSB operations for one plan engine. The worker keeps one per configured
//! engine and picks it by the plan's `engine` field in the catalog.

pub mod aws;
pub mod binding_access;
pub mod ec2_common;
pub mod ec2_postgres;
pub mod ha_ec2;
pub mod ha_local;
pub mod local_postgres;
pub mod local_processes;
pub mod patroni;
pub mod postgres;
pub mod s3;
pub mod shared_postgres;

use std::{collections::HashMap, sync::Arc, time::Duration};

use async_trait::async_trait;
use broker::{
    config::Settings,
    db::{bindings::BindingRow, instances, instances::InstanceRow, tasks},
    model::{Operation, UpdatePayload},
};
use serde_json::{Map, Value};
use sqlx::{PgConnection, PgPool};

use crate::{
    context::{Services, TaskContext},
    registry::TaskError,
    snapshots::DatabaseTarget,
};

/// What a provider step produced: a result, or "not yet, look again later".
#[derive(Debug, Clone, PartialEq)]
pub enum Progress<T> {
    Done(T),
    Wait { after: Duration, progress: String },
}

impl<T> Progress<T> {
    /// "Not yet": look again after `after`; `progress` says what it waits for.
    pub fn wait(after: Duration, progress: impl Into<String>) -> Self {
        Self::Wait {
            after,
            progress: progress.into(),
        }
    }

    /// [`Progress::wait`] after `secs` seconds.
    pub fn wait_secs(secs: u64, progress: impl Into<String>) -> Self {
        Self::wait(Duration::from_secs(secs), progress)
    }
}

/// What provisioning made: non-secret facts (shown to nobody but the broker) and optional secrets.
#[derive(Debug, Clone, PartialEq)]
pub struct Provisioned {
    pub details: Value,
    pub secrets: Option<Value>,
}

/// What binding made: non-secret details and the credentials handed to the app (sealed before storage).
#[derive(Clone, PartialEq)]
pub struct Bound {
    pub details: Value,
    pub credentials: Map<String, Value>,
}

impl std::fmt::Debug for Bound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bound")
            .field("details", &self.details)
            .field("credentials", &"<redacted>")
            .finish()
    }
}

/// One engine's implementation of the OSB operations. Every method is idempotent: it is run again after a
/// crash or a retry and must finish the job, not redo it or fail because part of it exists.
#[async_trait]
pub trait Provider: Send + Sync {
    async fn provision(
        &self,
        ctx: &TaskContext<'_>,
        instance: &InstanceRow,
    ) -> Result<Progress<Provisioned>, TaskError>;

    /// Finishes a warm-pool item (made by `provision` under the id `pool_item`, with no parameters) as
    /// `instance`, whose details and secrets are the item's: new names where names show, a new password for
    /// every role the item has, and what the instance's parameters ask that the pool could serve (see
    /// `broker::pools::can_serve`). Idempotent like every step; returns what `provision` would have.
    async fn adopt(
        &self,
        _ctx: &TaskContext<'_>,
        _instance: &InstanceRow,
        _pool_item: &str,
    ) -> Result<Progress<Provisioned>, TaskError> {
        Err(TaskError::fatal("this plan has no warm pool"))
    }

    async fn update(
        &self,
        ctx: &TaskContext<'_>,
        instance: &InstanceRow,
        update: &UpdatePayload,
    ) -> Result<Progress<()>, TaskError>;

    /// Removes whatever exists of the instance (works on half-built ones), including its bindings' resources.
    async fn deprovision(
        &self,
        ctx: &TaskContext<'_>,
        instance: &InstanceRow,
        bindings: &[BindingRow],
    ) -> Result<Progress<()>, TaskError>;

    async fn bind(
        &self,
        ctx: &TaskContext<'_>,
        instance: &InstanceRow,
        binding: &BindingRow,
    ) -> Result<Progress<Bound>, TaskError>;

    async fn unbind(
        &self,
        ctx: &TaskContext<'_>,
        instance: &InstanceRow,
        binding: &BindingRow,
    ) -> Result<Progress<()>, TaskError>;

    /// Credentials rotation, step 1 (the Akkeris `credentials` action): new credentials for `binding`, working
    /// before this returns, while `current` (the stored ones) stay valid. Run again after a crash, it must
    /// revoke whatever an earlier try made but never stored, never `current`.
    async fn rotate_binding(
        &self,
        _ctx: &TaskContext<'_>,
        _instance: &InstanceRow,
        _binding: &BindingRow,
        _current: &Map<String, Value>,
    ) -> Result<Progress<Bound>, TaskError> {
        Err(TaskError::fatal("this plan cannot rotate credentials"))
    }

    /// Credentials rotation, step 2, once the new credentials are stored: revoke every credential of `binding`
    /// but `current` (the stored, new ones).
    async fn revoke_other_credentials(
        &self,
        _ctx: &TaskContext<'_>,
        _instance: &InstanceRow,
        _binding: &BindingRow,
        _current: &Map<String, Value>,
    ) -> Result<Progress<()>, TaskError> {
        Err(TaskError::fatal("this plan cannot rotate credentials"))
    }

    /// The instance's database, for presets and backups. Plans without one (buckets) keep the default.
    async fn database_target(
        &self,
        _ctx: &TaskContext<'_>,
        _instance: &InstanceRow,
        _bindings: &[BindingRow],
    ) -> Result<Progress<DatabaseTarget>, TaskError> {
        Err(TaskError::fatal(
            "this plan has no database to snapshot or restore",
        ))
    }

    /// A switchover (`Operation::Switchover`) or failover of an HA cluster's primary to `candidate`, or to the
    /// healthiest replica. Run again after a crash, it must not move the primary a second time.
    async fn change_primary(
        &self,
        _ctx: &TaskContext<'_>,
        _instance: &InstanceRow,
        _operation: Operation,
        _candidate: Option<&str>,
    ) -> Result<Progress<()>, TaskError> {
        Err(TaskError::fatal("this plan has no primary to change"))
    }

    /// One pass of the worker's reconcile loop over this engine's instances (bring back what stopped).
    /// Must be safe with many workers running it at once. Most engines have nothing to do.
    async fn reconcile(&self, _pool: &PgPool, _services: &Services) -> anyhow::Result<()> {
        Ok(())
    }
}

/// A `Wait` when the instance's processes live on another host (details `engine_host`, recorded by engines
/// that run them on the worker's machine): that host's workers do the job.
pub(crate) fn owned_elsewhere<T>(instance: &InstanceRow, host: &str) -> Option<Progress<T>> {
    let owner = instance
        .details
        .get("engine_host")
        .and_then(Value::as_str)?;
    (owner != host).then(|| {
        Progress::wait_secs(
            5,
            format!("waiting for a worker on host {owner}, where the instance's processes live"),
        )
    })
}

/// Namespaces of the per-instance advisory lock that serializes an engine's reconcile loop with the
/// instance's own tasks (held for a transaction). `local` and `ha_local` share one.
pub(crate) const LOCAL_LOCKS: &str = "berth.local";
pub(crate) const EC2_LOCKS: &str = "berth.ec2";
pub(crate) const HA_EC2_LOCKS: &str = "berth.ha_ec2";

/// Waits for the instance's lock in `locks` and holds it until `conn`'s transaction ends: a reconcile step
/// under way on the instance finishes first, and later ones see the caller's task and leave the instance alone.
pub(crate) async fn lock_instance(
    conn: &mut PgConnection,
    locks: &str,
    instance_id: &str,
) -> sqlx::Result<()> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1 || ':' || $2, 0))")
        .bind(locks)
        .bind(instance_id)
        .execute(conn)
        .await?;
    Ok(())
}

/// Waits until no reconcile step holds the instance's lock in `locks`. A deprovision of an engine whose teardown
/// spans several task runs calls it first: a replacement VM being launched right now would escape its sweep, and
/// the reconcile steps that come later see the deprovision task and leave the instance alone.
pub(crate) async fn wait_for_reconcile(
    pool: &PgPool,
    locks: &str,
    instance_id: &str,
) -> sqlx::Result<()> {
    let mut tx = pool.begin().await?;
    lock_instance(&mut tx, locks, instance_id).await?;
    tx.commit().await
}

/// For a reconcile step: takes the instance's lock in `locks` for `conn`'s transaction unless another worker
/// holds it, and reads the instance. `None` when the lock is taken, the instance is gone, or an instance
/// operation is pending or running (that task does the work).
pub(crate) async fn lock_idle_instance(
    conn: &mut PgConnection,
    locks: &str,
    instance_id: &str,
) -> sqlx::Result<Option<InstanceRow>> {
    let locked: bool = sqlx::query_scalar(
        "SELECT pg_try_advisory_xact_lock(hashtextextended($1 || ':' || $2, 0))",
    )
    .bind(locks)
    .bind(instance_id)
    .fetch_one(&mut *conn)
    .await?;
    if !locked {
        return Ok(None);
    }
    let busy = tasks::active_operations(&mut *conn, instance_id)
        .await?
        .iter()
        .any(|t| t.binding_id.is_none());
    if busy {
        return Ok(None);
    }
    instances::get(&mut *conn, instance_id).await
}

/// The providers of every engine configured in `settings`, keyed by engine name.
pub fn configured(settings: &Settings) -> anyhow::Result<HashMap<String, Arc<dyn Provider>>> {
    let mut providers: HashMap<String, Arc<dyn Provider>> = HashMap::new();
    if let Some(url) = &settings.shared_postgres_url {
        let provider = shared_postgres::SharedPostgres::new(
            url,
            settings.shared_postgres_public_host.clone(),
            settings.shared_postgres_public_port,
        )?;
        providers.insert(shared_postgres::ENGINE.to_string(), Arc::new(provider));
    }
    let defaults = patroni::timings::FAST;
    let timings = patroni::Timings {
        ttl: settings.ha_patroni_ttl.unwrap_or(defaults.ttl),
        loop_wait: settings.ha_patroni_loop_wait.unwrap_or(defaults.loop_wait),
        retry_timeout: settings
            .ha_patroni_retry_timeout
            .unwrap_or(defaults.retry_timeout),
    };
    if settings.local_engine {
        let provider =
            local_postgres::LocalPostgres::new(settings.servers_dir(), settings.local_host())?;
        providers.insert(local_postgres::ENGINE.to_string(), Arc::new(provider));
        let provider =
            ha_local::HaLocal::new(settings.servers_dir(), settings.local_host(), timings)?;
        providers.insert(ha_local::ENGINE.to_string(), Arc::new(provider));
    }
    if settings.aws_configured() {
        let provider = ec2_postgres::Ec2Postgres::new(settings)?;
        providers.insert(ec2_postgres::ENGINE.to_string(), Arc::new(provider));
        let provider = ha_ec2::HaEc2::new(settings, timings)?;
        providers.insert(ha_ec2::ENGINE.to_string(), Arc::new(provider));
    }
    if let Some(backend) = settings.s3_backend() {
        let provider = s3::S3Provider::new(settings, backend)?;
        providers.insert(s3::ENGINE.to_string(), Arc::new(provider));
    }
    Ok(providers)
}
