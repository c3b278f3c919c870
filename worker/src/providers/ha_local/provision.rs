//! The steps of an `ha_local` provision: the programs it needs, the cluster's folder, state and secrets, its
//! processes started until it is ready, and what the instance's details and secrets keep of it.

use std::path::PathBuf;

use anyhow::Context as _;
use broker::{db::instances::InstanceRow, embedded, names};
use serde_json::json;

use super::{
    HaLocal, INLINE_WAIT,
    cluster::LocalCluster,
    config, local, members_details,
    readiness::wait_ready,
    state::{ClusterState, Layout},
};
use crate::{
    context::TaskContext,
    providers::{
        Progress, Provisioned,
        patroni::{ClusterView, Params, dcs},
    },
    registry::TaskError,
};

/// `etcd` and `patroni` must be installed on this host.
pub(super) fn check_programs(host: &str) -> Result<(), TaskError> {
    for program in ["etcd", "patroni"] {
        if !broker::config::on_path(program) {
            return Err(TaskError::fatal(format!(
                "`{program}` is not installed on host {host}: the ha plan's local engine needs Debian's etcd-server \
                 and patroni packages (apt-get install etcd-server patroni)"
            )));
        }
    }
    Ok(())
}

/// The Postgres programs the members run: those of the version asked for, else the newest installed.
fn bin_dir(params: &Params) -> Result<PathBuf, TaskError> {
    match &params.server.postgres_version {
        Some(version) => embedded::bin_dir_for_version(version)
            .map_err(|e| TaskError::Fatal(e.context("parameter `postgres_version`"))),
        None => {
            embedded::find_bin_dir().map_err(|e| TaskError::Fatal(e.context("the ha_local engine")))
        }
    }
}

/// The major version of the programs in `bin_dir` (`/usr/lib/postgresql/<major>/bin`), or the version asked for.
fn major_version(bin_dir: &std::path::Path, params: &Params) -> String {
    bin_dir
        .parent()
        .and_then(|v| v.file_name())
        .and_then(|v| v.to_str())
        .filter(|v| !v.is_empty() && v.chars().all(|c| c.is_ascii_digit()))
        .map(str::to_string)
        .or_else(|| params.server.postgres_version.clone())
        .unwrap_or_default()
}

impl HaLocal {
    /// Provision, step 1: the cluster's folder, its state (ports and members, chosen once) and its secrets.
    pub(super) fn create(
        &self,
        ctx: &TaskContext<'_>,
        instance: &InstanceRow,
        params: &Params,
    ) -> Result<LocalCluster, TaskError> {
        let bin_dir = bin_dir(params)?;
        let prefix = ctx.services.name_prefix();
        let root = self.root_of(prefix, instance);
        std::fs::create_dir_all(&root)
            .with_context(|| format!("creating {}", root.display()))
            .map_err(local)?;
        let layout = Layout::new(root);
        let state = match layout.load_state().map_err(local)? {
            Some(state) => state,
            None => {
                let version = major_version(&bin_dir, params);
                let scope = names::instance_cluster(prefix, &instance.id);
                let state =
                    ClusterState::new(scope, version, bin_dir, params.members).map_err(local)?;
                layout.save_state(&state).map_err(local)?;
                state
            }
        };
        let secrets = layout.ensure_secrets().map_err(local)?;
        let run_as = embedded::os_user_for_postgres().map_err(TaskError::Fatal)?;
        Ok(LocalCluster {
            layout,
            state,
            secrets,
            run_as,
        })
    }

    /// Provision, step 2: etcd and every member's Patroni running, until a primary leads streaming replicas
    /// (and, with `synchronous`, a synchronous standby is chosen). A `Wait` while it is not so.
    pub(super) async fn start<T>(
        &self,
        ctx: &TaskContext<'_>,
        cluster: &LocalCluster,
        params: &Params,
    ) -> Result<Result<(ClusterView, String), Progress<T>>, TaskError> {
        cluster
            .prepare()
            .await
            .context("preparing the cluster's folder")
            .map_err(local)?;
        cluster
            .ensure_etcd(&ctx.services.http)
            .await
            .context("starting etcd")
            .map_err(local)?;
        let dcs = dcs::dcs_config(
            self.timings,
            params.synchronous,
            &params.server.tuning_profile,
        );
        for member in &cluster.state.members {
            cluster
                .ensure_member(member, &dcs)
                .await
                .context("starting Patroni")
                .map_err(local)?;
        }
        ctx.progress(&format!("starting {} members", cluster.state.members.len()))
            .await?;
        let (view, leader) = match wait_ready(cluster, &ctx.services.http, INLINE_WAIT).await {
            Ok(ready) => ready,
            Err(why) => {
                return Ok(Err(Progress::wait_secs(
                    1,
                    format!("starting the cluster: {why}"),
                )));
            }
        };
        // With `synchronous`, the instance is handed over only once a commit waits for a standby: a write
        // acknowledged before Patroni chose one could be lost in a failover.
        if params.synchronous && !view.members.iter().any(|m| m.role == "sync_standby") {
            return Ok(Err(Progress::wait_secs(
                1,
                "starting the cluster: waiting for Patroni to choose a synchronous standby",
            )));
        }
        Ok(Ok((view, leader)))
    }

    /// What the instance's details and secrets keep of a cluster that is ready.
    pub(super) fn provisioned(
        &self,
        cluster: &LocalCluster,
        (view, leader): (&ClusterView, &str),
        params: &Params,
        owner: &str,
        admin_password: &str,
    ) -> Provisioned {
        let secrets = &cluster.secrets;
        Provisioned {
            details: json!({
                "engine_host": self.host,
                "cluster_dir": cluster.layout.root.display().to_string(),
                "scope": cluster.state.scope,
                "host": config::HOST,
                "etcd_port": cluster.state.etcd_client_port,
                "members": members_details(&cluster.state, Some(view)),
                "primary": leader,
                "postgres_version": cluster.state.postgres_version,
                "app_db_name": params.server.app_db_name,
                "admin_user": params.server.admin_user,
                "owner_role": owner,
                "tuning_profile": params.server.tuning_profile,
                "synchronous": params.synchronous,
                "patroni": self.timings,
                "tls": true,
                "ready_at": chrono::Utc::now(),
                "restarts": 0,
            }),
            secrets: Some(json!({
                "admin_password": admin_password,
                "superuser_password": secrets.superuser,
                "replication_password": secrets.replication,
                "rewind_password": secrets.rewind,
                "patroni_api_password": secrets.restapi,
            })),
        }
    }
}
