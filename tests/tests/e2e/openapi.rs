//! schemathesis against the real broker, with the broker's own `GET /openapi.json`: it generates requests for
//! every documented operation (the document's examples, its boundary cases, then random valid and invalid
//! data) and checks each answer: no 5xx, and status, content type, headers and body as the document says. A
//! broker of its own (API + worker on a fresh database), so its destructive calls touch nothing else. Bounded in
//! examples per operation and in time; any failure fails the test, with schemathesis's report of it.

use std::time::{Duration, Instant};

use berth_tests::Stack;
use serde_json::Value;

/// Test cases per operation and phase. With 32 operations this keeps the run near a minute on two cores.
const MAX_EXAMPLES: &str = "10";
/// The run's hard limit: past it the test fails (schemathesis is killed).
const TIME_LIMIT: Duration = Duration::from_secs(240);
/// The answers that break the document, and server errors. (schemathesis's other checks judge the API's
/// choices, such as accepting a request with an unknown field, rather than its agreement with the document.)
const CHECKS: &str = "not_a_server_error,status_code_conformance,content_type_conformance,\
                      response_headers_conformance,response_schema_conformance";

fn schemathesis() -> String {
    std::env::var("BERTH_TEST_SCHEMATHESIS").unwrap_or_else(|_| {
        panic!(
            "BERTH_TEST_SCHEMATHESIS is not set: run ./scripts/test.sh, which installs schemathesis \
             (scripts/lib/schemathesis.sh) and sets it"
        )
    })
}

#[tokio::test]
async fn schemathesis_finds_no_server_error_and_no_answer_that_breaks_the_document() {
    let command = schemathesis();
    let stack = Stack::start_with(vec![
        // Generated requests include wrong credentials; the throttle would otherwise lock the tester out.
        ("AUTH_FAILURE_LIMIT", "0".into()),
    ])
    .await
    .unwrap();

    let document = stack
        .http
        .get(format!("{}/openapi.json", stack.base_url))
        .send()
        .await
        .unwrap();
    assert_eq!(document.status(), 200, "served without credentials");
    let document: Value = document.json().await.unwrap();
    assert_eq!(document["openapi"], "3.1.0");

    let report = stack.dir.join("schemathesis.json");
    let seed = std::env::var("BERTH_SCHEMATHESIS_SEED").unwrap_or_else(|_| "20261207".into());
    let mut cmd = std::process::Command::new(&command);
    cmd.arg("run")
        .arg(format!("{}/openapi.json", stack.base_url))
        .args(["--url", &stack.base_url])
        .args(["--auth", &format!("{}:{}", stack.username, stack.password)])
        .args(["--checks", CHECKS])
        .args(["--phases", "examples,coverage,fuzzing"])
        .args(["--max-examples", MAX_EXAMPLES])
        .args(["--seed", &seed])
        .args(["--workers", "2"])
        .args(["--request-timeout", "40"])
        .args(["--suppress-health-check", "all"])
        .args(["--generation-database", "none"])
        .args(["--report", "json"])
        .arg("--report-json-path")
        .arg(&report)
        .arg("--no-color")
        .env("SCHEMATHESIS_TELEMETRY", "false")
        .current_dir(&stack.dir);
    let answered_before = answers_by_class(&stack).await;
    let started = Instant::now();
    let output = tokio::time::timeout(
        TIME_LIMIT,
        tokio::process::Command::from(cmd)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap_or_else(|_| panic!("schemathesis ran longer than {TIME_LIMIT:?}"))
    .unwrap();
    let elapsed = started.elapsed();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    // The broker's own count of its answers (`/metrics`), as a check on schemathesis's: how many requests it
    // sent, and that none was answered with a 5xx.
    let answered_after = answers_by_class(&stack).await;
    let answered = |class: &str| answered_after[class] - answered_before[class];
    let requests: u64 = answered_after.keys().map(|class| answered(class)).sum();

    let report: Value = serde_json::from_str(
        &std::fs::read_to_string(&report)
            .unwrap_or_else(|e| panic!("schemathesis wrote no report: {e}\n{text}")),
    )
    .expect("the report is JSON");
    let failures: u64 = report["failures"]
        .as_array()
        .map(|f| f.iter().map(|f| f["count"].as_u64().unwrap_or(1)).sum())
        .unwrap_or(0);
    let errors = report["errors"].as_array().map_or(0, Vec::len);
    println!(
        "schemathesis {} (seed {seed}, {MAX_EXAMPLES} examples per operation and phase): {} of {} operations \
         tested, {} test cases, {requests} requests answered by the broker ({} 2xx, {} 4xx, {} 5xx), {failures} \
         failures, {errors} errors, {:.1} s",
        report["schemathesis_version"].as_str().unwrap_or("?"),
        report["operations"]["tested"],
        report["operations"]["total"],
        report["test_cases"]["generated"],
        answered("2xx"),
        answered("4xx"),
        answered("5xx"),
        elapsed.as_secs_f64()
    );
    if !output.status.success() || failures > 0 || errors > 0 || answered("5xx") > 0 {
        let api_log = stack.log("api.log");
        panic!(
            "schemathesis found problems (exit {:?}):\n{text}\n--- api.log (last 4000 bytes) ---\n{}",
            output.status.code(),
            &api_log[api_log.len().saturating_sub(4000)..]
        );
    }
    let tested = report["operations"]["tested"].as_u64().unwrap_or(0);
    assert!(
        tested >= 30 && tested == report["operations"]["total"].as_u64().unwrap_or(0),
        "schemathesis did not test every operation:\n{text}"
    );
    assert!(
        requests > 10 * tested,
        "schemathesis sent too few requests:\n{text}"
    );
    stack.stop().await;
}

/// `berth_http_responses_total` by class ("2xx", ...), from the broker's `/metrics`.
async fn answers_by_class(stack: &Stack) -> std::collections::BTreeMap<String, u64> {
    let (_, metrics) = stack
        .send(stack.request(reqwest::Method::GET, "/metrics"))
        .await
        .unwrap();
    let metrics = metrics.as_str().expect("the metrics are text").to_string();
    let mut by_class = std::collections::BTreeMap::new();
    for line in metrics.lines() {
        if let Some(rest) = line.strip_prefix("berth_http_responses_total{code=\"")
            && let Some((class, count)) = rest.split_once("\"} ")
        {
            by_class.insert(
                class.to_string(),
                count.trim().parse::<f64>().unwrap_or(0.0) as u64,
            );
        }
    }
    for class in ["1xx", "2xx", "3xx", "4xx", "5xx"] {
        by_class.entry(class.to_string()).or_insert(0);
    }
    by_class
}
