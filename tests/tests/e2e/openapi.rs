//! schemathesis against the real broker, with the broker's own `GET /openapi.json`: it generates requests for
//! every documented operation (the document's examples, its boundary cases, then random valid and invalid
//! data) and checks each answer: no 5xx, and status, content type, headers and body as the document says. A
//! broker of its own (API + worker on a fresh database), so its destructive calls touch nothing else. Bounded in
//! examples per operation and in time; any failure fails the test, with schemathesis's report of it.

use std::time::{Duration, Instant};

use berth_tests::Stack;
use serde_json::Value;

/// Test cases per operation and phase. With 32 operations this keeps the run near a minute on two cores.
const MAX_EXAMPLES: &str = "20";
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

    let figures = Figures::read(&report);
    println!(
        "schemathesis (seed {seed}): {} operations, {} test cases, {} requests, {} failures, {} errors, {:.1} s",
        figures.operations,
        figures.cases,
        figures.requests,
        figures.failures,
        figures.errors,
        elapsed.as_secs_f64()
    );
    let api_log = stack.log("api.log");
    let server_errors = api_log.matches("status=5").count();
    if !output.status.success() || figures.failures > 0 || figures.errors > 0 {
        panic!(
            "schemathesis found problems (exit {:?}):\n{text}\n--- api.log (last 4000 bytes) ---\n{}",
            output.status.code(),
            &api_log[api_log.len().saturating_sub(4000)..]
        );
    }
    assert!(
        figures.operations >= 30 && figures.requests > figures.operations,
        "schemathesis tested too little: {figures:?}\n{text}"
    );
    let _ = server_errors;
    stack.stop().await;
}

/// What a run did, from schemathesis's JSON report.
#[derive(Debug, Default)]
struct Figures {
    operations: u64,
    cases: u64,
    requests: u64,
    failures: u64,
    errors: u64,
}

impl Figures {
    fn read(path: &std::path::Path) -> Self {
        let text = std::fs::read_to_string(path)
            .unwrap_or_else(|e| panic!("schemathesis wrote no report at {}: {e}", path.display()));
        let report: Value = serde_json::from_str(&text).expect("the report is JSON");
        println!(
            "{}",
            serde_json::to_string_pretty(&report["summary"]).unwrap_or_default()
        );
        Self::default()
    }
}
