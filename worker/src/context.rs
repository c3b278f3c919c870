//! What a running task can reach: its row, the pool, and the worker's shared services.

use std::{
    collections::HashMap,
    fmt,
    sync::{Arc, OnceLock},
    time::Duration,
};

use anyhow::Context as _;
use broker::{
    catalog::Catalog, config::Settings, crypto::Cipher, db::tasks::TaskRow,
    webhook_target::TargetPolicy,
};
use serde::de::DeserializeOwned;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::{
    providers::{self, Provider},
    queue,
    registry::TaskError,
    snapshots::Snapshots,
};

/// Shared by every task a worker runs: settings, the sealing key, the catalog, an HTTP client and the
/// providers keyed by plan engine.
pub struct Services {
    pub settings: Settings,
    pub cipher: Cipher,
    pub catalog: Catalog,
    pub http: reqwest::Client,
    /// Which addresses webhook deliveries may call (checked after DNS resolution).
    pub webhook_targets: TargetPolicy,
    providers: HashMap<String, Arc<dyn Provider>>,
    /// Opened on first use, so a worker that never snapshots never reads (or makes) a key.
    snapshots: OnceLock<Result<Snapshots, String>>,
    /// Warm pools' targets by plan (`POOL_TARGETS`, read against the catalog).
    pub pool_targets: broker::pools::PoolTargets,
    /// Wakes this worker's pool check before its next tick (a pool item was taken).
    pub pool_check_now: tokio::sync::Notify,
}

impl fmt::Debug for Services {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut engines: Vec<_> = self.providers.keys().collect();
        engines.sort();
        f.debug_struct("Services")
            .field("catalog", &self.catalog)
            .field("engines", &engines)
            .finish()
    }
}

impl Services {
    /// Loads the catalog from `settings.plans_dir` and sets up a provider for every configured engine.
    pub fn new(settings: Settings, cipher: Cipher) -> anyhow::Result<Self> {
        let catalog = Catalog::load_for(&settings)?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .connect_timeout(Duration::from_secs(5))
            .user_agent(concat!("berth-worker/", env!("CARGO_PKG_VERSION")))
            .build()
            .context("building the HTTP client")?;
        let providers = providers::configured(&settings)?;
        let webhook_targets = TargetPolicy::from_settings(&settings)?;
        let pool_targets = broker::pools::PoolTargets::from_settings(&settings, &catalog)?;
        Ok(Self {
            settings,
            cipher,
            catalog,
            http,
            webhook_targets,
            providers,
            snapshots: OnceLock::new(),
            pool_targets,
            pool_check_now: tokio::sync::Notify::new(),
        })
    }

    /// The provider serving plan `plan_id`.
    pub fn provider_for_plan(&self, plan_id: &str) -> Result<Arc<dyn Provider>, TaskError> {
        let plan = self.catalog.plan_by_id(plan_id).ok_or_else(|| {
            TaskError::fatal(format!(
                "plan {plan_id:?} is not in this worker's catalog (is its engine configured for the worker?)"
            ))
        })?;
        let engine = plan.plan.engine.as_str();
        self.providers.get(engine).cloned().ok_or_else(|| {
            TaskError::fatal(format!(
                "engine {engine:?} of plan {:?} is not configured on this worker",
                plan.plan.name
            ))
        })
    }

    /// Every configured provider with its engine name.
    pub fn providers(&self) -> impl Iterator<Item = (&str, &Arc<dyn Provider>)> {
        self.providers.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Ids of the published plans carried out by `engine`.
    pub fn plan_ids_of_engine(&self, engine: &str) -> Vec<String> {
        self.catalog
            .services()
            .iter()
            .flat_map(|s| &s.plans)
            .filter(|p| p.engine == engine)
            .map(|p| p.id.clone())
            .collect()
    }

    /// The snapshot store and key (presets, backups).
    pub fn snapshots(&self) -> Result<&Snapshots, TaskError> {
        self.snapshots
            .get_or_init(|| Snapshots::open(&self.settings).map_err(|e| format!("{e:#}")))
            .as_ref()
            .map_err(|e| TaskError::fatal(format!("snapshots are not available: {e}")))
    }

    /// Uses `snapshots` instead of the configured ones (tests).
    pub fn with_snapshots(self, snapshots: Snapshots) -> Self {
        let cell = OnceLock::new();
        let _ = cell.set(Ok(snapshots));
        Self {
            snapshots: cell,
            ..self
        }
    }

    pub fn name_prefix(&self) -> &str {
        &self.settings.name_prefix
    }
}

/// Handed to [`crate::TaskHandler::run`].
pub struct TaskContext<'a> {
    /// The task row as claimed (state `running`, attempts already counting this run).
    pub task: &'a TaskRow,
    pub pool: &'a PgPool,
    pub services: &'a Services,
    /// Cancelled when this worker lost the task's lease or is shutting down hard; stop as soon as you can.
    pub cancel: CancellationToken,
    pub(crate) worker_id: &'a str,
}

impl TaskContext<'_> {
    /// Stores a progress text (shown as the OSB last_operation `description`). Fenced: a worker that lost
    /// the task changes nothing.
    pub async fn progress(&self, text: &str) -> anyhow::Result<()> {
        queue::set_progress(self.pool, self.task, self.worker_id, text)
            .await
            .context("recording the task's progress")
    }

    /// The payload as `T`; a payload that does not parse is a programming error, so Fatal.
    pub fn payload<T: DeserializeOwned>(&self) -> Result<T, TaskError> {
        serde_json::from_value(self.task.payload.clone()).map_err(|e| {
            TaskError::fatal(format!(
                "the {} task's payload is malformed: {e}",
                self.task.kind
            ))
        })
    }

    pub fn instance_id(&self) -> Result<&str, TaskError> {
        self.task.instance_id.as_deref().ok_or_else(|| {
            TaskError::fatal(format!("the {} task names no instance", self.task.kind))
        })
    }

    pub fn binding_id(&self) -> Result<&str, TaskError> {
        self.task.binding_id.as_deref().ok_or_else(|| {
            TaskError::fatal(format!("the {} task names no binding", self.task.kind))
        })
    }

    pub fn worker_id(&self) -> &str {
        self.worker_id
    }
}
