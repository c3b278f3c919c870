//! When a cluster is ready: a primary elected, every other member a healthy replica by Patroni's view, and each
//! one streaming from the primary by the primary's own account.

use std::time::Duration;

use super::cluster::LocalCluster;
use crate::providers::patroni::ClusterView;

/// What the cluster looks like once every member of `state` runs: the view and the primary's name, or what
/// is still missing. Streaming is checked on the primary itself (`pg_stat_replication`).
pub(super) async fn readiness(
    cluster: &LocalCluster,
    http: &reqwest::Client,
) -> Result<(ClusterView, String), String> {
    let view = cluster
        .patroni(http)
        .cluster()
        .await
        .map_err(|e| format!("{e:#}"))?;
    let leader = view
        .ready_primary(cluster.state.members.iter().map(|m| m.name.as_str()))?
        .name
        .clone();
    let want = cluster.state.members.len() - 1;
    let port = cluster
        .state
        .member(&leader)
        .ok_or("the primary is not a member berth knows")?
        .pg_port;
    let streaming = streaming_replicas(cluster, port)
        .await
        .map_err(|e| format!("{e:#}"))?;
    if streaming < want {
        return Err(format!(
            "{streaming} of {want} replicas streaming from the primary {leader}"
        ));
    }
    Ok((view, leader))
}

async fn streaming_replicas(cluster: &LocalCluster, port: u16) -> anyhow::Result<usize> {
    use sqlx::Connection as _;
    let mut conn = sqlx::PgConnection::connect_with(&cluster.superuser(port, "postgres")).await?;
    let n = crate::providers::postgres::streaming_replicas(&mut conn)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let _ = conn.close().await;
    Ok(n)
}

/// Polls [`readiness`] for up to `limit`.
pub(super) async fn wait_ready(
    cluster: &LocalCluster,
    http: &reqwest::Client,
    limit: Duration,
) -> Result<(ClusterView, String), String> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match readiness(cluster, http).await {
            Ok(ready) => return Ok(ready),
            Err(why) if tokio::time::Instant::now() >= deadline => return Err(why),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}
