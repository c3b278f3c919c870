//! A cluster's member slots on EC2: each slot's network interface (and Elastic IP), and its VM, launched from
//! the zone's candidates with the slot's user-data, adopted by its tags after a crash, and launched again (to
//! join its peers) when it is gone.

use std::collections::HashMap;

use aws_sdk_ec2::Client;
use broker::{db::instances::InstanceRow, names};
use serde_json::Value;
use sqlx::PgPool;
use tracing::{info, warn};

use super::{
    HaEc2, network,
    params::Params,
    state::{ClusterState, Secrets},
    user_data::{self, MemberSetup},
};
use crate::{
    providers::{ec2_common::vm, patroni::tls},
    records::Record,
    registry::TaskError,
};

/// Tags of one member slot's resources.
pub(super) fn member_tags(base: &[(String, String)], member: &str) -> Vec<(String, String)> {
    base.iter()
        .map(|(k, v)| {
            if k == "Name" {
                (k.clone(), format!("{v}-{member}"))
            } else {
                (k.clone(), v.clone())
            }
        })
        .chain([(vm::MEMBER_TAG.to_string(), member.to_string())])
        .collect()
}

/// The instance's live VMs (pending or running) by member slot.
pub(super) async fn live_by_member(
    client: &Client,
    instance_id: &str,
) -> Result<HashMap<String, vm::Vm>, TaskError> {
    Ok(vm::live_vms(client, instance_id)
        .await?
        .into_iter()
        .filter(|v| v.state == "pending" || v.state == "running")
        .filter_map(|v| Some((v.member.clone()?, v)))
        .collect())
}

/// What became of a VM a slot had, that a tag lookup no longer shows live.
pub(super) enum SlotVm {
    /// Pending or running (a tag lookup can lag a launch), or launched moments ago and not listed yet.
    Alive,
    /// Stopping, stopped or shutting down: terminated now, it still holds the slot's interface for a while.
    Releasing,
    Gone,
}

/// A VM launched this recently may not show up in EC2's listings yet (they are eventually consistent).
const LISTING_GRACE_SECS: i64 = 120;

pub(super) async fn slot_vm(
    client: &Client,
    vm_id: &str,
    launched_at: Option<i64>,
) -> Result<SlotVm, TaskError> {
    let recent =
        launched_at.is_some_and(|t| chrono::Utc::now().timestamp() - t < LISTING_GRACE_SECS);
    Ok(match vm::vm(client, vm_id).await? {
        Some(v) if v.state == "pending" || v.state == "running" => SlotVm::Alive,
        Some(v) if v.state == "terminated" => SlotVm::Gone,
        Some(_) => {
            if let Err(e) = vm::terminate(client, &[vm_id.to_string()]).await {
                warn!(vm = vm_id, error = %e, "terminating a member's stopped VM failed");
            }
            SlotVm::Releasing
        }
        None if recent => SlotVm::Alive,
        None => SlotVm::Gone,
    })
}

/// What a member's launch needs besides its slot.
pub(super) struct LaunchInput<'a> {
    pub(super) client: &'a Client,
    pub(super) instance: &'a InstanceRow,
    pub(super) params: &'a Params,
    pub(super) secrets: &'a Secrets,
    pub(super) tags: &'a [(String, String)],
    pub(super) owner_role: &'a str,
    /// Where progress is saved: the instance's row, or the pool item's while `pool.fill` makes it.
    pub(super) record: Record,
}

impl HaEc2 {
    /// A network interface (and with `public_ip` an Elastic IP) for every slot that has none.
    pub(super) async fn ensure_interfaces(
        &self,
        pool: &PgPool,
        client: &Client,
        record: &Record,
        state: &mut ClusterState,
        public_ip: bool,
        tags: &[(String, String)],
    ) -> Result<(), TaskError> {
        let group = state
            .security_group_id
            .clone()
            .ok_or_else(|| TaskError::fatal("no security group before the members' interfaces"))?;
        for i in 0..state.members.len() {
            let member = state.members[i].clone();
            if member.retiring {
                continue;
            }
            let tags = member_tags(tags, &member.name);
            if member.interface_id.is_none() {
                let (subnet, _) = vm::subnet(client, &member.zone, &self.account.subnets).await?;
                let (id, ip) = network::ensure_interface(
                    client,
                    record.id(),
                    &member.name,
                    &subnet,
                    &group,
                    &tags,
                )
                .await?;
                state.members[i].interface_id = Some(id);
                state.members[i].private_ip = Some(ip);
                state.save(pool, record).await?;
            }
            if public_ip && state.members[i].allocation_id.is_none() {
                let interface = state.members[i].interface_id.clone().unwrap_or_default();
                let (allocation, ip) =
                    network::ensure_address(client, record.id(), &member.name, &interface, &tags)
                        .await?;
                state.members[i].allocation_id = Some(allocation);
                state.members[i].public_ip = Some(ip);
                state.save(pool, record).await?;
            }
        }
        Ok(())
    }

    /// Launches the slot's VM: the first candidate of its zone with capacity from its `candidate_index` on.
    /// `Ok(false)`: none had any (the index goes back to the start, for the next try).
    pub(super) async fn launch_member(
        &self,
        pool: &PgPool,
        state: &mut ClusterState,
        name: &str,
        input: &LaunchInput<'_>,
    ) -> Result<bool, TaskError> {
        let instance = input.instance;
        let user_data = self.user_data(state, name, input).await?;
        let launched = self
            .launch_first_with_capacity(pool, state, name, input, &user_data)
            .await?;
        let m = state
            .member_mut(name)
            .ok_or_else(|| TaskError::fatal(format!("no member slot {name}")))?;
        match launched {
            Some((vm, instance_type)) => {
                info!(instance_id = %instance.id, member = name, vm = %vm.id, instance_type, zone = %m.zone, joins = m.joins, "member VM launched");
                m.vm_id = Some(vm.id);
                m.instance_type = Some(instance_type);
                m.launched_at = Some(chrono::Utc::now().timestamp());
                state.save(pool, &input.record).await?;
                Ok(true)
            }
            None => {
                m.candidate_index = 0;
                state.save(pool, &input.record).await?;
                Ok(false)
            }
        }
    }

    /// The slot's user-data, with a certificate for its addresses signed by the cluster's CA.
    async fn user_data(
        &self,
        state: &ClusterState,
        name: &str,
        input: &LaunchInput<'_>,
    ) -> Result<user_data::Rendered, TaskError> {
        let instance = input.instance;
        let member = state
            .member(name)
            .ok_or_else(|| TaskError::fatal(format!("no member slot {name}")))?;
        let (Some(_), Some(private_ip)) = (&member.interface_id, member.private_ip.as_deref())
        else {
            return Err(TaskError::retryable(format!(
                "member {name} has no network interface yet"
            )));
        };
        let peers = state
            .peers()
            .ok_or_else(|| TaskError::retryable("not every member has its address yet"))?;
        let mut sans = vec![format!("IP:{private_ip}")];
        sans.extend(member.public_ip.iter().map(|ip| format!("IP:{ip}")));
        let tls = tls::server_cert(&input.secrets.ca, &format!("{}-{name}", state.scope), &sans)
            .await
            .map_err(|e| TaskError::Retryable(e.context("signing the member's certificate")))?;
        let params = input.params;
        let server = &params.cluster.server;
        user_data::render(&MemberSetup {
            instance_id: &instance.id,
            scope: &state.scope,
            member: name,
            private_ip,
            peers: &peers,
            joins: member.joins,
            postgres_version: state
                .postgres_version
                .as_deref()
                .unwrap_or(params.postgres_version()),
            timings: self.timings,
            synchronous: params.cluster.synchronous,
            tuning_profile: instance
                .details
                .get("tuning_profile")
                .and_then(Value::as_str)
                .unwrap_or(&server.tuning_profile),
            cluster_cidr: state.vpc_cidr.as_deref().unwrap_or_default(),
            clients_cidr: user_data::clients_range(
                &self.account.allowed_cidr,
                member.public_ip.is_some(),
            ),
            app_db_name: &server.app_db_name,
            admin_user: &server.admin_user,
            owner_role: input.owner_role,
            extensions: &server.extensions,
            ssh_keys: &params.ssh_keys,
            secrets: input.secrets,
            tls: &tls,
        })
        .map_err(|e| TaskError::Fatal(e.context("rendering the member's user-data")))
    }

    /// RunInstances on the slot's interface with the zone's candidates in turn, from the slot's
    /// `candidate_index` on (kept as it moves past a type without capacity): the VM and its type, or `None`
    /// when no candidate had capacity.
    async fn launch_first_with_capacity(
        &self,
        pool: &PgPool,
        state: &mut ClusterState,
        name: &str,
        input: &LaunchInput<'_>,
        user_data: &user_data::Rendered,
    ) -> Result<Option<(vm::Vm, String)>, TaskError> {
        let (instance, params) = (input.instance, input.params);
        let member = state
            .member(name)
            .cloned()
            .ok_or_else(|| TaskError::fatal(format!("no member slot {name}")))?;
        let Some(interface) = member.interface_id.as_deref() else {
            return Err(TaskError::retryable(format!(
                "member {name} has no network interface yet"
            )));
        };
        let mut tags = member_tags(input.tags, name);
        tags.push((vm::MEMBERS_TAG.to_string(), state.wanted()));
        let candidates = state
            .candidates
            .get(&member.zone)
            .cloned()
            .unwrap_or_default();
        let hash = format!("{}{}", state.token_seed, names::short_hash(&instance.id));
        let mut index = member.candidate_index;
        while let Some(candidate) = candidates.get(index) {
            let image = vm::image(
                input.client,
                &candidate.arch,
                self.account.image_for(&candidate.arch),
            )
            .await?;
            let token = format!("{hash}-{name}-g{}-c{index}", member.generation);
            let spec = vm::Launch {
                image_id: &image,
                instance_type: &candidate.instance_type,
                zone: &member.zone,
                subnet_id: "",
                security_group_id: "",
                public_ip: false,
                spot: params.requirements.spot,
                max_price: params.requirements.max_price,
                user_data: &user_data.0,
                client_token: &token,
                tags: &tags,
                network_interface_id: Some(interface),
                scratch_disk_gb: Some(params.requirements.storage_min_gb.max(1)),
                tags_in_metadata: true,
            };
            match vm::launch(input.client, &spec).await {
                Ok(vm) => return Ok(Some((vm, candidate.instance_type.clone()))),
                Err(vm::LaunchError::NoCapacity(code)) => {
                    warn!(instance_id = %instance.id, member = name, instance_type = %candidate.instance_type, code, "no capacity; trying the next type");
                    index += 1;
                    if let Some(m) = state.member_mut(name) {
                        m.candidate_index = index;
                    }
                    state.save(pool, &input.record).await?;
                }
                Err(vm::LaunchError::Failed(e)) => return Err(e),
            }
        }
        Ok(None)
    }

    /// Every slot without a VM gets one (an earlier try's VM, found by its tags, is adopted; a slot whose VM is
    /// gone gets a new one that joins its peers, once the old one no longer holds its interface). Returns the live
    /// VMs by slot: a slot missing there is not done yet.
    pub(super) async fn ensure_vms(
        &self,
        pool: &PgPool,
        state: &mut ClusterState,
        input: &LaunchInput<'_>,
    ) -> Result<HashMap<String, vm::Vm>, TaskError> {
        let id = &input.instance.id;
        let live = live_by_member(input.client, id).await?;
        let mut launched = false;
        let slots: Vec<String> = state
            .members
            .iter()
            .filter(|m| !m.retiring)
            .map(|m| m.name.clone())
            .collect();
        for name in slots {
            let Some(member) = state.member(&name).cloned() else {
                continue;
            };
            if let Some(found) = live.get(&name) {
                if member.vm_id.as_ref() != Some(&found.id) {
                    let m = state.member_mut(&name).expect("listed above");
                    m.vm_id = Some(found.id.clone());
                    m.instance_type = Some(found.instance_type.clone());
                    m.launched_at = m.launched_at.or(found.launched_at);
                    state.save(pool, &input.record).await?;
                }
                continue;
            }
            if let Some(old) = &member.vm_id {
                match slot_vm(input.client, old, member.launched_at).await? {
                    SlotVm::Alive => continue,
                    // It holds the slot's interface until it is terminated: the next step launches.
                    SlotVm::Releasing => continue,
                    SlotVm::Gone => {
                        warn!(instance_id = %id, member = %name, vm = %old, "a member's VM is gone; launching another that joins its peers");
                        let m = state.member_mut(&name).expect("listed above");
                        m.vm_id = None;
                        m.launched_at = None;
                        m.joins = true;
                        m.generation += 1;
                        m.candidate_index = 0;
                        state.save(pool, &input.record).await?;
                    }
                }
            }
            if !self.launch_member(pool, state, &name, input).await? {
                return Err(TaskError::retryable(format!(
                    "no candidate instance type had capacity in {} for member {name}; trying again",
                    member.zone
                )));
            }
            launched = true;
        }
        if launched {
            return live_by_member(input.client, id).await;
        }
        Ok(live)
    }
}
