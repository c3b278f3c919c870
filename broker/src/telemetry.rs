//! Logging and metrics of both binaries. Logs: `tracing` with `RUST_LOG`-style filtering (default `info`), as
//! text or as one JSON object a line (`LOG_FORMAT`). Metrics: the `metrics` facade with a Prometheus recorder
//! whose text each process's `/metrics` serves next to the gauges it reads from the database. Every name and
//! label is listed in docs/observability.md.

use std::{sync::OnceLock, time::Duration};

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde::Deserialize;

/// `LOG_FORMAT`: how log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One readable line per event, its spans' fields before the message.
    #[default]
    Text,
    /// One JSON object per event: `timestamp`, `level`, the event's fields (`message` among them) at the top,
    /// `span` (the innermost span's fields) and `spans` (every enclosing span's, outermost first).
    Json,
}

/// Installs the log subscriber for the process (a second call does nothing).
pub fn init(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn,tower_http=info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(true)
            .try_init(),
    };
}

/// The names of the metrics berth records (the gauges read from the database are named in their handlers).
pub mod names {
    /// Histogram: seconds from a request's arrival to its response. Labels `method`, `route` (the matched route
    /// pattern, `unmatched` for paths berth does not serve), `status` (the code, e.g. `202`).
    pub const HTTP_REQUEST_DURATION: &str = "berth_http_request_duration_seconds";
    /// Histogram: seconds one run of a task took. Labels `kind`, `outcome` (`succeeded`, `failed`, `retry`,
    /// `wait`, `stopped`).
    pub const TASK_DURATION: &str = "berth_task_duration_seconds";
    /// Histogram: seconds from a task being due (`run_at`) to a worker claiming it. Label `kind`.
    pub const TASK_QUEUE_WAIT: &str = "berth_task_queue_wait_seconds";
    /// Counter: runs that ended in a retryable error and were scheduled again. Label `kind`.
    pub const TASK_RETRIES: &str = "berth_task_retries_total";
    /// Counter: claims whose lease ran out (their worker died or stalled), counted by the worker that swept
    /// them back. Label `kind`.
    pub const TASK_LEASE_EXPIRIES: &str = "berth_task_lease_expiries_total";
    /// Counter: webhook delivery attempts that failed. Label `final` (`true` when it was the last attempt).
    pub const WEBHOOK_FAILURES: &str = "berth_webhook_failures_total";
    /// Gauge (worker): seconds since the claim loop last went round; `/health` fails past its limit.
    pub const WORKER_CLAIM_LOOP_AGE: &str = "berth_worker_claim_loop_age_seconds";
}

/// Histogram buckets in seconds: a request's milliseconds up to a provision's half hour.
const BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
    600.0, 1800.0,
];

static RECORDER: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process's Prometheus recorder, installed as the global `metrics` recorder on first use. Its
/// histograms are folded in by [`spawn_metrics_upkeep`]. If another recorder was installed first (only a test
/// would), this handle renders nothing.
pub fn metrics() -> &'static PrometheusHandle {
    RECORDER.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets(BUCKETS)
            .expect("the bucket list is not empty")
            .build_recorder();
        let handle = recorder.handle();
        let _ = metrics::set_global_recorder(recorder);
        describe();
        handle
    })
}

/// Folds recorded histogram samples into their buckets every few seconds, so memory stays flat between
/// scrapes. Call once per process, inside the runtime.
pub fn spawn_metrics_upkeep() {
    let handle = metrics();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(5));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            handle.run_upkeep();
        }
    });
}

/// The recorder's text: what `/metrics` serves after its database gauges.
pub fn render_metrics() -> String {
    let handle = metrics();
    handle.run_upkeep();
    handle.render()
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_histogram!(
        names::HTTP_REQUEST_DURATION,
        Unit::Seconds,
        "Time from a request's arrival to its response, by method, route and status."
    );
    describe_histogram!(
        names::TASK_DURATION,
        Unit::Seconds,
        "Time one run of a task took, by kind and outcome."
    );
    describe_histogram!(
        names::TASK_QUEUE_WAIT,
        Unit::Seconds,
        "Time from a task being due to a worker claiming it, by kind."
    );
    describe_counter!(
        names::TASK_RETRIES,
        "Task runs that failed with a retryable error and were scheduled again, by kind."
    );
    describe_counter!(
        names::TASK_LEASE_EXPIRIES,
        "Task claims whose lease ran out (worker lost) and that this worker swept back, by kind."
    );
    describe_counter!(
        names::WEBHOOK_FAILURES,
        "Failed webhook delivery attempts; final=\"true\" when no attempt is left."
    );
    describe_gauge!(
        names::WORKER_CLAIM_LOOP_AGE,
        Unit::Seconds,
        "Seconds since this worker's claim loop last went round."
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorded_metrics_render_with_their_names_and_buckets() {
        metrics();
        metrics::counter!(names::TASK_RETRIES, "kind" => "noop").increment(2);
        metrics::histogram!(names::TASK_QUEUE_WAIT, "kind" => "noop").record(0.003);
        let text = render_metrics();
        assert!(
            text.contains("berth_task_retries_total{kind=\"noop\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("berth_task_queue_wait_seconds_bucket{kind=\"noop\",le=\"0.005\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE berth_task_queue_wait_seconds histogram"),
            "{text}"
        );
    }

    #[test]
    fn log_formats_parse_from_their_setting_words() {
        let parse = |word: &str| serde_json::from_value::<LogFormat>(serde_json::json!(word));
        assert_eq!(parse("json").unwrap(), LogFormat::Json);
        assert_eq!(parse("text").unwrap(), LogFormat::Text);
        assert!(parse("yaml").is_err());
    }
}
