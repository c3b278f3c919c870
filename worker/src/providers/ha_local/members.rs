//! Who leads an `ha_local` cluster and where its members listen: the members as the instance's details record
//! them, the primary's port, a binding's endpoints.

use serde_json::{Value, json};

use super::{cluster::LocalCluster, config, local, state::ClusterState};
use crate::{
    context::TaskContext,
    providers::{
        Progress,
        patroni::{
            ClusterView,
            credentials::{Address, Endpoints},
        },
    },
    registry::TaskError,
};

/// The members as the instance's details record them.
pub(super) fn members_details(state: &ClusterState, view: Option<&ClusterView>) -> Value {
    Value::Array(
        state
            .members
            .iter()
            .map(|m| {
                let seen = view.and_then(|v| v.member(&m.name));
                json!({
                    "name": m.name,
                    "port": m.pg_port,
                    "api_port": m.api_port,
                    "role": seen.map(|s| s.role.as_str()),
                    "state": seen.map(|s| s.state.as_str()),
                    // Bytes behind the primary when recorded (the dashboard shows it); null on the leader.
                    "lag": seen.and_then(|s| s.lag.clone()),
                })
            })
            .collect(),
    )
}

/// The primary's and the replicas' addresses for a binding.
pub(super) fn endpoints(state: &ClusterState, leader: &str) -> Result<Endpoints, TaskError> {
    let at = |port| Address {
        host: config::HOST.to_string(),
        port,
    };
    let primary = state
        .member(leader)
        .ok_or_else(|| {
            TaskError::retryable(format!("the primary {leader} is not a member berth knows"))
        })?
        .pg_port;
    let replicas = state
        .members
        .iter()
        .filter(|m| m.name != leader)
        .map(|m| at(m.pg_port))
        .collect();
    Ok(Endpoints {
        primary: at(primary),
        replicas,
    })
}

/// The primary's name, or a `Wait` while there is none (a failover is under way).
pub(super) fn leader_or_wait<T>(view: &ClusterView) -> Result<String, Progress<T>> {
    view.leader().map(|l| l.name.clone()).ok_or_else(|| {
        Progress::wait_secs(
            1,
            "the cluster has no primary right now (a failover is under way); waiting",
        )
    })
}

/// The primary's Postgres port, as Patroni reports who leads; a `Wait` while no member does.
pub(super) async fn primary_port<T>(
    ctx: &TaskContext<'_>,
    cluster: &LocalCluster,
) -> Result<Result<u16, Progress<T>>, TaskError> {
    let view = cluster
        .patroni(&ctx.services.http)
        .cluster()
        .await
        .map_err(local)?;
    Ok(match leader_or_wait(&view) {
        Ok(leader) => Ok(endpoints(&cluster.state, &leader)?.primary.port),
        Err(wait) => Err(wait),
    })
}
