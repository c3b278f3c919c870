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

use super::{ClusterView, Patroni};
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
    let view = patroni.cluster().await.map_err(TaskError::Retryable)?;
    let leader = view.leader().map(|l| l.name.clone());
    let task = ctx.task.id.to_string();
    if done_earlier(instance, &task, leader.as_deref()) {
        return record(ctx, instance, members, &view).await;
    }
    let target = match candidate {
        Some(name) => name.to_string(),
        None => match standby_to_hand_over_to(instance, &view) {
            Some(name) => name,
            None => {
                return Ok(Progress::wait_secs(
                    1,
                    "waiting for a healthy (synchronous) standby to hand over to",
                ));
            }
        },
    };
    if leader.as_deref() == Some(target.as_str()) {
        return record(ctx, instance, members, &view).await;
    }
    let change = Change {
        operation,
        from: leader,
        to: target,
        named: candidate.is_some(),
    };
    change.check(&view)?;
    instances::merge_details(
        ctx.pool,
        &instance.id,
        &json!({ "change_primary": { "task": task, "from": change.from } }),
    )
    .await
    .context("recording the change of primary")?;
    ctx.progress(&format!("{} to {}", operation.as_str(), change.to))
        .await?;
    change.ask(patroni, &view).await?;
    let view = change.await_new_primary(patroni, &instance.id).await?;
    record(ctx, instance, members, &view).await
}

/// Whether this task already moved the primary in an earlier run (details `change_primary`): one leads now, and
/// not the one it moved it from.
fn done_earlier(instance: &InstanceRow, task: &str, leader: Option<&str>) -> bool {
    instance
        .details
        .get("change_primary")
        .filter(|c| c["task"] == task)
        .is_some_and(|earlier| leader.is_some() && leader != earlier["from"].as_str())
}

/// The replica berth hands over to. In synchronous mode Patroni hands over only to the synchronous standby,
/// which it names a loop or two after a member (re)joins: until it has one, `None` (wait rather than pick
/// another replica).
fn standby_to_hand_over_to(instance: &InstanceRow, view: &ClusterView) -> Option<String> {
    let synchronous = instance
        .details
        .get("synchronous")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    best_replica(view)
        .filter(|name| !synchronous || view.member(name).is_some_and(|m| m.role == "sync_standby"))
}

/// A change of primary asked of Patroni.
struct Change {
    operation: Operation,
    from: Option<String>,
    to: String,
    /// The caller named the candidate (else berth chose it).
    named: bool,
}

impl Change {
    /// Only a healthy replica becomes the primary; a switchover needs a primary to hand over.
    fn check(&self, view: &ClusterView) -> Result<(), TaskError> {
        let target = &self.to;
        let member = view
            .member(target)
            .ok_or_else(|| TaskError::fatal(format!("{target} is not a member of the cluster")))?;
        if !member.is_healthy_replica() {
            return Err(TaskError::fatal(format!(
                "member {target} is not a healthy replica (role {}, state {}); name another or leave the choice to berth",
                member.role, member.state
            )));
        }
        if self.operation == Operation::Switchover && self.from.is_none() {
            return Err(TaskError::fatal(
                "the cluster has no healthy primary to switch over from; use /failover",
            ));
        }
        Ok(())
    }

    /// `POST /switchover` or `/failover`.
    async fn ask(&self, patroni: &Patroni<'_>, view: &ClusterView) -> Result<(), TaskError> {
        let operation = self.operation;
        let (path, body) = match (operation, &self.from) {
            (Operation::Switchover, Some(leader)) => (
                "/switchover",
                json!({ "leader": leader, "candidate": self.to }),
            ),
            _ => ("/failover", json!({ "candidate": self.to })),
        };
        let (status, text) = patroni
            .change(reqwest::Method::POST, path, &body)
            .await
            .map_err(TaskError::Retryable)?;
        if (200..300).contains(&status) {
            return Ok(());
        }
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
        Err(if !self.named && status == 412 {
            TaskError::retryable(refused)
        } else {
            TaskError::fatal(refused)
        })
    }

    /// Patroni's view once the target leads (60 s at most).
    async fn await_new_primary(
        &self,
        patroni: &Patroni<'_>,
        instance_id: &str,
    ) -> Result<ClusterView, TaskError> {
        let target = &self.to;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(view) = patroni.cluster().await
                && view.leader().is_some_and(|l| l.name == *target)
            {
                info!(instance_id = %instance_id, from = ?self.from, to = %target, operation = self.operation.as_str(), "primary changed");
                return Ok(view);
            }
            if tokio::time::Instant::now() > deadline {
                return Err(TaskError::retryable(format!(
                    "{target} did not become the primary within 60 s"
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
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
