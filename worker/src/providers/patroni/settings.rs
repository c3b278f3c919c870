//! An update of the cluster-wide settings: `synchronous` and `tuning_profile` go to Patroni's configuration in
//! etcd (`PATCH /config`), which every member applies; settings that need a restart are then applied member by
//! member, replicas first, so the primary restarts once and last.

use anyhow::Context as _;
use broker::db::{instances, instances::InstanceRow};
use serde_json::{Map, Value, json};

use super::{ClusterView, Patroni, dcs, params::Params};
use crate::{context::TaskContext, registry::TaskError};

/// `synchronous` and `tuning_profile` as the instance's details record them.
pub fn recorded(instance: &InstanceRow) -> (bool, &str) {
    let details = &instance.details;
    (
        details
            .get("synchronous")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        details
            .get("tuning_profile")
            .and_then(Value::as_str)
            .unwrap_or("default"),
    )
}

/// The profile the cluster runs with, when `params` change `synchronous` or `tuning_profile`; `None` when not.
pub fn changed_from<'a>(instance: &'a InstanceRow, params: &Params) -> Option<&'a str> {
    let (synchronous, profile) = recorded(instance);
    (synchronous != params.synchronous || profile != params.server.tuning_profile)
        .then_some(profile)
}

/// Sends the new settings (`PATCH /config` through `patroni`), restarts the members that need it (`members`:
/// name and REST API base URL; replicas first, the primary of `view` last) and records the settings.
/// `old_profile` is what [`changed_from`] returned.
pub async fn apply(
    ctx: &TaskContext<'_>,
    instance: &InstanceRow,
    patroni: &Patroni<'_>,
    view: &ClusterView,
    mut members: Vec<(String, String)>,
    old_profile: &str,
    params: &Params,
) -> Result<(), TaskError> {
    ctx.progress("applying the cluster's settings").await?;
    let new_profile = params.server.tuning_profile.as_str();
    let patch = json!({
        "synchronous_mode": params.synchronous,
        "postgresql": { "parameters": parameter_patch(old_profile, new_profile) },
    });
    let (status, text) = patroni
        .change(reqwest::Method::PATCH, "/config", &patch)
        .await
        .map_err(TaskError::Retryable)?;
    if !(200..300).contains(&status) {
        return Err(TaskError::retryable(format!(
            "Patroni refused the new configuration ({status}): {text}"
        )));
    }
    // Patroni applies it within a loop; a pending restart shows up only then.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    members.sort_by_key(|(name, _)| view.member(name).is_some_and(|v| v.is_leader()));
    for (name, base) in members {
        patroni
            .restart_pending(&base)
            .await
            .with_context(|| format!("restarting member {name}"))
            .map_err(TaskError::Retryable)?;
    }
    instances::merge_details(
        ctx.pool,
        &instance.id,
        &json!({ "synchronous": params.synchronous, "tuning_profile": new_profile }),
    )
    .await
    .context("recording the cluster's settings")?;
    Ok(())
}

/// The new profile's parameters, with `null` for those only the old one set (a PATCH removes them).
pub fn parameter_patch(old: &str, new: &str) -> Map<String, Value> {
    let mut patch = dcs::cluster_parameters(new);
    for key in dcs::cluster_parameters(old).keys() {
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
