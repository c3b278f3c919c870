//! The operator overview (`GET /berth/v1/dashboard`): instances per plan and state, the queue by kind, and the
//! newest failures with their errors.

use broker::{catalog::Catalog, db::dashboard};
use chrono::Utc;
use serde::Serialize;
use sqlx::PgConnection;

use super::text;

/// How many failed tasks the overview lists.
const FAILURES_SHOWN: i64 = 20;

#[derive(Debug, Serialize)]
pub struct PlanRow {
    pub service: String,
    pub plan: String,
    pub state: &'static str,
    pub instances: i64,
}

#[derive(Debug, Serialize)]
pub struct QueueRow {
    pub kind: String,
    pub pending: i64,
    pub due: i64,
    pub running: i64,
    pub oldest_due: String,
    pub failed_24h: i64,
}

#[derive(Debug, Serialize)]
pub struct Failure {
    pub task: String,
    pub kind: String,
    pub instance: Option<String>,
    pub binding: Option<String>,
    pub finished: String,
    pub age: String,
    pub attempts: String,
    pub error: String,
}

#[derive(Debug, Serialize)]
pub struct Overview {
    pub plans: Vec<PlanRow>,
    pub instances_total: i64,
    pub queue: Vec<QueueRow>,
    pub failures: Vec<Failure>,
    pub generated: String,
}

pub async fn load(conn: &mut PgConnection, catalog: &Catalog) -> sqlx::Result<Overview> {
    let now = Utc::now();
    let counts = dashboard::instances_per_plan_and_state(&mut *conn).await?;
    let queue = dashboard::queue_by_kind(&mut *conn).await?;
    let failures = dashboard::recent_failures(&mut *conn, FAILURES_SHOWN).await?;
    let plans: Vec<PlanRow> = counts
        .into_iter()
        .map(|c| {
            let plan = catalog.plan_by_id(&c.plan_id);
            PlanRow {
                service: plan
                    .as_ref()
                    .map_or_else(|| "-".to_string(), |p| p.service.name.clone()),
                plan: plan.map_or(c.plan_id, |p| p.plan.name.clone()),
                state: c.state,
                instances: c.instances,
            }
        })
        .collect();
    Ok(Overview {
        instances_total: plans.iter().map(|p| p.instances).sum(),
        plans,
        queue: queue
            .into_iter()
            .map(|q| QueueRow {
                kind: q.kind,
                pending: q.pending,
                due: q.due,
                running: q.running,
                oldest_due: if q.due > 0 {
                    text::span(q.oldest_due_secs as i64)
                } else {
                    "-".into()
                },
                failed_24h: q.failed_24h,
            })
            .collect(),
        failures: failures
            .into_iter()
            .map(|t| {
                let finished = t.finished_at.unwrap_or(t.updated_at);
                Failure {
                    task: t.id.to_string(),
                    kind: t.kind.clone(),
                    instance: t.instance_id.clone(),
                    binding: t.binding_id.clone(),
                    finished: text::timestamp(finished),
                    age: text::age(finished, now),
                    attempts: format!("{}/{}", t.attempts_spent().max(0), t.max_attempts),
                    error: text::redact(t.last_error.as_deref().unwrap_or("(no error recorded)")),
                }
            })
            .collect(),
        generated: text::timestamp(now),
    })
}
