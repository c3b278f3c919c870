use axum::{
    body::Body,
    http::{Method, Request, StatusCode},
};
use broker::model::kinds;
use sqlx::PgPool;

use crate::helpers::TestApp;

/// The value of the sample `name{labels}` (or bare `name`) in a text-format body.
fn sample(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .map(|v| v.parse().unwrap())
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn metrics_report_the_queue_instances_and_responses(pool: PgPool) {
    let app = TestApp::new(pool);
    app.provisioned("i-1").await;
    app.provisioned("i-2").await;
    let running = app
        .provision("i-3", &crate::helpers::provision_body())
        .await
        .operation();
    app.set_running(&running, None).await;
    app.provision("i-4", &crate::helpers::provision_body())
        .await
        .operation();
    // A running task whose worker has gone (lease in the past), and a pending one due later.
    sqlx::query("UPDATE tasks SET lease_until = now() - interval '1 minute' WHERE id = $1::uuid")
        .bind(&running)
        .execute(&app.pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO tasks (id, kind, run_at) VALUES (gen_random_uuid(), 'noop', now() + interval '1 hour')")
        .execute(&app.pool)
        .await
        .unwrap();
    // A 400 to count.
    app.provision("i-5", &serde_json::json!({}))
        .await
        .assert_osb_error(StatusCode::BAD_REQUEST, None);

    let res = app.call(Method::GET, "/metrics", None).await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.text);
    assert_eq!(
        res.headers["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let body = &res.text;
    let provision = format!("{{kind=\"{}\"}}", kinds::PROVISION);
    for (series, expected) in [
        (format!("berth_tasks_pending{provision}"), 1.0),
        (format!("berth_tasks_due{provision}"), 1.0),
        (format!("berth_tasks_running{provision}"), 1.0),
        (format!("berth_tasks_lease_expired{provision}"), 1.0),
        ("berth_tasks_pending{kind=\"noop\"}".into(), 1.0),
        // Due in an hour.
        ("berth_tasks_due{kind=\"noop\"}".into(), 0.0),
        (
            "berth_service_instances{service=\"postgres\",plan=\"shared\"}".into(),
            4.0,
        ),
        ("berth_http_responses_total{code=\"4xx\"}".into(), 1.0),
        ("berth_http_responses_total{code=\"5xx\"}".into(), 0.0),
    ] {
        assert_eq!(sample(body, &series), Some(expected), "{series}: {body}");
    }
    assert!(
        sample(body, "berth_task_oldest_due_seconds").is_some_and(|s| s >= 0.0),
        "{body}"
    );
    assert!(
        sample(body, "berth_http_responses_total{code=\"2xx\"}").is_some_and(|n| n >= 4.0),
        "{body}"
    );
    for line in body.lines().filter(|l| !l.starts_with('#')) {
        let (_, value) = line.rsplit_once(' ').unwrap();
        assert!(
            value.parse::<f64>().is_ok(),
            "every sample ends in a number: {line}"
        );
    }

    // The broker's credentials are required.
    let res = app
        .send(Request::get("/metrics").body(Body::empty()).unwrap())
        .await;
    assert_eq!(res.status, StatusCode::UNAUTHORIZED);
}
