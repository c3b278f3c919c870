//! A warm-pool cluster made the instance's (docs/pools.md): the app database, admin user and owner role get the
//! instance's names, and every password the cluster was made with is replaced (the admin user's, and the
//! superuser's, replication user's, rewind user's and REST API's that Patroni keeps in its configuration). The
//! new cluster passwords are saved beside the old ones first (`secrets.next.json`), so a retry after a crash sets
//! the same ones; Postgres gets them, then `secrets.json` and every member's Patroni configuration (files that a
//! restart or a failover reads), then each Patroni reloads.

use std::time::Duration;

use anyhow::Context as _;
use broker::{
    crypto::random_password,
    db::instances::InstanceRow,
    names::{self, quote_ident},
};
use serde_json::json;
use sqlx::postgres::PgConnectOptions;
use tracing::info;

use super::{HaLocal, cluster, cluster::LocalCluster, local, state::Secrets};
use crate::{
    context::TaskContext,
    providers::{
        Progress, Provisioned, local_processes,
        patroni::{
            ClusterView, Params, REPLICATION_USER, RESTAPI_USER, REWIND_USER, SUPERUSER, dcs,
        },
        postgres::{
            self, connect, exec, pooled_renames, rename_statements, scram, streaming_replicas,
        },
    },
    registry::TaskError,
};

/// How long the adopt step waits for every member's Patroni to take its new configuration.
const RELOAD_WAIT: Duration = Duration::from_secs(15);

impl HaLocal {
    pub(super) async fn adopt_cluster(
        &self,
        ctx: &TaskContext<'_>,
        instance: &InstanceRow,
        pool_item: &str,
    ) -> Result<Progress<Provisioned>, TaskError> {
        let params = Params::of(&instance.parameters)?;
        let t0 = std::time::Instant::now();
        let mut cluster = self.open_existing(ctx, instance)?;
        // The new passwords, generated once: a retry after a crash finds them and sets the same ones. They
        // must be on disk before Postgres commits them; the write overlaps the look at the cluster and the
        // statements, and is waited for before the commit.
        let kept = cluster
            .layout
            .load_next_secrets()
            .context("reading the cluster's new passwords")
            .map_err(local)?;
        let next = kept.clone().unwrap_or_else(Secrets::generate);
        let mut keeping = kept.is_none().then(|| {
            let (layout, next) = (cluster.layout.clone(), next.clone());
            tokio::task::spawn_blocking(move || layout.keep_next_secrets(&next))
        });
        // The password statements' SCRAM verifiers (thousands of hash rounds each) are computed on a blocking
        // thread while the cluster is looked at.
        let admin_password = random_password(32);
        let hashing = {
            let (next, admin_user, admin_password) = (
                next.clone(),
                params.server.admin_user.clone(),
                admin_password.clone(),
            );
            tokio::task::spawn_blocking(move || {
                password_statements(&next, &admin_user, &admin_password)
            })
        };
        // A pooled cluster still running as it was left is taken as it is (the usual case: one look at its
        // processes, at Patroni's view and, on the connection the changes then use, at its replicas); one that
        // stopped (the machine restarted) goes through the start path.
        let presumed_primary = instance.details["primary"].as_str();
        let found = match as_found(ctx, &cluster, &next, presumed_primary).await {
            Some(found) => found,
            None => {
                // The start path hands the cluster's folder to its owner (a walk over every file): the write
                // must be done first.
                if let Some(keeping) = keeping.take() {
                    keep_done(keeping).await?;
                }
                let (view, leader) =
                    match self.start(ctx, &cluster, &Params::of(&json!({}))?).await? {
                        Ok(ready) => ready,
                        Err(wait) => return Ok(wait),
                    };
                let port = primary_port(&cluster, &leader);
                let (_, patroni_pids) = cluster.running_processes();
                Found {
                    conn: connect_either(&cluster, &next, port).await?,
                    view,
                    leader,
                    port,
                    patroni_pids: patroni_pids.concat(),
                }
            }
        };
        let Found {
            view,
            leader,
            port,
            mut conn,
            patroni_pids,
        } = found;
        let ready_ms = t0.elapsed().as_millis();

        let prefix = ctx.services.name_prefix();
        let owner = names::instance_owner_role(prefix, &instance.id);
        let renames = pooled_renames(
            instance,
            prefix,
            pool_item,
            &params.server.app_db_name,
            &params.server.admin_user,
        );
        // Every change in one batch: one round trip and one commit (a batch of statements runs as one
        // transaction), so a crash leaves all of it or none for the retry. The roles Patroni logs in as keep
        // their attributes; only their passwords change. Replicas follow through WAL.
        let mut batch = rename_statements(&mut conn, &renames).await?;
        batch.extend(
            hashing
                .await
                .map_err(|e| TaskError::retryable(format!("hashing the new passwords: {e}")))??,
        );
        if let Some(keeping) = keeping {
            keep_done(keeping).await?;
        }
        exec(
            &mut conn,
            &batch.join(";\n"),
            "renaming the pooled cluster's objects and setting its new passwords",
        )
        .await?;
        drop(conn);
        let old_restapi = cluster.secrets.restapi.clone();
        cluster.secrets = next;
        // `secrets.json` and every member's configuration written side by side: their syncs to disk overlap.
        let dcs = dcs::dcs_config(self.timings, false, &params.server.tuning_profile);
        std::thread::scope(|scope| {
            let secrets = scope.spawn(|| {
                cluster
                    .layout
                    .commit_next_secrets(&cluster.secrets)
                    .context("storing the cluster's new passwords")
            });
            let configs: Vec<_> = cluster
                .state
                .members
                .iter()
                .map(|member| {
                    scope.spawn(|| {
                        cluster
                            .write_member_config(member, &dcs)
                            .context("writing a member's new Patroni configuration")
                    })
                })
                .collect();
            std::iter::once(secrets)
                .chain(configs)
                .try_for_each(|written| {
                    written
                        .join()
                        .unwrap_or_else(|e| std::panic::resume_unwind(e))
                })
        })
        .map_err(local)?;
        let altered_ms = t0.elapsed().as_millis();
        reload_members(ctx, &cluster, &patroni_pids, &old_restapi).await?;
        let reloaded_ms = t0.elapsed().as_millis();
        postgres::add_extensions(
            &|db: &str| cluster.superuser(port, db),
            &params.server.app_db_name,
            &params.server.extensions,
        )
        .await?;
        info!(
            instance_id = %instance.id,
            pool_item,
            ready_ms,
            renames_passwords_ms = altered_ms - ready_ms,
            patroni_reload_ms = reloaded_ms - altered_ms,
            extensions_ms = t0.elapsed().as_millis() - reloaded_ms,
            "pooled ha cluster adopted"
        );
        let mut made =
            self.provisioned(&cluster, (&view, &leader), &params, &owner, &admin_password);
        made.details["pool_item"] = json!(pool_item);
        Ok(Progress::Done(made))
    }
}

/// The statements that give the admin user and the roles Patroni logs in as their new passwords (as SCRAM
/// verifiers: no password in SQL text). The roles keep their attributes.
fn password_statements(
    next: &Secrets,
    admin_user: &str,
    admin_password: &str,
) -> Result<Vec<String>, TaskError> {
    let mut statements = vec![format!(
        "ALTER ROLE {} WITH LOGIN CREATEDB {}",
        quote_ident(admin_user),
        scram::password_clause(admin_password)?
    )];
    for (role, password) in [
        (SUPERUSER, &next.superuser),
        (REPLICATION_USER, &next.replication),
        (REWIND_USER, &next.rewind),
    ] {
        statements.push(format!(
            "ALTER ROLE {} WITH {}",
            quote_ident(role),
            scram::password_clause(password)?
        ));
    }
    Ok(statements)
}

/// The superuser's connection to the primary, with the cluster's current password or, after a crash between
/// setting the new one and storing it, the new one.
async fn connect_either(
    cluster: &LocalCluster,
    next: &Secrets,
    port: u16,
) -> Result<sqlx::PgConnection, TaskError> {
    let with = |password: &str| -> PgConnectOptions {
        cluster.superuser(port, "postgres").password(password)
    };
    match connect(
        &with(&cluster.secrets.superuser),
        "connecting to the pooled cluster",
    )
    .await
    {
        Ok(conn) => Ok(conn),
        Err(first) => connect(&with(&next.superuser), "connecting to the pooled cluster")
            .await
            .map_err(|_| first),
    }
}

/// Every member's Patroni reads its configuration again (SIGHUP), woken at once rather than at its next loop
/// (a no-op change of the cluster's settings wakes the member it is sent to); done when each one's REST API
/// takes the new password. The members are asked side by side.
async fn reload_members(
    ctx: &TaskContext<'_>,
    cluster: &LocalCluster,
    patroni_pids: &[u32],
    old_restapi: &str,
) -> Result<(), TaskError> {
    local_processes::signal(patroni_pids, "HUP").await;
    let http = &ctx.services.http;
    let new_restapi = cluster.secrets.restapi.as_str();
    let deadline = tokio::time::Instant::now() + RELOAD_WAIT;
    let reloads = cluster.state.members.iter().map(|member| async move {
        let base = cluster::api_base(member);
        wake(http, &base, &[old_restapi, new_restapi]).await;
        loop {
            let accepted = http
                .post(format!("{base}/reload"))
                .basic_auth(RESTAPI_USER, Some(new_restapi))
                .timeout(Duration::from_secs(2))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if accepted {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(TaskError::retryable(format!(
                    "member {}'s Patroni did not take its new configuration within {} s",
                    member.name,
                    RELOAD_WAIT.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    futures_util::future::try_join_all(reloads).await?;
    Ok(())
}

/// Wakes the Patroni at `base` from its loop's sleep: a PATCH of the cluster's settings that changes nothing
/// (an empty `postgresql` section: berth's clusters always have one), with whichever REST API password it
/// takes. Best effort: without it the reload waits for the member's next loop.
async fn wake(http: &reqwest::Client, base: &str, passwords: &[&str]) {
    for password in passwords {
        let sent = http
            .patch(format!("{base}/config"))
            .basic_auth(RESTAPI_USER, Some(*password))
            .json(&json!({ "postgresql": {} }))
            .timeout(Duration::from_secs(2))
            .send()
            .await;
        if sent.is_ok_and(|r| r.status().as_u16() != 401) {
            return;
        }
    }
}

/// A pooled cluster found running, and the superuser's connection to its primary.
struct Found {
    view: ClusterView,
    leader: String,
    port: u16,
    conn: sqlx::PgConnection,
    patroni_pids: Vec<u32>,
}

/// The cluster as it is, when etcd and every member's Patroni run, Patroni's view has a primary and healthy
/// replicas, and the primary sees each of them streaming; `None` otherwise (the start path then follows).
/// The connection to `presumed_primary` (the primary when the cluster was made) opens while Patroni is asked,
/// and is used when Patroni names the same primary.
async fn as_found(
    ctx: &TaskContext<'_>,
    cluster: &LocalCluster,
    next: &Secrets,
    presumed_primary: Option<&str>,
) -> Option<Found> {
    let (etcd, patroni) = cluster.running_processes();
    if etcd.is_empty() || patroni.iter().any(Vec::is_empty) {
        return None;
    }
    let presumed_port = presumed_primary.map(|name| primary_port(cluster, name));
    let patroni_api = cluster.patroni(&ctx.services.http);
    let presumed_conn = async {
        match presumed_port {
            Some(port) => connect_either(cluster, next, port).await.ok(),
            None => None,
        }
    };
    let (view, presumed_conn) = tokio::join!(patroni_api.cluster(), presumed_conn);
    let view = view.ok()?;
    let leader = view
        .ready_primary(cluster.state.members.iter().map(|m| m.name.as_str()))
        .ok()?
        .name
        .clone();
    let port = primary_port(cluster, &leader);
    let mut conn = match presumed_conn {
        Some(conn) if presumed_port == Some(port) => conn,
        _ => connect_either(cluster, next, port).await.ok()?,
    };
    let streaming = streaming_replicas(&mut conn).await.ok()?;
    (streaming + 1 >= cluster.state.members.len()).then_some(Found {
        view,
        leader,
        port,
        conn,
        patroni_pids: patroni.concat(),
    })
}

fn primary_port(cluster: &LocalCluster, leader: &str) -> u16 {
    cluster
        .state
        .member(leader)
        .map(|m| m.pg_port)
        .unwrap_or_default()
}

/// Waits for the background write of the new passwords.
async fn keep_done(keeping: tokio::task::JoinHandle<anyhow::Result<()>>) -> Result<(), TaskError> {
    keeping
        .await
        .map_err(|e| TaskError::retryable(format!("keeping the new passwords: {e}")))?
        .context("keeping the cluster's new passwords")
        .map_err(local)
}
