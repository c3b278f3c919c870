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

/// A warm-pool cluster is offered once it has settled: Patroni has given every replica its replication slot
/// (a replica that started streaming without one restarts its WAL receiver when it gets it) and a checkpoint
/// has written out the bootstrap's pages, so a take does not share the CPU with that work. Best effort, for at
/// most a few seconds: the cluster works either way.
pub(super) async fn settle(cluster: &LocalCluster, primary_port: u16) {
    use sqlx::Connection as _;
    let t0 = std::time::Instant::now();
    let Ok(mut conn) =
        sqlx::PgConnection::connect_with(&cluster.superuser(primary_port, "postgres")).await
    else {
        return;
    };
    let want = (cluster.state.members.len() - 1) as i64;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while tokio::time::Instant::now() < deadline {
        let slotted: Result<i64, _> = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_replication r JOIN pg_replication_slots s ON s.active_pid = r.pid \
             WHERE r.state = 'streaming'",
        )
        .fetch_one(&mut conn)
        .await;
        if slotted.is_ok_and(|n| n >= want) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = sqlx::query("CHECKPOINT").execute(&mut conn).await;
    let _ = conn.close().await;
    tracing::info!(
        settle_ms = t0.elapsed().as_millis(),
        "pooled ha cluster settled"
    );
}
