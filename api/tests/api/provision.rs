use axum::{
    body::Body,
    http::{Method, StatusCode},
};
use base64::{Engine, engine::general_purpose::STANDARD};
use broker::model::kinds;
use serde_json::{Value, json};
use sqlx::{PgPool, Row};

use crate::{
    assert_unchanged,
    helpers::{MAX_BODY, TestApp, provision_body},
};

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn new_instance_is_202_with_row_and_one_task(pool: PgPool) {
    let app = TestApp::new(pool);
    let identity = format!("cloudfoundry {}", STANDARD.encode(br#"{"user_id":"u-1"}"#));
    let request = TestApp::request(
        Method::PUT,
        "/v2/service_instances/i-1?accepts_incomplete=true",
    )
    .header("content-type", "application/json")
    .header("x-broker-api-originating-identity", identity)
    .body(Body::from(provision_body().to_string()))
    .unwrap();
    let res = app.send(request).await;
    let op = res.operation();
    assert_eq!(app.counts().await, (1, 0, 1));

    let task = app.task(&op).await;
    assert_eq!(task.get::<String, _>("kind"), kinds::PROVISION);
    assert_eq!(
        task.get::<Option<String>, _>("operation").as_deref(),
        Some("provision")
    );
    assert_eq!(
        task.get::<Option<String>, _>("instance_id").as_deref(),
        Some("i-1")
    );
    assert_eq!(task.get::<Option<String>, _>("binding_id"), None);
    assert_eq!(task.get::<Value, _>("payload"), json!({}));
    assert_eq!(task.get::<i32, _>("max_attempts"), 10);
    assert_eq!(
        task.get::<Option<Value>, _>("originating_identity"),
        Some(json!({"platform": "cloudfoundry", "value": {"user_id": "u-1"}}))
    );

    let row = sqlx::query("SELECT * FROM service_instances WHERE id = 'i-1'")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(row.get::<String, _>("organization_guid"), "org-1");
    assert_eq!(
        row.get::<Value, _>("parameters"),
        json!({"extensions": ["citext"]})
    );
    assert_eq!(
        row.get::<Value, _>("context"),
        json!({"platform": "cloudfoundry"})
    );
    assert_eq!(
        row.get::<Option<String>, _>("maintenance_version")
            .as_deref(),
        Some("1.0.0")
    );
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn without_accepts_incomplete_is_422_async_required(pool: PgPool) {
    let app = TestApp::new(pool);
    // A plan the catalog does not mark synchronous (`dedicated`; `shared` is: tests/api/synchronous.rs).
    let mut body = provision_body();
    body["plan_id"] = json!("5f0c2d8e-9b41-4c7a-a6e3-2d7f1b8c4e90");
    body["parameters"] = json!({});
    assert_unchanged!(app, {
        for uri in [
            "/v2/service_instances/i-1",
            "/v2/service_instances/i-1?accepts_incomplete=false",
        ] {
            app.call(Method::PUT, uri, Some(&body))
                .await
                .assert_osb_error(StatusCode::UNPROCESSABLE_ENTITY, Some("AsyncRequired"));
        }
    });
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn missing_or_empty_guids_are_400(pool: PgPool) {
    let app = TestApp::new(pool);
    for field in ["organization_guid", "space_guid", "service_id", "plan_id"] {
        let mut body = provision_body();
        body.as_object_mut().unwrap().remove(field);
        let description = assert_unchanged!(app, app.provision("i-1", &body).await)
            .assert_osb_error(StatusCode::BAD_REQUEST, None);
        assert!(description.contains(field), "{description}");
    }
    // OSB: organization_guid and space_guid MUST be non-empty strings.
    for field in ["organization_guid", "space_guid"] {
        let mut body = provision_body();
        body[field] = json!("");
        let description = assert_unchanged!(app, app.provision("i-1", &body).await)
            .assert_osb_error(StatusCode::BAD_REQUEST, None);
        assert!(description.contains(field), "{description}");
    }
    app.provision("i-1", &provision_body()).await.operation();
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn unknown_service_or_plan_is_400(pool: PgPool) {
    let app = TestApp::new(pool);
    let mut body = provision_body();
    body["service_id"] = json!("nope");
    let d = assert_unchanged!(app, app.provision("i-1", &body).await)
        .assert_osb_error(StatusCode::BAD_REQUEST, None);
    assert!(d.contains("service_id"), "{d}");
    let mut body = provision_body();
    body["plan_id"] = json!("nope");
    let d = assert_unchanged!(app, app.provision("i-1", &body).await)
        .assert_osb_error(StatusCode::BAD_REQUEST, None);
    assert!(d.contains("plan_id"), "{d}");
    // A plan of another service.
    let mut body = provision_body();
    body["plan_id"] = json!(crate::helpers::T_SMALL);
    assert_unchanged!(app, app.provision("i-1", &body).await)
        .assert_osb_error(StatusCode::BAD_REQUEST, None);
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn parameters_are_checked_against_the_plan_schema(pool: PgPool) {
    let app = TestApp::new(pool);
    let mut body = provision_body();
    body["parameters"] = json!({"extensions": ["nope"]});
    let d = assert_unchanged!(app, app.provision("i-1", &body).await)
        .assert_osb_error(StatusCode::BAD_REQUEST, None);
    assert!(d.contains("extensions"), "{d}");

    body["parameters"] = json!({"unknown_knob": 1});
    assert_unchanged!(app, app.provision("i-1", &body).await)
        .assert_osb_error(StatusCode::BAD_REQUEST, None);

    body["parameters"] = json!(["not", "an", "object"]);
    let d = assert_unchanged!(app, app.provision("i-1", &body).await)
        .assert_osb_error(StatusCode::BAD_REQUEST, None);
    assert!(d.contains("parameters"), "{d}");
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn maintenance_info_must_match_the_plan(pool: PgPool) {
    let app = TestApp::new(pool);
    let mut body = provision_body();
    body["maintenance_info"] = json!({"version": "0.9.0"});
    assert_unchanged!(app, app.provision("i-1", &body).await).assert_osb_error(
        StatusCode::UNPROCESSABLE_ENTITY,
        Some("MaintenanceInfoConflict"),
    );
    body["maintenance_info"] = json!({"version": "1.0.0"});
    app.provision("i-1", &body).await.operation();
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn bad_bodies_are_osb_shaped_4xx(pool: PgPool) {
    let app = TestApp::new(pool);
    let uri = "/v2/service_instances/i-1?accepts_incomplete=true";
    let send = |content_type: &'static str, body: Vec<u8>| {
        TestApp::request(Method::PUT, uri)
            .header("content-type", content_type)
            .body(Body::from(body))
            .unwrap()
    };
    assert_unchanged!(app, {
        let d = app
            .send(send("application/json", b"{\"service_id\": ".to_vec()))
            .await
            .assert_osb_error(StatusCode::BAD_REQUEST, None);
        assert!(d.contains("JSON"), "{d}");
        app.send(send("application/json", Vec::new()))
            .await
            .assert_osb_error(StatusCode::BAD_REQUEST, None);
        app.send(send("application/json", b"[1,2]".to_vec()))
            .await
            .assert_osb_error(StatusCode::BAD_REQUEST, None);
        app.send(send("application/json", b"{} trailing".to_vec()))
            .await
            .assert_osb_error(StatusCode::BAD_REQUEST, None);

        let mut body = provision_body();
        body["space_guid"] = json!(42);
        let d = app
            .provision("i-1", &body)
            .await
            .assert_osb_error(StatusCode::BAD_REQUEST, None);
        assert!(d.contains("space_guid"), "{d}");
        let mut body = provision_body();
        body["context"] = json!("cf");
        app.provision("i-1", &body)
            .await
            .assert_osb_error(StatusCode::BAD_REQUEST, None);

        let mut big = provision_body();
        big["parameters"] = json!({"extensions": ["x".repeat(MAX_BODY)]});
        app.send(send("application/json", big.to_string().into_bytes()))
            .await
            .assert_osb_error(StatusCode::PAYLOAD_TOO_LARGE, Some("PayloadTooLarge"));

        app.send(send(
            "text/plain",
            provision_body().to_string().into_bytes(),
        ))
        .await
        .assert_osb_error(StatusCode::UNSUPPORTED_MEDIA_TYPE, None);
    });
    // Unknown fields are ignored; a missing Content-Type is accepted.
    let mut body = provision_body();
    body["some_future_field"] = json!({"x": 1});
    let request = TestApp::request(Method::PUT, uri)
        .body(Body::from(body.to_string()))
        .unwrap();
    app.send(request).await.operation();
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn repeating_a_provision_follows_its_task(pool: PgPool) {
    let app = TestApp::new(pool);
    let first = app.provision("i-1", &provision_body()).await.operation();
    // In progress: the same operation.
    assert_eq!(
        app.provision("i-1", &provision_body()).await.operation(),
        first
    );
    app.set_running(&first, Some("creating database")).await;
    assert_eq!(
        app.provision("i-1", &provision_body()).await.operation(),
        first
    );
    assert_eq!(app.counts().await, (1, 0, 1));

    // Failed: a fresh provision task.
    app.finish(&first, "failed", Some("server unreachable"))
        .await;
    let second = app.provision("i-1", &provision_body()).await.operation();
    assert_ne!(second, first);
    assert_eq!(app.counts().await, (1, 0, 2));

    // Succeeded: 200 {}.
    app.finish(&second, "succeeded", None).await;
    let res = assert_unchanged!(app, app.provision("i-1", &provision_body()).await);
    assert_eq!(res.status, StatusCode::OK);
    assert_eq!(res.body, json!({}));
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn different_attributes_are_409(pool: PgPool) {
    let app = TestApp::new(pool);
    app.provision("i-1", &provision_body()).await.operation();
    for (field, value) in [
        ("space_guid", json!("space-2")),
        ("organization_guid", json!("org-2")),
        ("parameters", json!({"extensions": ["hstore"]})),
    ] {
        let mut body = provision_body();
        body[field] = value;
        assert_unchanged!(app, app.provision("i-1", &body).await)
            .assert_osb_error(StatusCode::CONFLICT, None);
    }
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn provision_during_deprovision_is_422_concurrency(pool: PgPool) {
    let app = TestApp::new(pool);
    app.provisioned("i-1").await;
    app.deprovision("i-1").await.operation();
    assert_unchanged!(app, app.provision("i-1", &provision_body()).await)
        .assert_osb_error(StatusCode::UNPROCESSABLE_ENTITY, Some("ConcurrencyError"));
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn concurrent_identical_provisions_make_one_task(pool: PgPool) {
    let app = TestApp::new(pool);
    let body = provision_body();
    let results = futures_join(&app, &body).await;
    let ops: std::collections::HashSet<String> = results.iter().map(|r| r.operation()).collect();
    assert_eq!(ops.len(), 1, "{results:?}");
    assert_eq!(app.counts().await, (1, 0, 1));
}

async fn futures_join(app: &TestApp, body: &Value) -> Vec<crate::helpers::TestResponse> {
    let (a, b, c, d) = tokio::join!(
        app.provision("i-1", body),
        app.provision("i-1", body),
        app.provision("i-1", body),
        app.provision("i-1", body),
    );
    vec![a, b, c, d]
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn webhook_is_stripped_from_parameters_and_sealed_on_the_task(pool: PgPool) {
    let app = TestApp::new(pool);
    let mut body = provision_body();
    body["parameters"]["webhook"] =
        json!({"url": "https://hooks.example/berth", "secret": "s3cret"});
    let op = app.provision("i-1", &body).await.operation();
    let task = app.task(&op).await;
    assert_eq!(
        task.get::<Option<String>, _>("webhook_url").as_deref(),
        Some("https://hooks.example/berth")
    );
    let sealed: Vec<u8> = task.get("webhook_secret");
    assert_eq!(app.cipher.open(&sealed).unwrap(), b"s3cret");
    let params: Value =
        sqlx::query_scalar("SELECT parameters FROM service_instances WHERE id = 'i-1'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(params, json!({"extensions": ["citext"]}));
    // The same request again (webhook included) is identical.
    assert_eq!(app.provision("i-1", &body).await.operation(), op);

    // Akkeris query form.
    let uri = "/v2/service_instances/i-2?accepts_incomplete=true&webhook=http%3A%2F%2Fh.example%2Fx&secret=abc";
    let op = app
        .call(Method::PUT, uri, Some(&provision_body()))
        .await
        .operation();
    let task = app.task(&op).await;
    assert_eq!(
        task.get::<Option<String>, _>("webhook_url").as_deref(),
        Some("http://h.example/x")
    );
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn bad_webhooks_are_400(pool: PgPool) {
    let app = TestApp::new(pool);
    assert_unchanged!(app, {
        let mut body = provision_body();
        body["parameters"]["webhook"] = json!({"url": "ftp://hooks.example", "secret": "s"});
        app.provision("i-1", &body)
            .await
            .assert_osb_error(StatusCode::BAD_REQUEST, None);
        body["parameters"]["webhook"] = json!({"url": "https://hooks.example", "secret": ""});
        app.provision("i-1", &body)
            .await
            .assert_osb_error(StatusCode::BAD_REQUEST, None);
        for query in [
            "webhook=ftp%3A%2F%2Fx&secret=s",
            "webhook=https%3A%2F%2Fx&secret=",
            "webhook=https%3A%2F%2Fx",
        ] {
            let uri = format!("/v2/service_instances/i-1?accepts_incomplete=true&{query}");
            app.call(Method::PUT, &uri, Some(&provision_body()))
                .await
                .assert_osb_error(StatusCode::BAD_REQUEST, None);
        }
    });
}

/// Webhook targets: metadata and link-local always refused, loopback only when allowed, the allow-list
/// narrows the rest; a refused target is a 400 naming it, and nothing is written.
#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn webhooks_to_forbidden_targets_are_400(pool: PgPool) {
    let policy =
        broker::webhook_target::TargetPolicy::new(false, Some("hooks.example,10.20.0.0/16"))
            .unwrap();
    let app = TestApp::with_webhook_targets(pool, policy);
    let with_hook = |url: &str| {
        let mut body = provision_body();
        body["parameters"]["webhook"] = json!({"url": url, "secret": "s"});
        body
    };
    assert_unchanged!(app, {
        for (url, host) in [
            (
                "http://169.254.169.254/latest/meta-data/iam",
                "169.254.169.254",
            ),
            ("http://[fd00:ec2::254]/latest", "fd00:ec2::254"),
            (
                "http://metadata.google.internal/computeMetadata/v1/",
                "metadata.google.internal",
            ),
            ("http://169.254.10.1/hook", "169.254.10.1"),
            ("http://[fe80::1]/hook", "fe80::1"),
            ("http://[::ffff:169.254.169.254]/", "::ffff:169.254.169.254"),
            ("http://0.0.0.0:8080/hook", "0.0.0.0"),
            ("http://127.0.0.1:8080/hook", "127.0.0.1"),
            ("http://localhost:8080/hook", "localhost"),
            ("http://[::1]/hook", "::1"),
            ("https://10.30.0.1/hook", "10.30.0.1"),
            ("https://203.0.113.7/hook", "203.0.113.7"),
        ] {
            let description = app
                .provision("i-1", &with_hook(url))
                .await
                .assert_osb_error(StatusCode::BAD_REQUEST, None);
            assert!(
                description.contains(&format!("webhook target {host} is refused")),
                "{url}: {description}"
            );
            assert!(
                !description.contains("/latest") && !description.contains("/hook"),
                "{description}"
            );
        }
        // The query form too.
        let uri = "/v2/service_instances/i-1?accepts_incomplete=true&webhook=http%3A%2F%2F169.254.169.254%2F&secret=s";
        app.call(Method::PUT, uri, Some(&provision_body()))
            .await
            .assert_osb_error(StatusCode::BAD_REQUEST, None);
    });
    // On the list (by name or network), and names that may resolve into a listed network: accepted.
    for (id, url) in [
        ("i-1", "https://hooks.example/berth"),
        ("i-2", "http://10.20.3.4:8080/hook"),
        ("i-3", "https://elsewhere.example/hook"),
    ] {
        let op = app.provision(id, &with_hook(url)).await.operation();
        let task = app.task(&op).await;
        assert_eq!(
            task.get::<Option<String>, _>("webhook_url").as_deref(),
            Some(url)
        );
    }
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn loopback_webhooks_are_accepted_when_allowed(pool: PgPool) {
    let app = TestApp::new(pool);
    let mut body = provision_body();
    body["parameters"]["webhook"] = json!({"url": "http://127.0.0.1:9/hook", "secret": "s"});
    app.provision("i-1", &body).await.operation();
    body["parameters"]["webhook"] = json!({"url": "http://169.254.169.254/", "secret": "s"});
    app.provision("i-2", &body)
        .await
        .assert_osb_error(StatusCode::BAD_REQUEST, None);
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn a_garbled_originating_identity_is_kept_raw(pool: PgPool) {
    let app = TestApp::new(pool);
    let request = TestApp::request(
        Method::PUT,
        "/v2/service_instances/i-1?accepts_incomplete=true",
    )
    .header("content-type", "application/json")
    .header(
        "x-broker-api-originating-identity",
        "kubernetes %%%not-base64",
    )
    .body(Body::from(provision_body().to_string()))
    .unwrap();
    let op = app.send(request).await.operation();
    assert_eq!(
        app.task(&op)
            .await
            .get::<Option<Value>, _>("originating_identity"),
        Some(json!({"platform": "kubernetes", "raw": "%%%not-base64"}))
    );
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn provision_after_a_failed_deprovision_is_409(pool: PgPool) {
    let app = TestApp::new(pool);
    app.provisioned("i-1").await;
    let op = app.deprovision("i-1").await.operation();
    app.finish(&op, "failed", Some("drop failed")).await;
    assert_unchanged!(app, app.provision("i-1", &provision_body()).await)
        .assert_osb_error(StatusCode::CONFLICT, None);
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn a_provisioned_instance_with_a_bind_running_is_still_200(pool: PgPool) {
    let app = TestApp::new(pool);
    app.provisioned("i-1").await;
    app.bind("i-1", "b-1", &crate::helpers::bind_body())
        .await
        .operation();
    assert_eq!(
        app.provision("i-1", &provision_body()).await.status,
        StatusCode::OK
    );
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn many_concurrent_provisions_are_batched_and_each_answered(pool: PgPool) {
    let app = TestApp::new(pool);
    app.provisioned("taken").await;
    let mut other = provision_body();
    other["parameters"] = json!({"extensions": ["hstore"]});
    // 150 new ids, each sent twice at once, and a conflicting request for an existing id, all in flight together.
    let ids: Vec<String> = (0..150).map(|i| format!("batch-{i}")).collect();
    let body = provision_body();
    let (responses, conflict) = tokio::join!(
        futures_util::future::join_all(
            ids.iter()
                .chain(ids.iter())
                .map(|id| app.provision(id, &body))
        ),
        app.provision("taken", &other),
    );
    conflict.assert_osb_error(StatusCode::CONFLICT, None);
    let mut by_id: std::collections::HashMap<&str, std::collections::HashSet<String>> =
        Default::default();
    for (id, response) in ids.iter().chain(ids.iter()).zip(&responses) {
        by_id
            .entry(id.as_str())
            .or_default()
            .insert(response.operation());
    }
    for (id, operations) in &by_id {
        assert_eq!(
            operations.len(),
            1,
            "both requests for {id} name one operation: {operations:?}"
        );
        let op = operations.iter().next().unwrap();
        let task = app.task(op).await;
        assert_eq!(
            task.get::<Option<String>, _>("instance_id").as_deref(),
            Some(*id)
        );
        assert_eq!(
            task.get::<Option<String>, _>("operation").as_deref(),
            Some("provision")
        );
    }
    // The 150 new instances and the provisioned one; one task each, nothing else.
    assert_eq!(app.counts().await, (151, 0, 151));
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn a_failing_batch_is_retried_one_request_at_a_time(pool: PgPool) {
    use berth_api::provision_batch::ProvisionBatcher;
    use broker::db::{instances::NewInstance, tasks::NewTask};
    let batcher = ProvisionBatcher::start(pool.clone(), 1);
    let (context, parameters) = (json!({}), json!({}));
    let ids: Vec<String> = (0..20).map(|i| format!("b-{i}")).collect();
    let news: Vec<NewInstance<'_>> = ids
        .iter()
        .map(|id| NewInstance {
            id,
            service_id: "svc",
            plan_id: "plan",
            organization_guid: "o",
            space_guid: "s",
            context: &context,
            parameters: &parameters,
            maintenance_version: None,
        })
        .collect();
    let results = futures_util::future::join_all(news.iter().enumerate().map(|(i, new)| {
        let mut task = NewTask::new("instance.provision", json!({}));
        task.instance_id = Some(new.id.to_string());
        task.operation = Some(broker::model::Operation::Provision);
        // One row breaks a CHECK constraint: its batch fails as a whole.
        if i == 7 {
            task.max_attempts = 0;
        }
        batcher.insert(new, task)
    }))
    .await;
    for (i, result) in results.iter().enumerate() {
        if i == 7 {
            assert!(result.is_err(), "the bad row fails alone: {result:?}");
        } else {
            assert!(
                matches!(result, Ok(Some(_))),
                "row {i} is written: {result:?}"
            );
        }
    }
    let instances: i64 = sqlx::query_scalar("SELECT count(*) FROM service_instances")
        .fetch_one(&pool)
        .await
        .unwrap();
    let tasks: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks")
        .fetch_one(&pool)
        .await
        .unwrap();
    // The bad request's statement (instance and task together) rolled back as one.
    assert_eq!((instances, tasks), (19, 19));
}
