//! What berth knows about a cluster's EC2 resources (`details.ha_ec2`), written as each step completes so a
//! retry goes on where a crash stopped, and the cluster's secrets (sealed in the instance's `secrets`).

use std::collections::BTreeMap;

use anyhow::Context as _;
use broker::{crypto::random_password, ec2::Candidate};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sqlx::PgPool;

use crate::{
    providers::patroni::{Passwords, tls::Pem},
    records::Record,
    registry::TaskError,
};

/// One member slot (`m1`, `m2`, ...): a network interface that keeps its private address, and the VM on it.
/// A replacement VM takes the same slot (name, zone, address).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Member {
    pub name: String,
    pub zone: String,
    pub interface_id: Option<String>,
    pub private_ip: Option<String>,
    pub allocation_id: Option<String>,
    pub public_ip: Option<String>,
    pub vm_id: Option<String>,
    pub instance_type: Option<String>,
    /// The candidate of the zone's list the next launch tries (moves on when a type has no capacity).
    pub candidate_index: usize,
    pub launched_at: Option<i64>,
    /// Its VM joins a running cluster (a replacement, or added by a scale-up) rather than forming it.
    pub joins: bool,
    /// VMs launched for the slot so far (part of the ClientToken).
    pub generation: u32,
    /// A replacement VM is on its way (the reconcile loop drives it).
    pub replacing: bool,
    /// Being removed by a scale-down: its VM is terminated, then its interface deleted.
    pub retiring: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ClusterState {
    pub region: String,
    /// Patroni's scope and etcd's cluster token.
    pub scope: String,
    /// The zones members are spread over, round-robin.
    pub zones: Vec<String>,
    /// Instance types to try per zone, best first (chosen once).
    pub candidates: BTreeMap<String, Vec<Candidate>>,
    pub vpc_id: Option<String>,
    pub vpc_cidr: Option<String>,
    pub security_group_id: Option<String>,
    pub members: Vec<Member>,
    /// The number of the next slot's name: names are not reused once a scale-down removed them.
    pub next_member: u32,
    /// Random, chosen with the slots: part of every RunInstances ClientToken, so a cluster provisioned again
    /// under the same instance id never meets the tokens of the one before.
    pub token_seed: String,
    /// The PostgreSQL version the cluster was made with (the parameter, else the plan's default): what members
    /// launched later install, also after a warm-pool take (whose parameters name none).
    pub postgres_version: Option<String>,
}

impl ClusterState {
    pub fn of(details: &Value) -> Self {
        details
            .get("ha_ec2")
            .and_then(|v| serde_json::from_value(v.clone()).ok())
            .unwrap_or_default()
    }

    /// Records the state where the step's progress is kept (the instance, or the pool item being filled).
    pub async fn save(&self, pool: &PgPool, record: &Record) -> Result<(), TaskError> {
        record
            .merge_details(pool, &json!({ "ha_ec2": self }))
            .await
            .context("recording the cluster's EC2 state")?;
        Ok(())
    }

    pub fn member(&self, name: &str) -> Option<&Member> {
        self.members.iter().find(|m| m.name == name)
    }

    pub fn member_mut(&mut self, name: &str) -> Option<&mut Member> {
        self.members.iter_mut().find(|m| m.name == name)
    }

    /// A new slot in the zone with the fewest members (the first such in `zones`); returns its name.
    pub fn add_member(&mut self, joins: bool) -> String {
        self.next_member = self.next_member.max(1);
        let name = format!("m{}", self.next_member);
        self.next_member += 1;
        let zone = self
            .zones
            .iter()
            .min_by_key(|z| {
                self.members
                    .iter()
                    .filter(|m| &m.zone == *z && !m.retiring)
                    .count()
            })
            .cloned()
            .unwrap_or_default();
        self.members.push(Member {
            name: name.clone(),
            zone,
            joins,
            ..Member::default()
        });
        name
    }

    /// Every member's (name, private address) once each has one: etcd's member list.
    pub fn peers(&self) -> Option<Vec<(String, String)>> {
        self.members
            .iter()
            .filter(|m| !m.retiring)
            .map(|m| Some((m.name.clone(), m.private_ip.clone()?)))
            .collect()
    }

    /// The members' names as the VMs' `berth:members` tag lists them.
    pub fn wanted(&self) -> String {
        self.members
            .iter()
            .filter(|m| !m.retiring)
            .map(|m| m.name.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// The cluster's generated secrets, sealed in the instance's `secrets` before the first VM is launched (so a
/// retry renders the same ones). The CA's key never leaves berth; each member gets a certificate it signs.
#[derive(Clone, Serialize, Deserialize)]
pub struct Secrets {
    #[serde(flatten)]
    pub passwords: Passwords,
    pub admin_password: String,
    pub ca: Pem,
    /// The re-key key (hex), also in each member's `/etc/berth/rekey.key`: a warm-pool take derives the Patroni
    /// passwords from it (see `rekey`). Clusters made before it existed have none and are never re-keyed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rekey_key: Option<String>,
    /// While a warm-pool take runs: its nonce and the passwords the item was made with (a retry after a crash
    /// connects with either). Gone once the instance is provisioned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub taking: Option<Taking>,
}

/// A take under way (see [`Secrets::taking`]).
#[derive(Clone, Serialize, Deserialize)]
pub struct Taking {
    pub nonce: String,
    pub pooled: Passwords,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secrets(<redacted>)")
    }
}

impl Secrets {
    pub fn generate(ca: Pem) -> Self {
        Self {
            passwords: Passwords::generate(),
            admin_password: random_password(32),
            ca,
            rekey_key: Some(super::rekey::new_key()),
            taking: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_spread_round_robin_and_fill_the_emptiest_zone() {
        let mut state = ClusterState {
            zones: vec!["z-a".into(), "z-b".into(), "z-c".into()],
            ..ClusterState::default()
        };
        for _ in 0..5 {
            state.add_member(false);
        }
        let zones: Vec<&str> = state.members.iter().map(|m| m.zone.as_str()).collect();
        assert_eq!(zones, ["z-a", "z-b", "z-c", "z-a", "z-b"]);
        let names: Vec<&str> = state.members.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["m1", "m2", "m3", "m4", "m5"]);
        state.members.retain(|m| m.name != "m3");
        assert_eq!(state.add_member(true), "m6", "names are not reused");
        assert_eq!(state.members.last().unwrap().zone, "z-c");
        assert_eq!(state.wanted(), "m1,m2,m4,m5,m6");
        assert!(state.peers().is_none(), "no addresses yet");
    }
}
