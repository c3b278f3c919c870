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
mod adopt;
mod members;
mod network;
mod params;
mod provision;
mod reconcile;
mod rekey;
mod scaling;
mod state;
mod user_data;

use anyhow::Context as _;
use async_trait::async_trait;
use broker::{
    config::Settings,
    db::{bindings::BindingRow, instances::InstanceRow},
    model::{Operation, UpdatePayload},
    names,
};
use serde_json::Value;
use sqlx::PgPool;

use self::{
    access::{
        find_primary, host, members_details, not_ready, open_secrets, patroni_bases, patroni_http,
        superuser,
    },
    members::LaunchInput,
    params::Params,
    state::{ClusterState, Member},
    user_data::{API_PORT, PG_PORT},
};
use super::{
    Bound, Progress, Provider, Provisioned,
    ec2_common::{Ec2Account, vm},
    patroni::{
        ClusterView, Patroni, SUPERUSER, Timings,
        credentials::{self, Address, Endpoints},
        switchover,
    },
    postgres::{
        self, Access, app_db_name, binding_grants, grant_binding_role, revoke_binding_role,
    },
};
use crate::{
    context::{Services, TaskContext},
    records::Record,
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

/// The security group's name (unique per VPC), also the resources' `Name`.
fn group_name(prefix: &str, instance_id: &str) -> String {
    format!(
        "{}ha-{}",
        prefix.replace('_', "-"),
        names::short_hash(instance_id)
    )
}

/// What the cluster's internal names derive from: the warm-pool item it was made as (its scope and security group
/// keep the item's names, which never show to apps), else the instance.
fn names_key(instance: &InstanceRow) -> &str {
    instance
        .details
        .get("pool_item")
        .filter(|_| instance.details.get(adopt::FELL_BACK).is_none())
        .and_then(Value::as_str)
        .unwrap_or(&instance.id)
}

/// Tags of every resource of the cluster: `berth:instance` is the instance's id, `Name` follows [`names_key`].
fn resource_tags(
    prefix: &str,
    instance: &InstanceRow,
    extra: &[(String, String)],
) -> Vec<(String, String)> {
    let mut tags = vec![
        (vm::TAG.to_string(), instance.id.clone()),
        ("Name".to_string(), group_name(prefix, names_key(instance))),
    ];
    tags.extend(extra.iter().filter(|(k, _)| k != "Name").cloned());
    tags
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
        let secrets = provision::secrets(ctx, instance, &scope).await?;
        // Progress lands on the instance's row, or the pool item's while `pool.fill` makes one.
        let record = Record::of(ctx, &instance.id);
        // 1. Zones (the asked ones, else the region's), each zone's candidates, and the member slots.
        if state.members.is_empty() {
            self.plan_slots(
                ctx,
                &client,
                (&params, &instance.plan_id),
                &mut state,
                (&region, &scope),
            )
            .await?;
            state.save(ctx.pool, &record).await?;
        }
        let tags = resource_tags(prefix, instance, &params.tags);
        // 2. The security group, and the VPC's range for pg_hba.
        self.ensure_group(ctx, &client, instance, &params, &mut state, &tags)
            .await?;
        // 3. A network interface per slot: every member's address, before any user-data is rendered.
        self.ensure_interfaces(
            ctx.pool,
            &client,
            &record,
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
            record,
        };
        if let Some(wait) = self.members_running(ctx, &mut state, &input).await? {
            return Ok(wait);
        }
        // 5. Patroni reports a primary and every replica streaming.
        let view = match self.probe_ready(&state, &secrets).await? {
            Ok(view) => view,
            Err(wait) => return Ok(wait),
        };
        Ok(Progress::Done(self.provisioned(
            instance, &state, &params, &secrets, view, &owner,
        )?))
    }

    async fn adopt(
        &self,
        ctx: &TaskContext<'_>,
        instance: &InstanceRow,
        pool_item: &str,
    ) -> Result<Progress<Provisioned>, TaskError> {
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
        let params = Params::of(&update.parameters)?;
        let secrets = open_secrets(ctx.services, instance)?;
        let mut state = ClusterState::of(&instance.details);
        let client = self.account.client(&self.region_of(None, &state));
        scaling::apply_settings(self, ctx, instance, &state, &secrets, &params).await?;
        let prefix = ctx.services.name_prefix();
        let tags = resource_tags(prefix, instance, &params.tags);
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
            record: Record::Instance(instance.id.clone()),
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
        let prefix = ctx.services.name_prefix();
        super::ec2_common::teardown::tear_down_instance(
            &client,
            instance,
            |key| group_name(prefix, key),
            std::time::Duration::from_secs(3),
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
        Ok(Progress::Done(credentials::bound(
            &endpoints,
            &database,
            (&role, &password, access.as_str()),
            &secrets.ca.cert,
        )))
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
                password: Some(secrecy::SecretString::from(
                    secrets.passwords.superuser.clone(),
                )),
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
        let patroni = Patroni::at(&http, bases.clone(), &secrets.passwords.restapi);
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
