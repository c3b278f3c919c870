//! Logs, the audit trail and metrics of the real binaries: JSON log lines that join a request to its task, the
//! events endpoint, the worker's `/health` and `/metrics`, and every metric the shipped alert rules and Grafana
//! dashboard use being exported.

use std::{collections::BTreeSet, time::Duration};

use base64::{Engine, engine::general_purpose::STANDARD};
use berth_tests::{Stack, free_port, plan_ids, repo_dir};
use reqwest::Method;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(60);

/// A stack logging JSON, its worker serving `/health` and `/metrics` on the returned address.
async fn observed_stack() -> (Stack, String) {
    let worker_addr = format!("127.0.0.1:{}", free_port().unwrap());
    let stack = Stack::start_with(vec![
        ("LOG_FORMAT", "json".into()),
        ("WORKER_HTTP_ADDR", worker_addr.clone()),
    ])
    .await
    .unwrap();
    // The stack is up once the API answers; the worker opens its own listener on its own time.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while tokio::net::TcpStream::connect(&worker_addr).await.is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "the worker never listened on {worker_addr}\n{}",
            stack.logs()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    (stack, format!("http://{worker_addr}"))
}

/// Every line a process wrote, each parsed as a JSON object (a line that is not one fails the test).
fn json_lines(stack: &Stack, log: &str) -> Vec<Value> {
    stack
        .log(log)
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            let value: Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{log}: not a JSON line ({e}): {line}"));
            assert!(value.is_object(), "{log}: {line}");
            value
        })
        .collect()
}

/// The value of `field` in the line's spans (innermost last), if any span has it.
fn span_field<'a>(line: &'a Value, field: &str) -> Option<&'a Value> {
    line["spans"]
        .as_array()?
        .iter()
        .rev()
        .find_map(|span| span.get(field))
}

fn lines_of_request<'a>(lines: &'a [Value], request_id: &str) -> Vec<&'a Value> {
    lines
        .iter()
        .filter(|l| span_field(l, "request_id").and_then(Value::as_str) == Some(request_id))
        .collect()
}

fn provision_body(ids: &(String, String)) -> Value {
    json!({"service_id": ids.0, "plan_id": ids.1, "organization_guid": "org", "space_guid": "space"})
}

async fn events(stack: &Stack, instance: &str, query: &str) -> (u16, Value) {
    stack
        .send(stack.request(
            Method::GET,
            &format!("/berth/v1/instances/{instance}/events{query}"),
        ))
        .await
        .unwrap()
}

#[tokio::test]
async fn a_requests_log_lines_join_its_tasks_and_the_audit_trail_records_who_asked() {
    let (stack, _) = observed_stack().await;
    let ids = plan_ids(&stack.catalog().await.unwrap(), "postgres", "shared");
    let instance = uuid::Uuid::new_v4().to_string();
    let path = format!("/v2/service_instances/{instance}");
    let request_id = format!("req-{}", uuid::Uuid::new_v4().simple());
    let identity = STANDARD.encode(br#"{"user_id":"u-42","email":"someone-private@example.com"}"#);

    // A provision with the platform's request id and originating identity: the id comes back.
    let response = stack
        .request(Method::PUT, &format!("{path}?accepts_incomplete=true"))
        .header("X-Broker-API-Request-Identity", &request_id)
        .header(
            "X-Broker-API-Originating-Identity",
            format!("cloudfoundry {identity}"),
        )
        .json(&provision_body(&ids))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    assert_eq!(
        response.headers()["x-broker-api-request-identity"],
        request_id.as_str()
    );
    let operation = response.json::<Value>().await.unwrap()["operation"]
        .as_str()
        .unwrap()
        .to_string();
    stack.wait_succeeded(&path, WAIT).await;

    // A bind without a request id gets one made up, echoed as well.
    let binding_path = format!("{path}/service_bindings/b1");
    let response = stack
        .request(
            Method::PUT,
            &format!("{binding_path}?accepts_incomplete=true"),
        )
        .json(&json!({"service_id": ids.0, "plan_id": ids.1}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let made_up = response.headers()["x-broker-api-request-identity"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(uuid::Uuid::parse_str(&made_up).is_ok(), "{made_up}");
    stack.wait_succeeded(&binding_path, WAIT).await;

    // The request's lines in the API's log: its id, route, instance and user (never the whole identity).
    let api = json_lines(&stack, "api.log");
    let request_lines = lines_of_request(&api, &request_id);
    assert!(!request_lines.is_empty(), "{}", stack.log("api.log"));
    let line = request_lines[0];
    assert_eq!(span_field(line, "instance_id"), Some(&json!(instance)));
    assert_eq!(
        span_field(line, "route"),
        Some(&json!("/v2/service_instances/{instance_id}"))
    );
    assert_eq!(span_field(line, "user"), Some(&json!("cloudfoundry/u-42")));

    // The worker's lines of the task the request wrote carry the same request id, joined on it.
    let worker = json_lines(&stack, "worker.log");
    let task_lines = lines_of_request(&worker, &request_id);
    assert!(!task_lines.is_empty(), "{}", stack.log("worker.log"));
    for line in &task_lines {
        assert_eq!(
            span_field(line, "task_id"),
            Some(&json!(operation)),
            "{line}"
        );
        assert_eq!(span_field(line, "kind"), Some(&json!("instance.provision")));
        assert_eq!(span_field(line, "instance_id"), Some(&json!(instance)));
        assert_eq!(span_field(line, "attempt"), Some(&json!(1)));
    }
    assert!(
        task_lines.iter().any(|l| l["message"] == "task succeeded"
            && span_field(l, "outcome") == Some(&json!("succeeded"))),
        "{task_lines:?}"
    );
    // The made-up id joins the bind's lines the same way.
    assert!(!lines_of_request(&worker, &made_up).is_empty());
    for log in ["api.log", "worker.log"] {
        assert!(
            !stack.log(log).contains("someone-private@example.com"),
            "{log} holds the originating identity's other fields"
        );
    }

    // The audit trail, newest first: the bind, then the provision with who asked and how it ended.
    let (status, trail) = events(&stack, &instance, "").await;
    assert_eq!(status, 200, "{trail}");
    let listed = trail["events"].as_array().unwrap();
    let actions: Vec<&str> = listed
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["bind", "provision"], "{trail}");
    let provision = &listed[1];
    assert_eq!(provision["request_id"], request_id.as_str());
    assert_eq!(provision["task_id"], operation.as_str());
    assert_eq!(
        provision["actor"],
        json!({"platform": "cloudfoundry", "user_id": "u-42"})
    );
    assert_eq!(provision["outcome"], "succeeded");
    assert!(provision["finished_at"].is_string(), "{provision}");
    assert_eq!(listed[0]["binding_id"], "b1");
    assert_eq!(listed[0]["request_id"], made_up.as_str());
    assert_eq!(listed[0]["actor"], Value::Null);
    assert!(trail.get("next").is_none(), "{trail}");

    // Paging: one a page, `next` leads on.
    let (_, first) = events(&stack, &instance, "?limit=1").await;
    assert_eq!(first["events"][0]["action"], "bind");
    let next = first["next"].as_i64().expect("a next page");
    let (_, second) = events(&stack, &instance, &format!("?limit=1&before={next}")).await;
    assert_eq!(second["events"][0]["action"], "provision");
    assert!(second.get("next").is_none(), "{second}");
    let (status, _) = events(&stack, &instance, "?limit=0").await;
    assert_eq!(status, 400);

    // The trail outlives the instance.
    stack.delete_until_done(&binding_path, &ids, WAIT).await;
    let (status, _) = stack.delete_until_done(&path, &ids, WAIT).await;
    assert_eq!(status, 410);
    let (status, trail) = events(&stack, &instance, "").await;
    assert_eq!(status, 200, "{trail}");
    let actions: Vec<&str> = trail["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["deprovision", "unbind", "bind", "provision"]);
    assert_eq!(trail["events"][0]["outcome"], "succeeded");

    // An instance berth never saw has no trail.
    let (status, body) = events(&stack, "never-provisioned", "").await;
    assert_eq!(status, 404, "{body}");
    stack.stop().await;
}

/// The `berth_*` metric names an expression text uses.
fn metric_names(text: &str) -> BTreeSet<String> {
    let re = regex::Regex::new(r"berth_[a-z0-9_]+").unwrap();
    re.find_iter(text).map(|m| m.as_str().to_string()).collect()
}

/// The series names a Prometheus text exposition declares: every family's `# TYPE` (a gauge read from the
/// database declares its family also while it has no rows, after a deprovision, say), with a histogram's
/// `_bucket`, `_sum` and `_count`, and the name of every sample.
fn exported_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        if let Some(declared) = line.strip_prefix("# TYPE ") {
            let mut parts = declared.split_whitespace();
            let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                continue;
            };
            names.insert(name.to_string());
            if kind == "histogram" {
                for suffix in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{suffix}"));
                }
            }
        } else if !line.starts_with('#') && !line.trim().is_empty() {
            let name = line.split(['{', ' ']).next().unwrap_or_default();
            names.insert(name.to_string());
        }
    }
    names
}

#[tokio::test]
async fn workers_serve_health_and_every_metric_the_alerts_and_dashboard_use_is_exported() {
    let (stack, worker_url) = observed_stack().await;
    let http = reqwest::Client::new();

    let health = http
        .get(format!("{worker_url}/health"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let health: Value = health.json().await.unwrap();
    assert_eq!(health["status"], "ok", "{health}");

    // Some traffic: a provision and a deprovision (tasks, claims, requests of several routes).
    let ids = plan_ids(&stack.catalog().await.unwrap(), "postgres", "shared");
    let path = format!("/v2/service_instances/{}", uuid::Uuid::new_v4());
    stack
        .put_until_done(&path, &provision_body(&ids), WAIT)
        .await;
    stack.delete_until_done(&path, &ids, WAIT).await;

    let api_text = stack
        .request(Method::GET, "/metrics")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let worker_text = http
        .get(format!("{worker_url}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    // The API's database gauges and its latency histogram side by side; the route is the pattern.
    assert!(api_text.contains("berth_tasks_pending"), "{api_text}");
    assert!(
        api_text.contains(
            r#"berth_http_request_duration_seconds_count{method="PUT",route="/v2/service_instances/{instance_id}",status="202"}"#
        ),
        "{api_text}"
    );
    assert!(
        worker_text.contains(
            r#"berth_task_duration_seconds_count{kind="instance.provision",outcome="succeeded"}"#
        ),
        "{worker_text}"
    );

    let exported: BTreeSet<String> = exported_names(&api_text)
        .into_iter()
        .chain(exported_names(&worker_text))
        .collect();
    let repo = repo_dir();
    for file in [
        "docs/prometheus/berth-alerts.yml",
        "docs/grafana/berth.json",
    ] {
        let used = metric_names(&std::fs::read_to_string(repo.join(file)).unwrap());
        assert!(!used.is_empty(), "{file} uses no berth metric");
        let missing: Vec<&String> = used.difference(&exported).collect();
        assert!(
            missing.is_empty(),
            "{file} uses metrics no process exports: {missing:?}\nexported: {exported:?}"
        );
    }
    stack.stop().await;
}
