//! Switchover (planned: the primary hands over cleanly) and failover (forced, also without a healthy primary)
//! through Patroni's REST API, to a named member or the healthiest replica. A task run again after a crash
//! recognises its own earlier change (details `change_primary`) instead of moving the primary twice.

use std::time::Duration;

use anyhow::Context as _;
use broker::{
    db::{instances, instances::InstanceRow},
    model::Operation,
};
use serde_json::{Value, json};
use tracing::info;

use super::{
    local,
    patroni::{ClusterView, Patroni},
};
use crate::{context::TaskContext, providers::Progress, registry::TaskError};

/// What the instance's details record as `members` for a view of the cluster (engine-specific).
pub type MembersDetails<'a> = &'a (dyn Fn(&ClusterView) -> Value + Sync);

/// Shared by the `ha` plan's engines: `patroni` reaches the cluster's REST APIs.
pub async fn run(
    ctx: &TaskContext<'_>,
    instance: &InstanceRow,
    patroni: &Patroni<'_>,
    members: MembersDetails<'_>,
    operation: Operation,
    candidate: Option<&str>,
) -> Result<Progress<()>, TaskError> {
    let view = patroni.cluster().await.map_err(local)?;
    let leader = view.leader().map(|l| l.name.clone());
    let task = ctx.task.id.to_string();
    if let Some(earlier) = instance
        .details
        .get("change_primary")
        .filter(|c| c["task"] == task.as_str())
    {
        let from = earlier["from"].as_str();
        if leader.is_some() && leader.as_deref() != from {
            return record(ctx, instance, members, &view).await;
        }
    }
    // In synchronous mode Patroni hands over only to the synchronous standby, which it names a loop or two
    // after a member (re)joins: until it has one, wait rather than pick another replica.
    let synchronous = instance
        .details
        .get("synchronous")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let target = match candidate {
        Some(name) => name.to_string(),
        None => match best_replica(&view) {
            Some(name)
                if !synchronous || view.member(&name).is_some_and(|m| m.role == "sync_standby") =>
            {
                name
            }
            _ => {
                return Ok(Progress::Wait {
                    after: Duration::from_secs(1),
                    progress: "waiting for a healthy (synchronous) standby to hand over to".into(),
                });
            }
        },
    };
    if leader.as_deref() == Some(target.as_str()) {
        return record(ctx, instance, members, &view).await;
    }
    let member = view
        .member(&target)
        .ok_or_else(|| TaskError::fatal(format!("{target} is not a member of the cluster")))?;
    if !member.is_healthy_replica() {
        return Err(TaskError::fatal(format!(
            "member {target} is not a healthy replica (role {}, state {}); name another or leave the choice to berth",
            member.role, member.state
        )));
    }
    let (path, body) = match operation {
        Operation::Switchover => {
            let Some(leader) = &leader else {
                return Err(TaskError::fatal(
                    "the cluster has no healthy primary to switch over from; use /failover",
                ));
            };
            (
                "/switchover",
                json!({ "leader": leader, "candidate": target }),
            )
        }
        _ => ("/failover", json!({ "candidate": target })),
    };
    instances::merge_details(
        ctx.pool,
        &instance.id,
        &json!({ "change_primary": { "task": task, "from": leader } }),
    )
    .await
    .context("recording the change of primary")?;
    ctx.progress(&format!("{} to {target}", operation.as_str()))
        .await?;
    let (status, text) = patroni
        .change(reqwest::Method::POST, path, &body)
        .await
        .map_err(local)?;
    if !(200..300).contains(&status) {
        let hint = if view.members.iter().any(|m| m.role == "sync_standby")
            && operation == Operation::Switchover
        {
            " (in synchronous mode a switchover may only go to the synchronous standby; /failover can force another)"
        } else {
            ""
        };
        let refused = format!(
            "Patroni refused the {} ({status}): {text}{hint}",
            operation.as_str()
        );
        // A standby berth chose may have lost its role meanwhile: choose again. A named one is the caller's.
        return Err(if candidate.is_none() && status == 412 {
            TaskError::retryable(refused)
        } else {
            TaskError::fatal(refused)
        });
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(view) = patroni.cluster().await
            && view.leader().is_some_and(|l| l.name == target)
        {
            info!(instance_id = %instance.id, from = ?leader, to = %target, operation = operation.as_str(), "primary changed");
            return record(ctx, instance, members, &view).await;
        }
        if tokio::time::Instant::now() > deadline {
            return Err(TaskError::retryable(format!(
                "{target} did not become the primary within 60 s"
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The synchronous standby if there is one (the only one Patroni promotes without losing commits), else the
/// running replica with the least lag.
fn best_replica(view: &ClusterView) -> Option<String> {
    let healthy: Vec<_> = view.healthy_replicas().collect();
    if let Some(sync) = healthy.iter().find(|m| m.role == "sync_standby") {
        return Some(sync.name.clone());
    }
    healthy
        .into_iter()
        .min_by_key(|m| m.lag.as_ref().and_then(Value::as_u64).unwrap_or(u64::MAX))
        .map(|m| m.name.clone())
}

async fn record(
    ctx: &TaskContext<'_>,
    instance: &InstanceRow,
    members: MembersDetails<'_>,
    view: &ClusterView,
) -> Result<Progress<()>, TaskError> {
    let primary = view.leader().map(|l| l.name.clone());
    instances::merge_details(
        ctx.pool,
        &instance.id,
        &json!({ "primary": primary, "members": members(view) }),
    )
    .await
    .context("recording the new primary")?;
    Ok(Progress::Done(()))
}
