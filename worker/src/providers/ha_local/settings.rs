//! An update of the cluster-wide settings: `synchronous` and `tuning_profile` go to Patroni's configuration in
//! etcd (`PATCH /config`), which every member applies; settings that need a restart are then applied member by
//! member, replicas first, so the primary restarts once and last.

use anyhow::Context as _;
use broker::db::{instances, instances::InstanceRow};
use serde_json::{Map, Value, json};

use super::{cluster::LocalCluster, config, local, params::Params, patroni::Patroni};
use crate::{context::TaskContext, registry::TaskError};

pub async fn apply(
    ctx: &TaskContext<'_>,
    instance: &InstanceRow,
    cluster: &LocalCluster,
    params: &Params,
) -> Result<(), TaskError> {
    let synchronous = instance
        .details
        .get("synchronous")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let profile = instance
        .details
        .get("tuning_profile")
        .and_then(Value::as_str)
        .unwrap_or("default");
    if synchronous == params.synchronous && profile == params.server.tuning_profile {
        return Ok(());
    }
    ctx.progress("applying the cluster's settings").await?;
    let patroni = Patroni::new(&ctx.services.http, &cluster.state, &cluster.secrets);
    let patch = json!({
        "synchronous_mode": params.synchronous,
        "postgresql": { "parameters": parameter_patch(profile, &params.server.tuning_profile) },
    });
    let (status, text) = patroni
        .change(reqwest::Method::PATCH, "/config", &patch)
        .await
        .map_err(local)?;
    if !(200..300).contains(&status) {
        return Err(TaskError::retryable(format!(
            "Patroni refused the new configuration ({status}): {text}"
        )));
    }
    // Patroni applies it within a loop; a pending restart shows up only then.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let view = patroni.cluster().await.map_err(local)?;
    let mut order: Vec<_> = cluster.state.members.iter().collect();
    order.sort_by_key(|m| view.member(&m.name).is_some_and(|v| v.is_leader()));
    for member in order {
        patroni
            .restart_pending(member.api_port)
            .await
            .map_err(local)?;
    }
    instances::merge_details(
        ctx.pool,
        &instance.id,
        &json!({ "synchronous": params.synchronous, "tuning_profile": params.server.tuning_profile }),
    )
    .await
    .context("recording the cluster's settings")?;
    Ok(())
}

/// The new profile's parameters, with `null` for those only the old one set (a PATCH removes them).
pub(crate) fn parameter_patch(old: &str, new: &str) -> Map<String, Value> {
    let mut patch = config::cluster_parameters(new);
    for key in config::cluster_parameters(old).keys() {
        patch.entry(key.clone()).or_insert(Value::Null);
    }
    patch
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_profile_change_removes_what_the_old_one_alone_set() {
        let patch = super::parameter_patch("analytics", "default");
        assert_eq!(patch["jit"], serde_json::Value::Null);
        assert_eq!(patch["max_connections"], "100");
        assert_eq!(patch["wal_level"], "replica");
    }
}
