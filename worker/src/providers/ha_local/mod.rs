//! The `ha_local` engine of the `ha` plan: a Patroni cluster on this machine. One etcd and N members, each a
//! Patroni that runs its own Postgres, all on free ports of 127.0.0.1 (Debian's `etcd-server` and `patroni`),
//! under `<servers dir>/<prefix>ha_<hash of the instance id>`. berth writes no consensus or failover of its
//! own: Patroni elects the primary and fails over; berth starts the processes, keeps the cluster at N members,
//! asks Patroni for switchovers, and records who leads.
//!
//! Like the `local` engine, an instance belongs to the host that provisioned it, its processes outlive the
//! worker, and every step checks what exists first, so a retry after a crash finishes the job.

mod adopt;
mod cluster;
pub(crate) mod config;
mod members;
mod provision;
mod readiness;
mod reconcile;
mod scaling;
pub(crate) mod state;

use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;
use async_trait::async_trait;
use broker::{
    crypto::random_password,
    db::{bindings::BindingRow, instances, instances::InstanceRow},
    embedded,
    model::{Operation, UpdatePayload},
    names,
};
use serde_json::{Value, json};
use sqlx::PgPool;
use tracing::{info, warn};

use self::{
    cluster::LocalCluster,
    members::{endpoints, leader_or_wait, members_details, primary_port},
    provision::check_programs,
    readiness::wait_ready,
    state::Layout,
};
use super::{
    Bound, LOCAL_LOCKS, Progress, Provider, Provisioned,
    local_processes::ensure_servers_dir,
    lock_instance, owned_elsewhere,
    patroni::{ClusterView, Params, SUPERUSER, Timings, credentials, dcs, settings, switchover},
    postgres::{
        self, Access, AppDatabase, app_db_name, binding_grants, grant_binding_role,
        revoke_binding_role,
    },
};
use crate::{
    context::{Services, TaskContext},
    registry::TaskError,
    snapshots::{DatabaseTarget, ServerLogin, target::Host},
};

/// The plan engine this provider serves.
pub const ENGINE: &str = "ha_local";

/// How long a task step waits inline for the cluster before it hands the task back to the queue.
const INLINE_WAIT: Duration = Duration::from_secs(90);

pub struct HaLocal {
    servers_dir: PathBuf,
    host: String,
    /// Patroni timings of the clusters this worker makes (kept in etcd: later changes leave existing ones).
    timings: Timings,
}

impl std::fmt::Debug for HaLocal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HaLocal")
            .field("servers_dir", &self.servers_dir)
            .field("host", &self.host)
            .field("timings", &self.timings)
            .finish()
    }
}

/// A step on this machine that failed (processes, files, a cluster that is not ready): worth another try.
fn local(err: anyhow::Error) -> TaskError {
    TaskError::Retryable(err)
}

impl HaLocal {
    /// `servers_dir` must be absolute; `host` names this machine (see `Settings::local_host`).
    pub fn new(servers_dir: PathBuf, host: String, timings: Timings) -> anyhow::Result<Self> {
        ensure_servers_dir(&servers_dir)?;
        timings
            .check()
            .map_err(|e| anyhow::anyhow!("HA_PATRONI_TTL, _LOOP_WAIT, _RETRY_TIMEOUT: {e}"))?;
        Ok(Self {
            servers_dir,
            host,
            timings,
        })
    }

    /// The folder of an instance's cluster.
    pub fn cluster_root(&self, prefix: &str, instance_id: &str) -> PathBuf {
        self.servers_dir
            .join(names::instance_cluster(prefix, instance_id))
    }

    /// The folder of `instance`'s cluster: the one its details record (a cluster taken from a warm pool keeps
    /// the folder it was made in, named after the pool item), else the one named after its id.
    pub fn root_of(&self, prefix: &str, instance: &InstanceRow) -> PathBuf {
        match instance.details.get("cluster_dir").and_then(Value::as_str) {
            Some(dir) => PathBuf::from(dir),
            None => self.cluster_root(prefix, &instance.id),
        }
    }

    /// The instance's cluster as its folder describes it; `None` when there is none (never made, or removed).
    fn open(
        &self,
        prefix: &str,
        instance: &InstanceRow,
    ) -> Result<Option<LocalCluster>, TaskError> {
        let layout = Layout::new(self.root_of(prefix, instance));
        let (Some(state), Some(secrets)) = (
            layout.load_state().map_err(local)?,
            layout.load_secrets().map_err(local)?,
        ) else {
            return Ok(None);
        };
        let run_as = embedded::os_user_for_postgres().map_err(TaskError::Fatal)?;
        Ok(Some(LocalCluster {
            layout,
            state,
            secrets,
            run_as,
        }))
    }

    fn open_existing(
        &self,
        ctx: &TaskContext<'_>,
        instance: &InstanceRow,
    ) -> Result<LocalCluster, TaskError> {
        self.open(ctx.services.name_prefix(), instance)?.ok_or_else(|| {
            TaskError::fatal(format!(
                "the instance's cluster is missing from {} on host {} (did provisioning fail?); deprovision the \
                 instance and provision it again",
                self.root_of(ctx.services.name_prefix(), instance).display(),
                self.host
            ))
        })
    }
}

/// Cluster settings Patroni keeps in etcd for the synchronous flag and the tuning profile.
fn dcs_for(instance: &InstanceRow, timings: Timings) -> Value {
    let (synchronous, profile) = settings::recorded(instance);
    dcs::dcs_config(timings, synchronous, profile)
}

/// Update: `synchronous` and `tuning_profile` to Patroni's configuration, when they change.
async fn apply_settings(
    ctx: &TaskContext<'_>,
    instance: &InstanceRow,
    cluster: &LocalCluster,
    params: &Params,
) -> Result<(), TaskError> {
    let Some(old_profile) = settings::changed_from(instance, params) else {
        return Ok(());
    };
    let patroni = cluster.patroni(&ctx.services.http);
    let view = patroni.cluster().await.map_err(local)?;
    let members = cluster
        .state
        .members
        .iter()
        .map(|m| (m.name.clone(), cluster::api_base(m)))
        .collect();
    settings::apply(ctx, instance, &patroni, &view, members, old_profile, params).await
}

#[async_trait]
impl Provider for HaLocal {
    async fn provision(
        &self,
        ctx: &TaskContext<'_>,
        instance: &InstanceRow,
    ) -> Result<Progress<Provisioned>, TaskError> {
        if let Some(wait) = owned_elsewhere(instance, &self.host) {
            return Ok(wait);
        }
        let params = Params::of(&instance.parameters)?;
        check_programs(&self.host)?;
        // Claim the instance for this host before anything exists, so a retry elsewhere waits for us.
        instances::merge_details(ctx.pool, &instance.id, &json!({ "engine_host": self.host }))
            .await
            .context("recording the instance's host")?;
        let cluster = self.create(ctx, instance, &params)?;
        let t0 = std::time::Instant::now();
        let (view, leader) = match self.start(ctx, &cluster, &params).await? {
            Ok(ready) => ready,
            Err(wait) => return Ok(wait),
        };
        let started_ms = t0.elapsed().as_millis();

        let port = cluster
            .state
            .member(&leader)
            .map(|m| m.pg_port)
            .unwrap_or_default();
        let owner = names::instance_owner_role(ctx.services.name_prefix(), &instance.id);
        let admin_password = random_password(32);
        postgres::set_up(
            &|db: &str| cluster.superuser(port, db),
            &AppDatabase {
                database: &params.server.app_db_name,
                owner: &owner,
                admin_user: &params.server.admin_user,
                admin_password: &admin_password,
                extensions: &params.server.extensions,
            },
            cluster.state.postgres_version.parse().unwrap_or(0),
        )
        .await?;
        if ctx.task.kind == broker::model::kinds::POOL_FILL {
            readiness::settle(&cluster, port).await;
        }
        info!(
            instance_id = %instance.id,
            members = cluster.state.members.len(),
            primary = %leader,
            started_ms,
            total_ms = t0.elapsed().as_millis(),
            "ha cluster ready"
        );
        Ok(Progress::Done(self.provisioned(
            &cluster,
            (&view, &leader),
            &params,
            &owner,
            &admin_password,
        )))
    }

    async fn adopt(
        &self,
        ctx: &TaskContext<'_>,
        instance: &InstanceRow,
        pool_item: &str,
    ) -> Result<Progress<Provisioned>, TaskError> {
        if let Some(wait) = owned_elsewhere(instance, &self.host) {
            return Ok(wait);
        }
        check_programs(&self.host)?;
        self.adopt_cluster(ctx, instance, pool_item).await
    }

    async fn update(
        &self,
        ctx: &TaskContext<'_>,
        instance: &InstanceRow,
        update: &UpdatePayload,
    ) -> Result<Progress<()>, TaskError> {
        if update.plan_id != instance.plan_id {
            return Err(TaskError::fatal(
                "an instance cannot move between the ha plan and another: provision a new instance",
            ));
        }
        if let Some(wait) = owned_elsewhere(instance, &self.host) {
            return Ok(wait);
        }
        let params = Params::of(&update.parameters)?;
        let mut cluster = self.open_existing(ctx, instance)?;
        let http = &ctx.services.http;
        apply_settings(ctx, instance, &cluster, &params).await?;
        let dcs = dcs::dcs_config(
            self.timings,
            params.synchronous,
            &params.server.tuning_profile,
        );
        if let Some(wait) = scaling::to(ctx, &mut cluster, params.members, &dcs).await? {
            return Ok(wait);
        }
        let (view, leader) = match wait_ready(&cluster, http, INLINE_WAIT).await {
            Ok(ready) => ready,
            Err(why) => return Ok(Progress::wait_secs(1, why)),
        };
        let port = cluster
            .state
            .member(&leader)
            .map(|m| m.pg_port)
            .unwrap_or_default();
        postgres::add_extensions(
            &|db: &str| cluster.superuser(port, db),
            app_db_name(instance),
            &params.server.extensions,
        )
        .await?;
        instances::merge_details(
            ctx.pool,
            &instance.id,
            &json!({ "members": members_details(&cluster.state, Some(&view)), "primary": leader }),
        )
        .await
        .context("recording the cluster's members")?;
        Ok(Progress::Done(()))
    }

    async fn deprovision(
        &self,
        ctx: &TaskContext<'_>,
        instance: &InstanceRow,
        _bindings: &[BindingRow],
    ) -> Result<Progress<()>, TaskError> {
        if let Some(wait) = owned_elsewhere(instance, &self.host) {
            return Ok(wait);
        }
        let root = self.root_of(ctx.services.name_prefix(), instance);
        // Held until the folder is gone, so the reconcile loop cannot start a member again meanwhile.
        let mut tx = ctx
            .pool
            .begin()
            .await
            .context("locking the instance against the reconcile loop")?;
        lock_instance(&mut tx, LOCAL_LOCKS, &instance.id)
            .await
            .context("locking the instance against the reconcile loop")?;
        if root.exists() {
            cluster::stop_all(&Layout::new(root.clone()))
                .await
                .context("stopping the cluster")
                .map_err(local)?;
            std::fs::remove_dir_all(&root)
                .with_context(|| format!("removing {}", root.display()))
                .map_err(local)?;
        }
        tx.commit().await.context("releasing the instance lock")?;
        Ok(Progress::Done(()))
    }

    async fn bind(
        &self,
        ctx: &TaskContext<'_>,
        instance: &InstanceRow,
        binding: &BindingRow,
    ) -> Result<Progress<Bound>, TaskError> {
        if let Some(wait) = owned_elsewhere(instance, &self.host) {
            return Ok(wait);
        }
        let access = Access::of(binding)?;
        let cluster = self.open_existing(ctx, instance)?;
        let view = cluster
            .patroni(&ctx.services.http)
            .cluster()
            .await
            .map_err(local)?;
        let leader = match leader_or_wait(&view) {
            Ok(leader) => leader,
            Err(wait) => return Ok(wait),
        };
        let endpoints = endpoints(&cluster.state, &leader)?;
        let port = endpoints.primary.port;
        let made = grant_binding_role(
            &|db: &str| cluster.superuser(port, db),
            ctx.services.name_prefix(),
            instance,
            binding,
            access,
        )
        .await?;
        let (database, role, password) = made.into_parts();
        let database = database.as_str();
        let ca = std::fs::read_to_string(cluster.layout.ca_cert())
            .context("reading the cluster's CA")
            .map_err(local)?;
        Ok(Progress::Done(credentials::bound(
            &endpoints,
            database,
            (&role, &password, access.as_str()),
            &ca,
        )))
    }

    async fn database_target(
        &self,
        ctx: &TaskContext<'_>,
        instance: &InstanceRow,
        bindings: &[BindingRow],
    ) -> Result<Progress<DatabaseTarget>, TaskError> {
        if let Some(wait) = owned_elsewhere(instance, &self.host) {
            return Ok(wait);
        }
        let cluster = self.open_existing(ctx, instance)?;
        // Snapshots read and write the primary; replicas follow through WAL (template clones included).
        let port = match primary_port(ctx, &cluster).await? {
            Ok(port) => port,
            Err(wait) => return Ok(wait),
        };
        let prefix = ctx.services.name_prefix();
        Ok(Progress::Done(DatabaseTarget {
            login: ServerLogin {
                host: Host::Tcp("127.0.0.1".into()),
                port,
                user: SUPERUSER.to_string(),
                password: Some(secrecy::SecretString::from(
                    cluster.secrets.superuser.clone(),
                )),
                ssl_require: true,
                bin_dir: cluster.state.bin_dir.clone(),
            },
            database: app_db_name(instance).to_string(),
            owner: names::instance_owner_role(prefix, &instance.id),
            bindings: binding_grants(prefix, bindings)?,
            extensions: Params::of(&instance.parameters)?.server.extensions,
        }))
    }

    async fn unbind(
        &self,
        ctx: &TaskContext<'_>,
        instance: &InstanceRow,
        binding: &BindingRow,
    ) -> Result<Progress<()>, TaskError> {
        if let Some(wait) = owned_elsewhere(instance, &self.host) {
            return Ok(wait);
        }
        let Some(cluster) = self.open(ctx.services.name_prefix(), instance)? else {
            return Ok(Progress::Done(()));
        };
        let port = match primary_port(ctx, &cluster).await? {
            Ok(port) => port,
            Err(wait) => return Ok(wait),
        };
        revoke_binding_role(
            &|db: &str| cluster.superuser(port, db),
            ctx.services.name_prefix(),
            instance,
            binding,
        )
        .await?;
        Ok(Progress::Done(()))
    }

    async fn change_primary(
        &self,
        ctx: &TaskContext<'_>,
        instance: &InstanceRow,
        operation: Operation,
        candidate: Option<&str>,
    ) -> Result<Progress<()>, TaskError> {
        if let Some(wait) = owned_elsewhere(instance, &self.host) {
            return Ok(wait);
        }
        let cluster = self.open_existing(ctx, instance)?;
        let patroni = cluster.patroni(&ctx.services.http);
        let members = |view: &ClusterView| members_details(&cluster.state, Some(view));
        switchover::run(ctx, instance, &patroni, &members, operation, candidate).await
    }

    async fn reconcile(&self, pool: &PgPool, services: &Services) -> anyhow::Result<()> {
        let plan_ids = services.plan_ids_of_engine(ENGINE);
        if plan_ids.is_empty() {
            return Ok(());
        }
        let ready = instances::list_ready_on_host(pool, &plan_ids, &self.host)
            .await
            .context("listing the ha clusters")?;
        for instance in ready {
            let cluster = match self.open(services.name_prefix(), &instance) {
                Ok(Some(cluster)) => cluster,
                Ok(None) => {
                    warn!(instance_id = %instance.id, "the instance's cluster folder is missing");
                    continue;
                }
                Err(e) => {
                    warn!(instance_id = %instance.id, error = %e, "cannot open the instance's cluster");
                    continue;
                }
            };
            if let Err(e) = reconcile::heal(pool, services, &instance, &cluster, self.timings).await
            {
                warn!(instance_id = %instance.id, error = %format!("{e:#}"), "reconciling a cluster failed; will try again");
            }
        }
        Ok(())
    }
}
