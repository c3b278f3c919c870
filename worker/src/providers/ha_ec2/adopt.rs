//! A warm-pool cluster on EC2 made the instance's (docs/pools.md). Its resources get the instance's
//! `berth:instance` and `tags` in one CreateTags (their `Name`s, its scope and its security group keep the
//! item's: internal names). Then every password it was made with is replaced without writing to a VM: the
//! Patroni passwords are derived from the cluster's re-key key and a new nonce (`rekey`), kept sealed with a new
//! admin password before anything is set (a retry after a crash sets the same ones and connects with either),
//! and one transaction on the primary renames the app database, admin user and owner role, sets every role's
//! SCRAM verifier and writes the nonce into `berth.rekey`. It reaches every member through WAL; each member's
//! agent rewrites Patroni's configuration and reloads it. The take is done when every member's REST API takes
//! the new password.
//!
//! A cluster that lost a member's VM while it waited (the reconcile loop had not removed it yet) is not taken:
//! its resources are torn down and the provision takes the ordinary path, with new secrets.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use broker::{
    crypto::random_password,
    db::{instances, instances::InstanceRow},
    names::{self, quote_ident},
};
use serde_json::json;
use tracing::{info, warn};

use super::{
    HaEc2, access,
    access::{api_base, find_primary, host, patroni_http, superuser},
    group_name, names_key,
    params::Params,
    rekey,
    state::{ClusterState, Member, Secrets, Taking},
};
use crate::{
    context::TaskContext,
    providers::{
        Progress, Provider as _, Provisioned,
        ec2_common::{pooled, teardown, vm},
        patroni::{REPLICATION_USER, RESTAPI_USER, REWIND_USER, SUPERUSER, tls},
        postgres::{
            add_extensions, connect, exec, pooled_renames, rename_statements, scram,
            streaming_replicas,
        },
    },
    registry::TaskError,
};

/// Details key: a member's VM was gone at the take, so the provision went the ordinary way.
pub(super) const FELL_BACK: &str = "pool_fell_back";
/// How long the take waits for every member's Patroni to run with the new passwords.
const REKEY_WAIT: Duration = Duration::from_secs(60);

impl HaEc2 {
    pub(super) async fn adopt_cluster(
        &self,
        ctx: &TaskContext<'_>,
        instance: &InstanceRow,
        pool_item: &str,
    ) -> Result<Progress<Provisioned>, TaskError> {
        if instance.details.get(FELL_BACK).is_some() {
            return self.provision(ctx, instance).await;
        }
        let t0 = Instant::now();
        let params = Params::of(&instance.parameters)?;
        let prefix = ctx.services.name_prefix();
        let state = ClusterState::of(&instance.details);
        let client = self.account.client(&self.region_of(None, &state));
        let members: Vec<&Member> = state.members.iter().filter(|m| !m.retiring).collect();
        let vm_ids: Vec<String> = members.iter().filter_map(|m| m.vm_id.clone()).collect();
        let running = vm::vms(&client, &vm_ids)
            .await?
            .into_iter()
            .filter(|v| v.state == "running")
            .count();
        if members.is_empty() || vm_ids.len() < members.len() || running < members.len() {
            return self.fall_back(ctx, instance, pool_item, &state).await;
        }
        // One CreateTags: the instance's key and tags. `Name`s stay (each member's carries its slot).
        let tags: Vec<(String, String)> = super::resource_tags(prefix, instance, &params.tags)
            .into_iter()
            .filter(|(k, _)| k != "Name")
            .collect();
        let known: Vec<String> = members
            .iter()
            .flat_map(|m| [&m.vm_id, &m.interface_id, &m.allocation_id])
            .chain([&state.security_group_id])
            .flatten()
            .cloned()
            .collect();
        let tagged = vm::retag(&client, pool_item, &known, &tags).await?;
        let tagged_ms = t0.elapsed().as_millis();

        let secrets = next_secrets(ctx, instance).await?;
        let taking = secrets
            .taking
            .clone()
            .ok_or_else(|| TaskError::fatal("the take's nonce was not kept"))?;
        let pooled = Secrets {
            passwords: taking.pooled.clone(),
            ..secrets.clone()
        };
        // The primary, with the item's passwords or, on a retry after the commit, the new ones.
        let (primary, login) = match find_primary(&state, &pooled).await {
            Ok(primary) => (primary, &pooled),
            Err(first) => match find_primary(&state, &secrets).await {
                Ok(primary) => (primary, &secrets),
                Err(_) if !self.account.readiness_probe => {
                    return Ok(Progress::wait_secs(
                        5,
                        format!("waiting for the pooled cluster's primary ({first})"),
                    ));
                }
                Err(_) => return Err(first),
            },
        };
        let primary_host = host(primary).unwrap_or_default().to_string();
        let mut conn = connect(
            &superuser(&primary_host, login, "postgres"),
            "connecting to the pooled cluster's primary",
        )
        .await?;
        // A replica that is not streaming now could not come back after the commit (its configuration would
        // still hold the replication password the commit replaces): every one must stream first.
        let streaming = streaming_replicas(&mut conn).await?;
        if streaming + 1 < members.len() && login.passwords.superuser == taking.pooled.superuser {
            return Ok(Progress::wait_secs(
                2,
                format!(
                    "{streaming} of {} replicas streaming; waiting for all before the re-key",
                    members.len() - 1
                ),
            ));
        }
        let renames = pooled_renames(
            instance,
            prefix,
            pool_item,
            &params.cluster.server.app_db_name,
            &params.cluster.server.admin_user,
        );
        let mut batch = rename_statements(&mut conn, &renames).await?;
        batch.push(format!(
            "ALTER ROLE {} WITH LOGIN CREATEDB {}",
            quote_ident(&params.cluster.server.admin_user),
            scram::password_clause(&secrets.admin_password)?
        ));
        for (role, password) in [
            (SUPERUSER, &secrets.passwords.superuser),
            (REPLICATION_USER, &secrets.passwords.replication),
            (REWIND_USER, &secrets.passwords.rewind),
        ] {
            batch.push(format!(
                "ALTER ROLE {} WITH {}",
                quote_ident(role),
                scram::password_clause(password)?
            ));
        }
        batch.push(rekey::TABLE_SQL.to_string());
        // The renames, the verifiers and the nonce commit together: the members' agents act on the nonce only
        // once the passwords it derives are Postgres's.
        {
            let mut tx = sqlx::Connection::begin(&mut conn)
                .await
                .map_err(|e| crate::providers::postgres::classify(e, "starting the re-key"))?;
            exec(
                &mut tx,
                &batch.join(";\n"),
                "renaming the pooled cluster's objects and setting its new passwords",
            )
            .await?;
            sqlx::query(rekey::SET_NONCE_SQL)
                .bind(&taking.nonce)
                .execute(&mut *tx)
                .await
                .map_err(|e| crate::providers::postgres::classify(e, "writing the re-key nonce"))?;
            tx.commit()
                .await
                .map_err(|e| crate::providers::postgres::classify(e, "committing the re-key"))?;
        }
        drop(conn);
        let committed_ms = t0.elapsed().as_millis();
        wait_for_rekey(&state, &secrets, &taking.pooled.restapi).await?;
        let rekeyed_ms = t0.elapsed().as_millis();
        add_extensions(
            &|db: &str| superuser(&primary_host, &secrets, db),
            &params.cluster.server.app_db_name,
            &params.cluster.server.extensions,
        )
        .await?;
        info!(
            instance_id = %instance.id,
            pool_item,
            resources_tagged = tagged.len(),
            tags_ms = tagged_ms,
            renames_passwords_ms = committed_ms - tagged_ms,
            rekey_wait_ms = rekeyed_ms - committed_ms,
            extensions_ms = t0.elapsed().as_millis() - rekeyed_ms,
            "pooled ha cluster on EC2 adopted"
        );
        let kept = Secrets {
            taking: None,
            ..secrets
        };
        let view = self.view(&state, &kept).await.ok();
        let owner = names::instance_owner_role(prefix, &instance.id);
        let mut made = self.provisioned(instance, &state, &params, &kept, view, &owner)?;
        made.details["pool_item"] = json!(pool_item);
        made.details["rekey_wait_ms"] = json!(rekeyed_ms - committed_ms);
        Ok(Progress::Done(made))
    }

    /// A member's VM is gone: everything tagged with the item's id (or, after a re-tag, the instance's) goes,
    /// then the instance gets new secrets and an empty EC2 state, and the ordinary provision makes it.
    async fn fall_back(
        &self,
        ctx: &TaskContext<'_>,
        instance: &InstanceRow,
        pool_item: &str,
        state: &ClusterState,
    ) -> Result<Progress<Provisioned>, TaskError> {
        warn!(instance_id = %instance.id, pool_item, "a pooled cluster's VM is gone; provisioning the ordinary way");
        let client = self.account.client(&self.region_of(None, state));
        let prefix = ctx.services.name_prefix();
        // The instance's details name the item: its resources and its group go too.
        let torn_down = teardown::tear_down_instance(
            &client,
            instance,
            |key| group_name(prefix, key),
            Duration::from_secs(3),
            "pooled cluster's VMs",
        )
        .await?;
        if let Progress::Wait { after, progress } = torn_down {
            return Ok(Progress::Wait { after, progress });
        }
        let scope = names::instance_cluster(prefix, &instance.id);
        let ca = tls::new_ca(&scope)
            .await
            .map_err(|e| TaskError::Retryable(e.context("making the cluster's CA")))?;
        let fresh = ctx.services.cipher.seal_json(&Secrets::generate(ca));
        let reset = json!({ "ha_ec2": ClusterState::default(), FELL_BACK: true });
        let fresh_instance = pooled::start_over(ctx, instance, fresh, reset).await?;
        debug_assert_eq!(names_key(&fresh_instance), fresh_instance.id);
        self.provision(ctx, &fresh_instance).await
    }
}

/// The instance's secrets for the take: made and kept on the first try (the nonce, the Patroni passwords it
/// derives, a new admin password, and the item's passwords beside them), read back on a retry.
async fn next_secrets(ctx: &TaskContext<'_>, instance: &InstanceRow) -> Result<Secrets, TaskError> {
    let current = access::open_secrets(ctx.services, instance)?;
    if current.taking.is_some() {
        return Ok(current);
    }
    let key = current.rekey_key.as_deref().ok_or_else(|| {
        TaskError::fatal("the pooled cluster has no re-key key (made by an older berth)")
    })?;
    let nonce = rekey::new_nonce();
    let next = Secrets {
        passwords: rekey::derive(key, &nonce).map_err(TaskError::Fatal)?,
        admin_password: random_password(32),
        taking: Some(Taking {
            nonce,
            pooled: current.passwords.clone(),
        }),
        ..current
    };
    instances::set_secrets(
        ctx.pool,
        &instance.id,
        &ctx.services.cipher.seal_json(&next),
    )
    .await
    .context("keeping the instance's new passwords")?;
    Ok(next)
}

/// Waits until every member's Patroni REST API takes the new password (its agent applied the nonce and Patroni
/// reloaded): a no-op PATCH of the cluster's settings, which also wakes Patroni's loop. While one still refuses
/// it, a wake with the old password now and then makes a reload that waits for the loop happen sooner.
async fn wait_for_rekey(
    state: &ClusterState,
    secrets: &Secrets,
    old_restapi: &str,
) -> Result<(), TaskError> {
    let http = patroni_http(secrets)?;
    let deadline = tokio::time::Instant::now() + REKEY_WAIT;
    let waits = state
        .members
        .iter()
        .filter(|m| !m.retiring)
        .filter_map(|m| Some((m.name.clone(), api_base(host(m)?))))
        .map(|(name, base)| {
            let http = &http;
            async move {
                let patch = |password: &str| {
                    http.patch(format!("{base}/config"))
                        .basic_auth(RESTAPI_USER, Some(password.to_string()))
                        .json(&json!({ "postgresql": {} }))
                        .timeout(Duration::from_secs(3))
                        .send()
                };
                let mut tries = 0u32;
                loop {
                    if patch(&secrets.passwords.restapi)
                        .await
                        .is_ok_and(|r| r.status().is_success())
                    {
                        return Ok(());
                    }
                    if tokio::time::Instant::now() >= deadline {
                        return Err(TaskError::retryable(format!(
                            "member {name}'s Patroni did not take the new passwords within {} s (its re-key agent \
                             applies them: see `journalctl -u berth-rekey` on the VM)",
                            REKEY_WAIT.as_secs()
                        )));
                    }
                    tries += 1;
                    if tries.is_multiple_of(10) {
                        let _ = patch(old_restapi).await;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        });
    futures_util::future::try_join_all(waits).await?;
    Ok(())
}
