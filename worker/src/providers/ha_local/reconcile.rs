//! The reconcile loop's work on one `ha_local` cluster: what stopped runs again, and the primary and the
//! members' roles are recorded.

use broker::db::{instances, instances::InstanceRow};
use serde_json::Value;
use sqlx::PgPool;
use tracing::{info, warn};

use super::{cluster, cluster::LocalCluster, dcs_for, members_details};
use crate::{
    context::Services,
    providers::{
        LOCAL_LOCKS, lock_idle_instance,
        patroni::{Timings, record_recovery, roles, roles_patch},
    },
};

/// Each member's Patroni running again where it stopped (a primary that crashed is left to Patroni's election;
/// a member that cannot start gets new data from the primary). Returns the members restarted.
async fn restart_members(
    cluster: &LocalCluster,
    instance_id: &str,
    dcs: &Value,
    http: &reqwest::Client,
    leader: Option<&str>,
) -> anyhow::Result<Vec<String>> {
    let mut restarted: Vec<String> = Vec::new();
    let patroni = cluster.patroni(http);
    for member in &cluster.state.members {
        if cluster.patroni_pids(&member.name).is_empty() {
            // A crashed primary still holds the leader key until its ttl lapses: leave it to Patroni to promote
            // a replica then (a restart in place would race that election), and bring it back as a replica.
            if leader == Some(member.name.as_str()) {
                continue;
            }
            warn!(instance_id, member = %member.name, "a member's Patroni is not running; starting it again");
            cluster.ensure_member(member, dcs).await?;
            restarted.push(member.name.clone());
            continue;
        }
        let failed = patroni
            .member_state(&cluster::api_base(member))
            .await
            .is_some_and(|s| s["state"] == "start failed" || s["state"] == "crashed");
        if failed && leader.is_some_and(|l| l != member.name) {
            cluster.replace_member(member, dcs).await?;
            restarted.push(member.name.clone());
        }
    }
    Ok(restarted)
}

/// One reconcile pass over a cluster, under the instance's advisory lock (skipped if another worker or an
/// operation has it): etcd and every member's Patroni running (restarted where they stopped, once Patroni has
/// failed over if it was the primary; a member that cannot start given new data from the primary), then the
/// primary and the members' roles recorded.
pub(super) async fn heal(
    pool: &PgPool,
    services: &Services,
    instance: &InstanceRow,
    cluster: &LocalCluster,
    timings: Timings,
) -> anyhow::Result<()> {
    let mut tx = pool.begin().await?;
    let Some(current) = lock_idle_instance(&mut tx, LOCAL_LOCKS, &instance.id).await? else {
        return Ok(());
    };
    let http = &services.http;
    let mut restarted: Vec<String> = Vec::new();
    if cluster.ensure_etcd(http).await? {
        warn!(instance_id = %instance.id, "the cluster's etcd was not running; started it again");
        restarted.push("etcd".into());
    }
    let dcs = dcs_for(&current, timings);
    let view = cluster.patroni(http).cluster().await.ok();
    let leader = view
        .as_ref()
        .and_then(|v| v.leader())
        .map(|l| l.name.clone());
    restarted.extend(restart_members(cluster, &instance.id, &dcs, http, leader.as_deref()).await?);
    let members = members_details(&cluster.state, view.as_ref());
    let unchanged = roles_patch(&current.details, members.clone(), leader.as_deref()).is_none();
    if restarted.is_empty() && unchanged {
        return Ok(());
    }
    let mut patch = roles(members, leader.as_deref());
    if !restarted.is_empty() {
        record_recovery(&mut patch, &current.details, "restarts", &restarted);
    }
    instances::merge_details(&mut *tx, &instance.id, &patch).await?;
    tx.commit().await?;
    if !restarted.is_empty() {
        info!(instance_id = %instance.id, restarted = ?restarted, "the cluster's stopped processes run again");
    }
    Ok(())
}
