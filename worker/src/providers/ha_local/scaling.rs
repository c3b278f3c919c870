//! A change of `members`: one member at a time, each new one streaming before the next is added, and only
//! replicas removed (the synchronous standby last), so the cluster keeps a primary and its quorum throughout.

use std::time::Duration;

use anyhow::Context as _;
use broker::db::instances;
use serde_json::{Value, json};
use tracing::info;

use super::{INLINE_WAIT, cluster::LocalCluster, local, members_details, readiness::wait_ready};
use crate::{
    context::TaskContext,
    providers::{Progress, patroni::ClusterView},
    registry::TaskError,
};

/// Brings the cluster to `want` members. `Some(wait)` when it must be looked at again later.
pub async fn to(
    ctx: &TaskContext<'_>,
    cluster: &mut LocalCluster,
    want: usize,
    dcs: &Value,
) -> Result<Option<Progress<()>>, TaskError> {
    let http = &ctx.services.http;
    // Members a crash left stopped (an interrupted update) run again first.
    for member in &cluster.state.members {
        cluster
            .ensure_member(member, dcs)
            .await
            .context("starting Patroni")
            .map_err(local)?;
    }
    loop {
        let (view, leader) = match wait_ready(cluster, http, INLINE_WAIT).await {
            Ok(ready) => ready,
            Err(why) => return Ok(Some(Progress::wait_secs(1, why))),
        };
        instances::merge_details(
            ctx.pool,
            ctx.instance_id()?,
            &json!({ "members": members_details(&cluster.state, Some(&view)), "primary": leader }),
        )
        .await
        .context("recording the cluster's members")?;
        let have = cluster.state.members.len();
        if have == want {
            return Ok(None);
        }
        if have < want {
            add_member(ctx, cluster, want, dcs).await?;
        } else {
            remove_replica(ctx, cluster, want, &view, &leader).await?;
        }
    }
}

/// A new member with free ports, started: Patroni clones it from the primary.
async fn add_member(
    ctx: &TaskContext<'_>,
    cluster: &mut LocalCluster,
    want: usize,
    dcs: &Value,
) -> Result<(), TaskError> {
    let have = cluster.state.members.len();
    let name = cluster.state.add_member().map_err(local)?;
    cluster.layout.save_state(&cluster.state).map_err(local)?;
    ctx.progress(&format!("adding member {name} ({} of {want})", have + 1))
        .await?;
    cluster
        .prepare()
        .await
        .context("preparing the new member's folder")
        .map_err(local)?;
    let member = cluster.state.member(&name).cloned().expect("just added");
    cluster
        .ensure_member(&member, dcs)
        .await
        .context("starting Patroni")
        .map_err(local)?;
    info!(scope = %cluster.state.scope, member = %name, "member added");
    Ok(())
}

/// One replica stopped and removed: the newest plain replica first; the synchronous standby only when no other
/// is left.
async fn remove_replica(
    ctx: &TaskContext<'_>,
    cluster: &mut LocalCluster,
    want: usize,
    view: &ClusterView,
    leader: &str,
) -> Result<(), TaskError> {
    let have = cluster.state.members.len();
    let victim = cluster
        .state
        .members
        .iter()
        .rev()
        .filter(|m| m.name != leader)
        .min_by_key(|m| {
            view.member(&m.name)
                .is_some_and(|v| v.role == "sync_standby")
        })
        .map(|m| m.name.clone())
        .ok_or_else(|| TaskError::fatal("no replica to remove"))?;
    ctx.progress(&format!(
        "removing member {victim} ({} of {want})",
        have - 1
    ))
    .await?;
    cluster
        .stop_member(&victim)
        .await
        .context("stopping a member")
        .map_err(local)?;
    cluster.state.members.retain(|m| m.name != victim);
    cluster.layout.save_state(&cluster.state).map_err(local)?;
    cluster.remove_member_files(&victim).map_err(local)?;
    info!(scope = %cluster.state.scope, member = %victim, "member removed");
    // Patroni drops the member's key when its ttl lapses; give the primary a moment to notice.
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok(())
}
