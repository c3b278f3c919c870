//! The steps of an `ha_ec2` provision after the slots' interfaces (see the module's documentation): the cluster's
//! secrets, its member slots and candidates, its security group, its VMs running, Patroni's readiness, and what
//! the instance's details keep of it.

use anyhow::Context as _;
use aws_sdk_ec2::Client;
use broker::{db::instances::InstanceRow, ec2::candidates};
use serde_json::json;
use tracing::info;

use super::{
    HaEc2, LaunchInput, READY_LIMIT_SECS, group_name, members_details, network, not_ready,
    open_secrets,
    params::Params,
    state::{ClusterState, Secrets},
};
use crate::{
    context::TaskContext,
    providers::{
        Progress, Provisioned,
        ec2_common::{available_zones, offers, plan_default, vm},
        patroni::{ClusterView, tls},
    },
    records::Record,
    registry::TaskError,
};

/// The cluster's secrets: opened, or generated (with the cluster's CA) and sealed before anything is launched
/// (on the pool item's row while `pool.fill` makes one).
pub(super) async fn secrets(
    ctx: &TaskContext<'_>,
    instance: &InstanceRow,
    scope: &str,
) -> Result<Secrets, TaskError> {
    if instance.secrets.is_some() {
        return open_secrets(ctx.services, instance);
    }
    let ca = tls::new_ca(scope)
        .await
        .map_err(|e| TaskError::Retryable(e.context("making the cluster's CA")))?;
    let made = Secrets::generate(ca);
    Record::of(ctx, &instance.id)
        .set_secrets(ctx.pool, &ctx.services.cipher.seal_json(&made))
        .await
        .context("keeping the generated secrets")?;
    Ok(made)
}

impl HaEc2 {
    /// Step 1: the zones members go to (the asked ones, else the region's available zones that offer a
    /// matching type), each zone's candidate types, and a slot per member, spread round-robin.
    pub(super) async fn plan_slots(
        &self,
        ctx: &TaskContext<'_>,
        client: &Client,
        (params, plan_id): (&Params, &str),
        state: &mut ClusterState,
        (region, scope): (&str, &str),
    ) -> Result<(), TaskError> {
        let available = available_zones(client).await?;
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
            client,
            region,
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
        state.region = region.to_string();
        state.scope = scope.to_string();
        state.token_seed = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
        // A pool item (no parameters) runs the plan file's default version, as a provision naming none would.
        state.postgres_version = Some(
            params
                .cluster
                .server
                .postgres_version
                .clone()
                .or_else(|| plan_default(ctx.services, plan_id, "postgres_version"))
                .unwrap_or_else(|| params.postgres_version().to_string()),
        );
        for _ in 0..params.cluster.members {
            state.add_member(false);
        }
        Ok(())
    }

    /// Step 2: the cluster's security group, and the VPC's range for pg_hba (once).
    pub(super) async fn ensure_group(
        &self,
        ctx: &TaskContext<'_>,
        client: &Client,
        instance: &InstanceRow,
        params: &Params,
        state: &mut ClusterState,
        tags: &[(String, String)],
    ) -> Result<(), TaskError> {
        if state.security_group_id.is_some() {
            return Ok(());
        }
        ctx.progress("creating the security group").await?;
        let (_, vpc) = vm::subnet(client, &state.zones[0], &self.account.subnets).await?;
        let id = network::ensure_security_group(
            client,
            &group_name(ctx.services.name_prefix(), &instance.id),
            &vpc,
            &self.account.allowed_cidr,
            !params.ssh_keys.is_empty(),
            tags,
        )
        .await?;
        state.vpc_cidr = Some(network::vpc_cidr(client, &vpc).await?);
        state.vpc_id = Some(vpc);
        state.security_group_id = Some(id);
        state.save(ctx.pool, &Record::of(ctx, &instance.id)).await
    }

    /// Step 4: a VM per slot. `Some(wait)` until every one runs.
    pub(super) async fn members_running<T>(
        &self,
        ctx: &TaskContext<'_>,
        state: &mut ClusterState,
        input: &LaunchInput<'_>,
    ) -> Result<Option<Progress<T>>, TaskError> {
        let live = self.ensure_vms(ctx.pool, state, input).await?;
        let running = state
            .members
            .iter()
            .filter(|m| live.get(&m.name).is_some_and(|v| v.state == "running"))
            .count();
        Ok((running < state.members.len()).then(|| {
            Progress::wait_secs(
                3,
                format!("{running} of {} members' VMs running", state.members.len()),
            )
        }))
    }

    /// Step 5, with `EC2_READINESS_PROBE` on: Patroni's view once it reports a primary and every replica
    /// streaming (`Ok(None)` with the probe off). A `Wait` until then, and Fatal when that takes longer than
    /// [`READY_LIMIT_SECS`] after the first launch.
    pub(super) async fn probe_ready<T>(
        &self,
        state: &ClusterState,
        secrets: &Secrets,
    ) -> Result<Result<Option<ClusterView>, Progress<T>>, TaskError> {
        if !self.account.readiness_probe {
            return Ok(Ok(None));
        }
        let why = match self.view(state, secrets).await {
            Ok(seen) => match not_ready(state, &seen) {
                None => return Ok(Ok(Some(seen))),
                Some(why) => why,
            },
            Err(e) => format!("Patroni does not answer yet ({e})"),
        };
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
        Ok(Err(Progress::wait_secs(
            10,
            format!("starting the cluster (cloud-init installs it): {why}"),
        )))
    }

    /// What the instance's details and secrets keep of a cluster that is ready.
    pub(super) fn provisioned(
        &self,
        instance: &InstanceRow,
        state: &ClusterState,
        params: &Params,
        secrets: &Secrets,
        view: Option<ClusterView>,
        owner: &str,
    ) -> Result<Provisioned, TaskError> {
        let primary = view
            .as_ref()
            .and_then(|v| v.leader())
            .map(|l| l.name.clone());
        let mut details = instance.details.clone();
        let patch = json!({
            "ha_ec2": state,
            "scope": state.scope,
            "region": state.region,
            "members": members_details(state, view.as_ref()),
            "primary": primary,
            "postgres_version": state.postgres_version.as_deref().unwrap_or(params.postgres_version()),
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
        Ok(Provisioned {
            details,
            secrets: Some(serde_json::to_value(secrets).context("keeping the secrets")?),
        })
    }
}
