//! `GET /metrics` (broker credentials): Prometheus text format. Queue depth and age, instances per plan and
//! undelivered webhooks come from the broker's database at scrape time, so every API process reports the
//! same queue; request counts and the latency histogram (`broker::telemetry`) are this process's own.

use std::fmt::Write as _;

use axum::{
    Router,
    extract::State,
    http::{HeaderValue, header},
    response::{IntoResponse, Response},
    routing::get,
};
use broker::db::metrics;

use crate::{AppState, error::ApiResult};

pub fn router() -> Router<AppState> {
    Router::new().route("/metrics", get(render))
}

async fn render(State(state): State<AppState>) -> ApiResult<Response> {
    let mut conn = state.db.acquire().await?;
    let queue = metrics::queue_depth(&mut *conn).await?;
    let oldest = metrics::oldest_due_secs(&mut *conn).await?;
    let instances = metrics::instances_per_plan(&mut *conn).await?;
    let webhooks = metrics::undelivered_webhooks(&mut *conn).await?;
    let pools = broker::db::pools::stats(&mut *conn).await?;
    drop(conn);

    let mut out = String::with_capacity(2048);
    let kinds = |pick: fn(&metrics::QueueDepth) -> i64| {
        queue
            .iter()
            .map(move |q| (format!("kind=\"{}\"", escape(&q.kind)), pick(q) as f64))
    };
    family(
        &mut out,
        "berth_tasks_pending",
        "gauge",
        "Tasks waiting in the queue (due now or later), by kind.",
        kinds(|q| q.pending),
    );
    family(
        &mut out,
        "berth_tasks_due",
        "gauge",
        "Pending tasks that are due now, by kind.",
        kinds(|q| q.due),
    );
    family(
        &mut out,
        "berth_tasks_running",
        "gauge",
        "Tasks a worker holds, by kind.",
        kinds(|q| q.running),
    );
    family(
        &mut out,
        "berth_tasks_lease_expired",
        "gauge",
        "Running tasks whose lease has run out (their worker is gone), by kind.",
        kinds(|q| q.expired),
    );
    family(
        &mut out,
        "berth_task_oldest_due_seconds",
        "gauge",
        "How long the longest-waiting due task has waited.",
        [(String::new(), oldest)],
    );
    let plan_labels = |plan_id: &str| match state.catalog.plan_by_id(plan_id) {
        Some(plan) => format!(
            "service=\"{}\",plan=\"{}\"",
            escape(&plan.service.name),
            escape(&plan.plan.name)
        ),
        None => format!("service=\"\",plan=\"{}\"", escape(plan_id)),
    };
    let instances = instances
        .iter()
        .map(|(plan_id, count)| (plan_labels(plan_id), *count as f64));
    family(
        &mut out,
        "berth_service_instances",
        "gauge",
        "Service instances, by service and plan.",
        instances,
    );
    family(
        &mut out,
        "berth_pool_items",
        "gauge",
        "Warm-pool items (berth's own, not counted as service instances), by plan, state (ready to be taken, \
         filling, or removing) and pool (empty: the plan's own items; else the preset whose clones they are).",
        pools.iter().flat_map(|p| {
            let labels = plan_labels(&p.plan_id);
            let pool = escape(&p.pool);
            [
                ("ready", p.ready),
                ("filling", p.filling),
                ("removing", p.removing),
            ]
            .map(|(state, n)| {
                (
                    format!("{labels},state=\"{state}\",pool=\"{pool}\""),
                    n as f64,
                )
            })
        }),
    );
    family(
        &mut out,
        "berth_pool_hits_total",
        "counter",
        "Provisions of a plan with a pool that took a ready item, by plan.",
        pools
            .iter()
            .filter(|p| p.pool.is_empty())
            .map(|p| (plan_labels(&p.plan_id), p.hits as f64)),
    );
    family(
        &mut out,
        "berth_pool_misses_total",
        "counter",
        "Provisions of a plan with a pool that found no item they could use (and took the ordinary path), by plan.",
        pools
            .iter()
            .filter(|p| p.pool.is_empty())
            .map(|p| (plan_labels(&p.plan_id), p.misses as f64)),
    );
    family(
        &mut out,
        "berth_webhook_deliveries_undelivered",
        "gauge",
        "Webhook deliveries not delivered: pending (being retried) or failed (given up).",
        webhooks
            .iter()
            .map(|(s, n)| (format!("state=\"{}\"", escape(s)), *n as f64)),
    );
    family(
        &mut out,
        "berth_http_responses_total",
        "counter",
        "Responses this API process has given, by status class.",
        state
            .requests
            .snapshot()
            .into_iter()
            .map(|(class, n)| (format!("code=\"{class}\""), n as f64)),
    );
    // The histograms and counters this process records (latency per route and status), after the gauges.
    out.push_str(&broker::telemetry::render_metrics());
    let mut response = out.into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    Ok(response)
}

/// One metric family: HELP, TYPE and a sample per label set (an empty label set gives a bare name).
fn family(
    out: &mut String,
    name: &str,
    kind: &str,
    help: &str,
    samples: impl IntoIterator<Item = (String, f64)>,
) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, value) in samples {
        if labels.is_empty() {
            let _ = writeln!(out, "{name} {value}");
        } else {
            let _ = writeln!(out, "{name}{{{labels}}} {value}");
        }
    }
}

/// A label value as the text format wants it.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
