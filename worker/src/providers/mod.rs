//! Providers carry out the OSB operations for one plan engine. The worker keeps one per configured
//! engine and picks it by the plan's `engine` field in the catalog.

pub mod aws;
pub mod ec2_postgres;
pub mod local_postgres;
pub mod pg_tuning;
pub mod s3;
pub mod shared_postgres;

use std::{collections::HashMap, sync::Arc, time::Duration};

use async_trait::async_trait;
use broker::{
    config::Settings,
    db::{bindings::BindingRow, instances::InstanceRow},
    model::UpdatePayload,
};
use serde_json::{Map, Value};
use sqlx::PgPool;

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
        Err(TaskError::fatal("this plan has no database to snapshot or restore"))
    }

    /// One pass of the worker's reconcile loop over this engine's instances (bring back what stopped).
    /// Must be safe with many workers running it at once. Most engines have nothing to do.
    async fn reconcile(&self, _pool: &PgPool, _services: &Services) -> anyhow::Result<()> {
        Ok(())
    }
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
    if settings.local_engine {
        let provider = local_postgres::LocalPostgres::new(settings.servers_dir(), settings.local_host())?;
        providers.insert(local_postgres::ENGINE.to_string(), Arc::new(provider));
    }
    if settings.aws_configured() {
        let provider = ec2_postgres::Ec2Postgres::new(settings)?;
        providers.insert(ec2_postgres::ENGINE.to_string(), Arc::new(provider));
    }
    if let Some(backend) = settings.s3_backend() {
        let provider = s3::S3Provider::new(settings, backend)?;
        providers.insert(s3::ENGINE.to_string(), Arc::new(provider));
    }
    Ok(providers)
}
