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
use serde_json::{Value, json};
use sqlx::postgres::PgConnectOptions;
use tracing::info;

use super::{HaLocal, cluster, cluster::LocalCluster, local, readiness::readiness, state::Secrets};
use crate::{
    context::TaskContext,
    providers::{
        Progress, Provisioned, local_processes,
        patroni::{Params, REPLICATION_USER, RESTAPI_USER, REWIND_USER, SUPERUSER, dcs},
        postgres::{
            self, DEFAULT_ADMIN, DEFAULT_APP_DB, Rename, connect, exec, roles::ensure_login, scram,
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
        // A pooled cluster still running as it was left is used as it is (the usual case: one look at its
        // processes and one at Patroni's view); one that stopped (the machine restarted) runs again.
        let running = match still_running(&cluster) {
            true => readiness(&cluster, &ctx.services.http).await.ok(),
            false => None,
        };
        let (view, leader) = match running {
            Some(ready) => ready,
            None => match self.start(ctx, &cluster, &Params::of(&json!({}))?).await? {
                Ok(ready) => ready,
                Err(wait) => return Ok(wait),
            },
        };
        let port = cluster
            .state
            .member(&leader)
            .map(|m| m.pg_port)
            .unwrap_or_default();
        let ready_ms = t0.elapsed().as_millis();

        let prefix = ctx.services.name_prefix();
        let recorded = |key: &str, default: &str| -> String {
            instance
                .details
                .get(key)
                .and_then(Value::as_str)
                .unwrap_or(default)
                .to_string()
        };
        let owner = names::instance_owner_role(prefix, &instance.id);
        let renames = [
            (
                Rename::Database,
                recorded("app_db_name", DEFAULT_APP_DB),
                params.server.app_db_name.clone(),
            ),
            (
                Rename::Role,
                recorded("admin_user", DEFAULT_ADMIN),
                params.server.admin_user.clone(),
            ),
            (
                Rename::Role,
                recorded("owner_role", &names::instance_owner_role(prefix, pool_item)),
                owner.clone(),
            ),
        ];
        let next = cluster
            .layout
            .ensure_next_secrets()
            .context("keeping the cluster's new passwords")
            .map_err(local)?;
        let admin_password = random_password(32);
        {
            let mut conn = connect_either(&cluster, &next, port).await?;
            // One transaction: one commit to wait for instead of one per statement, and a crash leaves all of
            // it or none for the retry.
            exec(&mut conn, "BEGIN", "starting the pooled cluster's changes").await?;
            for (kind, from, to) in &renames {
                kind.apply(&mut conn, from, to).await?;
            }
            ensure_login(
                &mut conn,
                &params.server.admin_user,
                "CREATEDB",
                &admin_password,
            )
            .await?;
            // The roles Patroni logs in as keep their attributes; only their passwords change. Replicas follow
            // through WAL.
            for (role, password) in [
                (SUPERUSER, &next.superuser),
                (REPLICATION_USER, &next.replication),
                (REWIND_USER, &next.rewind),
            ] {
                exec(
                    &mut conn,
                    &format!(
                        "ALTER ROLE {} WITH {}",
                        quote_ident(role),
                        scram::password_clause(password)?
                    ),
                    "setting a cluster role's new password",
                )
                .await?;
            }
            exec(
                &mut conn,
                "COMMIT",
                "committing the pooled cluster's changes",
            )
            .await?;
        }
        let old_restapi = cluster.secrets.restapi.clone();
        cluster
            .layout
            .commit_next_secrets(&next)
            .context("storing the cluster's new passwords")
            .map_err(local)?;
        cluster.secrets = next;
        let dcs = dcs::dcs_config(self.timings, false, &params.server.tuning_profile);
        for member in &cluster.state.members {
            cluster
                .ensure_member(member, &dcs)
                .await
                .context("writing a member's new Patroni configuration")
                .map_err(local)?;
        }
        let altered_ms = t0.elapsed().as_millis();
        reload_members(ctx, &cluster, &old_restapi).await?;
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
    old_restapi: &str,
) -> Result<(), TaskError> {
    let pids: Vec<u32> = cluster
        .state
        .members
        .iter()
        .flat_map(|m| cluster.patroni_pids(&m.name))
        .collect();
    local_processes::signal(&pids, "HUP").await;
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
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    futures_util::future::try_join_all(reloads).await?;
    Ok(())
}

/// Wakes the Patroni at `base` from its loop's sleep: a PATCH of the cluster's settings that changes nothing
/// (its own `loop_wait`), with whichever REST API password it takes. Best effort: without it the reload waits
/// for the member's next loop.
async fn wake(http: &reqwest::Client, base: &str, passwords: &[&str]) {
    let Ok(response) = http
        .get(format!("{base}/config"))
        .timeout(Duration::from_secs(2))
        .send()
        .await
    else {
        return;
    };
    let Some(loop_wait) = response
        .json::<Value>()
        .await
        .ok()
        .and_then(|c| c.get("loop_wait").cloned())
    else {
        return;
    };
    for password in passwords {
        let sent = http
            .patch(format!("{base}/config"))
            .basic_auth(RESTAPI_USER, Some(*password))
            .json(&json!({ "loop_wait": loop_wait }))
            .timeout(Duration::from_secs(2))
            .send()
            .await;
        if sent.is_ok_and(|r| r.status().as_u16() != 401) {
            return;
        }
    }
}

/// Whether etcd and every member's Patroni of a pooled cluster still run (one look at the processes).
fn still_running(cluster: &LocalCluster) -> bool {
    !cluster.etcd_pids().is_empty()
        && cluster
            .state
            .members
            .iter()
            .all(|m| !cluster.patroni_pids(&m.name).is_empty())
}
