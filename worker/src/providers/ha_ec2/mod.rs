//! The `ha_ec2` engine of the `ha` plan (`HA_ENGINE=ec2`): a Patroni + etcd cluster of N members, each on an EC2
//! VM of its own, spread round-robin over availability zones. berth writes no consensus or failover: each VM's
//! cloud-init user-data ([`user_data`]) installs etcd, Patroni and PostgreSQL and starts them with the member
//! list; Patroni elects and fails over. berth launches and replaces the VMs, scales one member at a time and
//! asks Patroni (when a worker can reach its REST API) for switchovers.
//!
//! Provisioning is a state machine over `details.ha_ec2`, a step per task run, like the dedicated `ec2` engine
//! (whose EC2 pieces live in `ec2_common`): zones and candidates → security group → a network interface per
//! member slot (so every member's address is known before any user-data is rendered, and kept across VM
//! replacements) → a VM per slot → all running → (Patroni reports a primary and streaming replicas, unless
//! `EC2_READINESS_PROBE=off`). Every resource carries `berth:instance=<id>` (and `berth:member=<slot>`) and is
//! looked up by its tags before it is made; RunInstances also gets a ClientToken per slot, VM generation and
//! candidate, which AWS deduplicates.
//!
//! Membership without the broker reaching etcd: a VM that joins a running cluster (a replacement, or a
//! scale-up) removes its slot's old etcd member and adds itself through the surviving peers before its etcd
//! starts (`etcd-membership.sh join`); members drop the etcd members the broker retired by a scale-down, which
//! they learn from their own `berth:members` tag in the instance metadata (`etcd-membership.sh prune`).

mod access;
mod members;
mod network;
mod params;
mod reconcile;
mod scaling;
mod state;
mod user_data;

use std::time::Duration;

use anyhow::Context as _;
use async_trait::async_trait;
use broker::{
    config::Settings,
    db::{bindings::BindingRow, instances, instances::InstanceRow},
    ec2::candidates,
    model::{Operation, UpdatePayload},
    names,
};
use serde_json::{Value, json};
use sqlx::PgPool;
use tracing::info;

use self::{
    access::{
        find_primary, host, members_details, not_ready, open_secrets, patroni_bases, patroni_http,
        superuser,
    },
    members::LaunchInput,
    params::Params,
    state::{ClusterState, Member, Secrets},
    user_data::{API_PORT, PG_PORT},
};
use super::{
    Bound, Progress, Provider, Provisioned,
    ec2_common::{Ec2Account, available_zones, offers, vm},
    ha_local::{
        credentials::{self, Address, Endpoints},
        patroni::{ClusterView, Patroni},
        state::SUPERUSER,
        switchover,
        timings::Timings,
        tls,
    },
    postgres::{
        self, Access, app_db_name, binding_grants, grant_binding_role, revoke_binding_role,
    },
};
use crate::{
    context::{Services, TaskContext},
    registry::TaskError,
    snapshots::{
        DatabaseTarget, ServerLogin,
        target::{Host, client_bin_dir},
    },
};

pub use user_data::{Rendered, render as render_user_data};

/// The plan engine this provider serves.
pub const ENGINE: &str = "ha_ec2";
/// How long the cluster may take to elect a primary after its VMs run (cloud-init installs everything).
const READY_LIMIT_SECS: i64 = 20 * 60;

pub struct HaEc2 {
    account: Ec2Account,
    /// Patroni timings of the clusters this worker makes (kept in etcd: later changes leave existing ones).
    timings: Timings,
}

impl std::fmt::Debug for HaEc2 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HaEc2")
            .field("account", &self.account)
            .field("timings", &self.timings)
            .finish()
    }
}

fn wait<T>(secs: u64, progress: impl Into<String>) -> Result<Progress<T>, TaskError> {
    Ok(Progress::Wait {
        after: Duration::from_secs(secs),
        progress: progress.into(),
    })
}

/// The security group's name (unique per VPC), also the resources' `Name`.
fn group_name(prefix: &str, instance_id: &str) -> String {
    format!(
        "{}ha-{}",
        prefix.replace('_', "-"),
        names::short_hash(instance_id)
    )
}

/// Tags of every resource of the cluster.
fn resource_tags(
    prefix: &str,
    instance_id: &str,
    extra: &[(String, String)],
) -> Vec<(String, String)> {
    let mut tags = vec![
        (vm::TAG.to_string(), instance_id.to_string()),
        ("Name".to_string(), group_name(prefix, instance_id)),
    ];
    tags.extend(extra.iter().filter(|(k, _)| k != "Name").cloned());
    tags
}

/// The cluster's secrets: opened, or generated (with the cluster's CA) and sealed before anything is launched.
async fn secrets(
    ctx: &TaskContext<'_>,
    instance: &InstanceRow,
    scope: &str,
) -> Result<Secrets, TaskError> {
    if let Some(sealed) = &instance.secrets {
        return ctx
            .services
            .cipher
            .open_json(sealed)
            .map_err(|e| TaskError::Fatal(e.context("opening the cluster's secrets")));
    }
    let ca = tls::new_ca(scope)
        .await
        .map_err(|e| TaskError::Retryable(e.context("making the cluster's CA")))?;
    let made = Secrets::generate(ca);
    instances::set_secrets(
        ctx.pool,
        &instance.id,
        &ctx.services.cipher.seal_json(&made),
    )
    .await
    .context("keeping the generated secrets")?;
    Ok(made)
}

impl HaEc2 {
    pub fn new(settings: &Settings, timings: Timings) -> anyhow::Result<Self> {
        timings
            .check()
            .map_err(|e| anyhow::anyhow!("HA_PATRONI_TTL, _LOOP_WAIT, _RETRY_TIMEOUT: {e}"))?;
        Ok(Self {
            account: Ec2Account::new(settings, ENGINE)?,
            timings,
        })
    }

    fn region_of(&self, params_region: Option<&str>, state: &ClusterState) -> String {
        Some(state.region.clone())
            .filter(|r| !r.is_empty())
            .or(params_region.map(str::to_string))
            .unwrap_or_else(|| self.account.default_region.clone())
    }
}

#[async_trait]
impl Provider for HaEc2 {
    async fn provision(
        &self,
        ctx: &TaskContext<'_>,
        instance: &InstanceRow,
    ) -> Result<Progress<Provisioned>, TaskError> {
        let params = Params::of(&instance.parameters)?;
        let prefix = ctx.services.name_prefix();
        let mut state = ClusterState::of(&instance.details);
        let region = self.region_of(params.region.as_deref(), &state);
        let client = self.account.client(&region);
        let scope = names::instance_cluster(prefix, &instance.id);
        let secrets = secrets(ctx, instance, &scope).await?;

        // 1. Zones (the asked ones, else the region's), each zone's candidates, and the member slots.
        if state.members.is_empty() {
            let available = available_zones(&client).await?;
            let explicit = !params.zones.is_empty();
            let zones = if explicit {
                if let Some(bad) = params.zones.iter().find(|z| !available.contains(z)) {
                    return Err(TaskError::fatal(format!(
                        "zone {bad} is not an available zone of {region} ({})",
                        available.join(", ")
                    )));
                }
                params.zones.clone()
            } else {
                available
            };
            let offers = offers::fresh(
                ctx.pool,
                &client,
                &region,
                self.account.offers_ttl_secs,
                &self.account.on_demand,
            )
            .await?;
            let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::from_entropy();
            for zone in zones {
                let mut in_zone = params.requirements.clone();
                in_zone.zone = Some(zone.clone());
                let list = candidates(&offers, &in_zone, &[], &mut rng);
                if list.is_empty() {
                    if explicit {
                        return Err(TaskError::fatal(format!(
                            "no matching instance type is offered in zone {zone}"
                        )));
                    }
                    continue;
                }
                state.zones.push(zone.clone());
                state.candidates.insert(zone, list);
            }
            if state.zones.is_empty() {
                return Err(TaskError::fatal(format!(
                    "no instance type in {region} meets the parameters (cpu, ram, arch, family, max_price); \
                     GET /berth/v1/price-check shows what does"
                )));
            }
            state.region = region.clone();
            state.scope = scope.clone();
            state.token_seed = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
            for _ in 0..params.cluster.members {
                state.add_member(false);
            }
            state.save(ctx.pool, &instance.id).await?;
        }
        let tags = resource_tags(prefix, &instance.id, &params.tags);

        // 2. The security group, and the VPC's range for pg_hba.
        if state.security_group_id.is_none() {
            ctx.progress("creating the security group").await?;
            let (_, vpc) = vm::subnet(&client, &state.zones[0], &self.account.subnets).await?;
            let id = network::ensure_security_group(
                &client,
                &group_name(prefix, &instance.id),
                &vpc,
                &self.account.allowed_cidr,
                !params.ssh_keys.is_empty(),
                &tags,
            )
            .await?;
            state.vpc_cidr = Some(network::vpc_cidr(&client, &vpc).await?);
            state.vpc_id = Some(vpc);
            state.security_group_id = Some(id);
            state.save(ctx.pool, &instance.id).await?;
        }

        // 3. A network interface per slot: every member's address, before any user-data is rendered.
        self.ensure_interfaces(
            ctx.pool,
            &client,
            &instance.id,
            &mut state,
            params.public_ip,
            &tags,
        )
        .await?;

        // 4. A VM per slot, running.
        let owner = names::instance_owner_role(prefix, &instance.id);
        let input = LaunchInput {
            client: &client,
            instance,
            params: &params,
            secrets: &secrets,
            tags: &tags,
            owner_role: &owner,
        };
        let live = self.ensure_vms(ctx.pool, &mut state, &input).await?;
        let running = state
            .members
            .iter()
            .filter(|m| live.get(&m.name).is_some_and(|v| v.state == "running"))
            .count();
        if running < state.members.len() {
            return wait(
                3,
                format!("{running} of {} members' VMs running", state.members.len()),
            );
        }

        // 5. Patroni reports a primary and every replica streaming.
        let mut view = None;
        if self.account.readiness_probe {
            let why = match self.view(&state, &secrets).await {
                Ok(seen) => match not_ready(&state, &seen) {
                    None => {
                        view = Some(seen);
                        None
                    }
                    Some(why) => Some(why),
                },
                Err(e) => Some(format!("Patroni does not answer yet ({e})")),
            };
            if let Some(why) = why {
                let first = state
                    .members
                    .iter()
                    .filter_map(|m| m.launched_at)
                    .min()
                    .unwrap_or(0);
                if chrono::Utc::now().timestamp() - first > READY_LIMIT_SECS {
                    return Err(TaskError::fatal(format!(
                        "the cluster was not ready within {} minutes of its VMs' launch ({why}); see \
                         /var/log/berth-setup.log on the VMs",
                        READY_LIMIT_SECS / 60
                    )));
                }
                return wait(
                    10,
                    format!("starting the cluster (cloud-init installs it): {why}"),
                );
            }
        }
        let primary = view
            .as_ref()
            .and_then(|v| v.leader())
            .map(|l| l.name.clone());
        let mut details = instance.details.clone();
        let patch = json!({
            "ha_ec2": state,
            "scope": state.scope,
            "region": state.region,
            "members": members_details(&state, view.as_ref()),
            "primary": primary,
            "postgres_version": params.postgres_version(),
            "app_db_name": params.cluster.server.app_db_name,
            "admin_user": params.cluster.server.admin_user,
            "owner_role": owner,
            "tuning_profile": params.cluster.server.tuning_profile,
            "synchronous": params.cluster.synchronous,
            "patroni": self.timings,
            "tls": true,
            "ready_at": chrono::Utc::now(),
            "recoveries": 0,
        });
        if let (Some(map), Some(patch)) = (details.as_object_mut(), patch.as_object()) {
            map.extend(patch.clone());
        }
        info!(instance_id = %instance.id, members = state.members.len(), zones = ?state.zones, primary = ?primary, "ha cluster on EC2 ready");
        Ok(Progress::Done(Provisioned {
            details,
            secrets: Some(serde_json::to_value(&secrets).context("keeping the secrets")?),
        }))
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
        let params = Params::of(&update.parameters)?;
        let secrets = open_secrets(ctx.services, instance)?;
        let mut state = ClusterState::of(&instance.details);
        let client = self.account.client(&self.region_of(None, &state));
        scaling::apply_settings(self, ctx, instance, &state, &secrets, &params).await?;
        let prefix = ctx.services.name_prefix();
        let tags = resource_tags(prefix, &instance.id, &params.tags);
        let owner = names::instance_owner_role(prefix, &instance.id);
        // The VMs keep the parameters they were made with (hardware, zones); `members` changes their number.
        let made_with = Params::of(&instance.parameters)?;
        let input = LaunchInput {
            client: &client,
            instance,
            params: &made_with,
            secrets: &secrets,
            tags: &tags,
            owner_role: &owner,
        };
        if let Some(wait) =
            scaling::step(self, ctx, &mut state, &input, params.cluster.members).await?
        {
            return Ok(wait);
        }
        if !params.cluster.server.extensions.is_empty() {
            let primary = find_primary(&state, &secrets).await?;
            let h = host(primary).unwrap_or_default().to_string();
            postgres::add_extensions(
                &|db: &str| superuser(&h, &secrets, db),
                app_db_name(instance),
                &params.cluster.server.extensions,
            )
            .await?;
        }
        Ok(Progress::Done(()))
    }

    async fn deprovision(
        &self,
        ctx: &TaskContext<'_>,
        instance: &InstanceRow,
        _bindings: &[BindingRow],
    ) -> Result<Progress<()>, TaskError> {
        super::wait_for_reconcile(ctx.pool, super::HA_EC2_LOCKS, &instance.id)
            .await
            .context("waiting for the reconcile loop to leave the cluster")?;
        let state = ClusterState::of(&instance.details);
        let params_region = instance.parameters.get("region").and_then(Value::as_str);
        let client = self.account.client(&self.region_of(params_region, &state));
        let group = group_name(ctx.services.name_prefix(), &instance.id);
        super::ec2_common::teardown::tear_down(
            &client,
            &instance.id,
            &group,
            Duration::from_secs(3),
            "VMs",
        )
        .await
    }

    async fn bind(
        &self,
        ctx: &TaskContext<'_>,
        instance: &InstanceRow,
        binding: &BindingRow,
    ) -> Result<Progress<Bound>, TaskError> {
        let access = Access::of(binding)?;
        let secrets = open_secrets(ctx.services, instance)?;
        let state = ClusterState::of(&instance.details);
        let primary = find_primary(&state, &secrets).await?;
        let address = |m: &Member| Address {
            host: host(m).unwrap_or_default().to_string(),
            port: PG_PORT,
        };
        let endpoints = Endpoints {
            primary: address(primary),
            replicas: state
                .members
                .iter()
                .filter(|m| !m.retiring && m.name != primary.name)
                .map(address)
                .collect(),
        };
        let h = endpoints.primary.host.clone();
        let made = grant_binding_role(
            &|db: &str| superuser(&h, &secrets, db),
            ctx.services.name_prefix(),
            instance,
            binding,
            access,
        )
        .await?;
        let (database, role, password) = made.into_parts();
        let database = database.as_str();
        Ok(Progress::Done(Bound {
            details: json!({
                "endpoints": endpoints.osb(),
                "role": role,
                "database": database,
                "access": access.as_str(),
            }),
            credentials: credentials::credentials(
                &endpoints,
                database,
                &role,
                &password,
                &secrets.ca.cert,
            ),
        }))
    }

    async fn database_target(
        &self,
        ctx: &TaskContext<'_>,
        instance: &InstanceRow,
        bindings: &[BindingRow],
    ) -> Result<Progress<DatabaseTarget>, TaskError> {
        // Snapshots read and write the primary (replicas follow through WAL), with this worker's client programs.
        let secrets = open_secrets(ctx.services, instance)?;
        let state = ClusterState::of(&instance.details);
        let primary = find_primary(&state, &secrets).await?;
        let prefix = ctx.services.name_prefix();
        Ok(Progress::Done(DatabaseTarget {
            login: ServerLogin {
                host: Host::Tcp(host(primary).unwrap_or_default().to_string()),
                port: PG_PORT,
                user: SUPERUSER.to_string(),
                password: Some(secrecy::SecretString::from(secrets.superuser.clone())),
                ssl_require: true,
                bin_dir: client_bin_dir()?,
            },
            database: app_db_name(instance).to_string(),
            owner: names::instance_owner_role(prefix, &instance.id),
            bindings: binding_grants(prefix, bindings)?,
            extensions: Params::of(&instance.parameters)?.cluster.server.extensions,
        }))
    }

    async fn unbind(
        &self,
        ctx: &TaskContext<'_>,
        instance: &InstanceRow,
        binding: &BindingRow,
    ) -> Result<Progress<()>, TaskError> {
        let state = ClusterState::of(&instance.details);
        if state.members.is_empty() || instance.secrets.is_none() {
            return Ok(Progress::Done(()));
        }
        let secrets = open_secrets(ctx.services, instance)?;
        let primary = find_primary(&state, &secrets).await?;
        let h = host(primary).unwrap_or_default().to_string();
        revoke_binding_role(
            &|db: &str| superuser(&h, &secrets, db),
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
        let secrets = open_secrets(ctx.services, instance)?;
        let state = ClusterState::of(&instance.details);
        let http = patroni_http(&secrets)?;
        let bases = patroni_bases(&state);
        let patroni = Patroni::at(&http, bases.clone(), &secrets.restapi);
        if let Err(e) = patroni.cluster().await {
            return Err(TaskError::fatal(format!(
                "this worker cannot reach the cluster's Patroni REST API ({}): a {} is asked of Patroni, so the \
                 worker must reach port {API_PORT} of the members (EC2_ALLOWED_CIDR and the network); {e:#}",
                bases.join(", "),
                operation.as_str()
            )));
        }
        let members = |view: &ClusterView| members_details(&state, Some(view));
        switchover::run(ctx, instance, &patroni, &members, operation, candidate).await
    }

    async fn reconcile(&self, pool: &PgPool, services: &Services) -> anyhow::Result<()> {
        reconcile::pass(self, pool, services).await.map(|_| ())
    }
}
