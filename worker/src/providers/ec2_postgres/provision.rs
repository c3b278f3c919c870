//! The steps of a provision, each skipped once its result is saved in the instance's `State`: choose the
//! candidate types, the security group, the data volume, the static address, a running VM (the next
//! candidate when one has no capacity), then Postgres answering over TLS.

use std::time::Duration;

use aws_sdk_ec2::Client;
use broker::{db::instances::InstanceRow, ec2::candidates, names};
use serde_json::json;
use sqlx::PgPool;

use super::{
    Ec2Postgres, PORT, Params, READY_LIMIT_SECS, Secrets, State, group_name, recovery, superuser,
    user_data,
};
use crate::{
    context::TaskContext,
    providers::{
        Progress, Provisioned,
        ec2_common::{offers, vm},
        postgres::connect,
    },
    records::Record,
    registry::TaskError,
};

/// What launching a VM for an instance needs besides its state.
pub(super) struct LaunchInput<'a> {
    pub(super) client: &'a Client,
    pub(super) spot: bool,
    pub(super) max_price: Option<f64>,
    pub(super) public_ip: bool,
    pub(super) user_data: &'a str,
    pub(super) tags: &'a [(String, String)],
    /// ClientToken prefix; the candidate index is appended (a new type is a new request).
    pub(super) token: String,
}

impl Ec2Postgres {
    /// Launches the first candidate with capacity from `state.candidate_index` on. `Ok(false)`: none had any
    /// (the index goes back to the start, for the next try).
    pub(super) async fn launch_next(
        &self,
        pool: &PgPool,
        record: &Record,
        state: &mut State,
        input: &LaunchInput<'_>,
    ) -> Result<bool, TaskError> {
        let instance_id = record.id();
        let zone = state
            .zone
            .clone()
            .ok_or_else(|| TaskError::fatal("no zone chosen before the launch"))?;
        let group = state
            .security_group_id
            .clone()
            .ok_or_else(|| TaskError::fatal("no security group"))?;
        let (subnet, _) = vm::subnet(input.client, &zone, &self.account.subnets).await?;
        while let Some(candidate) = state.candidates.get(state.candidate_index).cloned() {
            let image = vm::image(
                input.client,
                &candidate.arch,
                self.account.image_for(&candidate.arch),
            )
            .await?;
            let token = format!("{}.{}", input.token, state.candidate_index);
            let spec = vm::Launch {
                image_id: &image,
                instance_type: &candidate.instance_type,
                zone: &zone,
                subnet_id: &subnet,
                security_group_id: &group,
                public_ip: input.public_ip,
                spot: input.spot,
                max_price: input.max_price,
                user_data: input.user_data,
                client_token: &token,
                tags: input.tags,
                network_interface_id: None,
                scratch_disk_gb: None,
                tags_in_metadata: false,
            };
            match vm::launch(input.client, &spec).await {
                Ok(launched) => {
                    tracing::info!(instance_id, vm = %launched.id, instance_type = %candidate.instance_type, zone, "VM launched");
                    state.vm_id = Some(launched.id);
                    state.instance_type = Some(candidate.instance_type);
                    state.launched_at = Some(chrono::Utc::now().timestamp());
                    state.save(pool, record).await?;
                    return Ok(true);
                }
                Err(vm::LaunchError::NoCapacity(code)) => {
                    tracing::warn!(instance_id, instance_type = %candidate.instance_type, code, "no capacity; trying the next type");
                    state.candidate_index += 1;
                    state.save(pool, record).await?;
                }
                Err(vm::LaunchError::Failed(e)) => return Err(e),
            }
        }
        state.candidate_index = 0;
        state.save(pool, record).await?;
        Ok(false)
    }

    /// The VM a step can go on with: `Done` once it runs; a VM that vanished before (an eviction at start) is
    /// forgotten, its type demoted when it lived under five minutes, and the next launch made.
    pub(super) async fn running_vm(
        &self,
        pool: &PgPool,
        record: &Record,
        state: &mut State,
        input: &LaunchInput<'_>,
    ) -> Result<Progress<vm::Vm>, TaskError> {
        let instance_id = record.id();
        if let Some(id) = state.vm_id.clone() {
            match vm::vm(input.client, &id).await? {
                Some(found) if found.state == "running" => return Ok(Progress::Done(found)),
                Some(found) if found.state == "pending" => {
                    return Ok(Progress::wait_secs(
                        5,
                        format!("waiting for VM {id} ({}) to run", found.instance_type),
                    ));
                }
                _ => recovery::forget_vm(state),
            }
        }
        // A VM an earlier try launched (its answer lost in a crash) is adopted, not launched again.
        if let Some(found) = vm::live_vms(input.client, instance_id)
            .await?
            .into_iter()
            .next()
        {
            state.vm_id = Some(found.id.clone());
            state.instance_type = Some(found.instance_type.clone());
            state.launched_at = state.launched_at.or(found.launched_at);
            state.save(pool, record).await?;
            return Ok(Progress::wait_secs(
                2,
                format!("found VM {} from an earlier try", found.id),
            ));
        }
        if !self.launch_next(pool, record, state, input).await? {
            return Err(TaskError::retryable(format!(
                "no candidate instance type had capacity in {} ({} tried); trying again",
                state.zone.as_deref().unwrap_or("?"),
                state.candidates.len()
            )));
        }
        Ok(Progress::wait_secs(
            3,
            format!(
                "launched VM {}; waiting for it to run",
                state.vm_id.as_deref().unwrap_or("?")
            ),
        ))
    }

    /// Whether Postgres on the VM takes a TLS connection from berth's superuser.
    pub(super) async fn answers(host: &str, secrets: &Secrets) -> bool {
        let options = superuser(host, &secrets.superuser_password, "postgres");
        tokio::time::timeout(
            Duration::from_secs(5),
            connect(&options, "probing the server"),
        )
        .await
        .is_ok_and(|r| r.is_ok())
    }
}

/// What every step of one provision run reads.
pub(super) struct Run<'a> {
    pub(super) ctx: &'a TaskContext<'a>,
    pub(super) instance: &'a InstanceRow,
    /// Where the steps record their progress (the instance, or the pool item being filled).
    pub(super) record: Record,
    pub(super) params: &'a Params,
    pub(super) client: &'a Client,
    pub(super) tags: &'a [(String, String)],
}

impl Ec2Postgres {
    /// Candidates, and the zone: the asked one, else the cheapest first candidate's (spot), else the first zone
    /// of the region. Then the candidates priced in that zone, kept for every later step.
    pub(super) async fn choose_candidates(
        &self,
        run: &Run<'_>,
        region: &str,
        state: &mut State,
    ) -> Result<(), TaskError> {
        if !state.candidates.is_empty() {
            return Ok(());
        }
        let (client, params) = (run.client, run.params);
        let offers = offers::fresh(
            run.ctx.pool,
            client,
            region,
            self.account.offers_ttl_secs,
            &self.account.on_demand,
        )
        .await?;
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::from_entropy();
        let first = candidates(&offers, &params.requirements, &[], &mut rng);
        let Some(best) = first.first() else {
            return Err(TaskError::fatal(format!(
                "no instance type in {region} meets the parameters (cpu, ram, arch, family, max_price); \
                 GET /berth/v1/price-check shows what does"
            )));
        };
        let zone = match params.requirements.zone.clone().or(best.zone.clone()) {
            Some(zone) => zone,
            None => recovery::first_zone(client).await?,
        };
        let mut in_zone = params.requirements.clone();
        in_zone.zone = Some(zone.clone());
        state.candidates = candidates(&offers, &in_zone, &[], &mut rng);
        if state.candidates.is_empty() {
            return Err(TaskError::fatal(format!(
                "no matching instance type is offered in zone {zone}"
            )));
        }
        state.zone = Some(zone);
        state.save(run.ctx.pool, &run.record).await
    }

    pub(super) async fn ensure_security_group(
        &self,
        run: &Run<'_>,
        state: &mut State,
    ) -> Result<(), TaskError> {
        if state.security_group_id.is_some() {
            return Ok(());
        }
        let (ctx, instance, client) = (run.ctx, run.instance, run.client);
        let zone = state.zone.clone().unwrap_or_default();
        ctx.progress("creating the security group").await?;
        let (_, vpc) = vm::subnet(client, &zone, &self.account.subnets).await?;
        let ports: &[i32] = if run.params.ssh_keys.is_empty() {
            &[5432]
        } else {
            &[5432, 22]
        };
        let id = vm::ensure_security_group(
            client,
            &group_name(ctx.services.name_prefix(), &instance.id),
            "berth-postgres-5432-and-ssh-22-with-ssh_keys",
            &vpc,
            &self.account.allowed_cidr,
            ports,
            run.tags,
        )
        .await?;
        state.security_group_id = Some(id);
        state.save(ctx.pool, &run.record).await
    }

    /// The data volume: the recorded one while it exists, else a new one (its zone is the instance's from then).
    pub(super) async fn ensure_volume(
        &self,
        run: &Run<'_>,
        state: &mut State,
    ) -> Result<vm::Volume, TaskError> {
        let (ctx, instance, client) = (run.ctx, run.instance, run.client);
        let volume = match &state.volume_id {
            Some(id) => vm::data_volume(client, &instance.id)
                .await?
                .filter(|v| &v.id == id),
            None => None,
        };
        if let Some(v) = volume {
            return Ok(v);
        }
        let zone = state.zone.clone().unwrap_or_default();
        let token = format!("{}-data", ctx.task.id);
        let v = vm::ensure_data_volume(
            client,
            &instance.id,
            &zone,
            run.params.requirements.storage_min_gb,
            &token,
            run.tags,
        )
        .await?;
        state.volume_id = Some(v.id.clone());
        state.zone = Some(v.zone.clone());
        state.save(ctx.pool, &run.record).await?;
        Ok(v)
    }

    /// The Elastic IP, with `static_ip`.
    pub(super) async fn ensure_static_ip(
        &self,
        run: &Run<'_>,
        state: &mut State,
    ) -> Result<(), TaskError> {
        if !run.params.static_ip || state.allocation_id.is_some() {
            return Ok(());
        }
        let (allocation, ip) = vm::ensure_address(run.client, &run.instance.id, run.tags).await?;
        state.allocation_id = Some(allocation);
        state.static_ip = Some(ip);
        state.save(run.ctx.pool, &run.record).await
    }

    /// The VM, running (launched with the user-data that sets the server up on `volume`).
    pub(super) async fn running(
        &self,
        run: &Run<'_>,
        spot: bool,
        secrets: &Secrets,
        volume: &vm::Volume,
        state: &mut State,
    ) -> Result<Progress<vm::Vm>, TaskError> {
        let user_data = user_data(
            run.ctx.services.name_prefix(),
            run.instance,
            run.params,
            secrets,
            &volume.id,
            &run.params.tuning_profile,
        )
        .map_err(|e| TaskError::Fatal(e.context("rendering the VM's user-data")))?;
        let input = LaunchInput {
            client: run.client,
            spot,
            max_price: run.params.requirements.max_price,
            public_ip: run.params.public_ip,
            user_data: &user_data.0,
            tags: run.tags,
            token: run.ctx.task.id.to_string(),
        };
        self.running_vm(run.ctx.pool, &run.record, state, &input)
            .await
    }

    /// `None` once Postgres answers over TLS (or the probe is off); a `Wait` while cloud-init installs it, Fatal
    /// when it has not answered long after the launch.
    pub(super) async fn postgres_waited_for(
        &self,
        host: &str,
        secrets: &Secrets,
        state: &State,
    ) -> Result<Option<Progress<Provisioned>>, TaskError> {
        if !self.account.readiness_probe || Self::answers(host, secrets).await {
            return Ok(None);
        }
        let age = chrono::Utc::now().timestamp() - state.launched_at.unwrap_or(0);
        if age > READY_LIMIT_SECS {
            return Err(TaskError::fatal(format!(
                "PostgreSQL on {host}:{PORT} did not answer within {} minutes of the VM's launch; see \
                 /var/log/berth-setup.log on the VM",
                READY_LIMIT_SECS / 60
            )));
        }
        Ok(Some(Progress::wait_secs(
            10,
            format!("waiting for PostgreSQL on {host}:{PORT} (cloud-init is installing it)"),
        )))
    }
}

/// The instance's details once its server answers, and its secrets.
pub(super) fn provisioned(
    run: &Run<'_>,
    state: State,
    host: String,
    secrets: &Secrets,
) -> Provisioned {
    let params = run.params;
    let mut details = run.instance.details.clone();
    let patch = json!({
        "ec2": state,
        "host": host,
        "port": PORT,
        "postgres_version": params.postgres_version,
        "app_db_name": params.app_db_name,
        "admin_user": params.admin_user,
        "owner_role": names::instance_owner_role(run.ctx.services.name_prefix(), &run.instance.id),
        "tuning_profile": params.tuning_profile,
        "tls": true,
        "ready_at": chrono::Utc::now(),
        "recoveries": 0,
    });
    if let (Some(map), Some(patch)) = (details.as_object_mut(), patch.as_object()) {
        map.extend(patch.clone());
    }
    Provisioned {
        details,
        secrets: Some(serde_json::to_value(secrets).unwrap_or_default()),
    }
}
