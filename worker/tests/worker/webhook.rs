//! Webhooks: a finished operation POSTs a signed body without credentials; failures are retried.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use axum::{Router, extract::State, http::HeaderMap, http::StatusCode, routing::post};
use berth_worker::tasks;
use broker::{
    crypto,
    db::tasks::NewTask,
    model::{Operation, WebhookBody, kinds},
};
use serde_json::json;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::helpers::*;

pub const SECRET: &[u8] = b"webhook-secret";

/// Headers and body of one request the receiver got.
pub type Request = (HeaderMap, Vec<u8>);

#[derive(Clone, Default)]
pub struct Receiver {
    /// Answers 500 to this many requests first.
    pub fail_first: usize,
    pub received: Arc<Mutex<Vec<Request>>>,
}

async fn receive(
    State(receiver): State<Receiver>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> StatusCode {
    let mut received = receiver.received.lock().unwrap();
    received.push((headers, body.to_vec()));
    if received.len() <= receiver.fail_first {
        StatusCode::INTERNAL_SERVER_ERROR
    } else {
        StatusCode::NO_CONTENT
    }
}

pub async fn start(receiver: Receiver) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Router::new()
        .route("/hook", post(receive))
        .with_state(receiver);
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

fn operation_task(url: String) -> NewTask {
    let mut task = NewTask::new(kinds::NOOP, json!({}));
    task.instance_id = Some("instance-1".into());
    task.operation = Some(Operation::Provision);
    task.webhook = Some((url, cipher().seal(SECRET)));
    task
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn a_finished_operation_posts_a_signed_webhook(_: PgPoolOptions, opts: PgConnectOptions) {
    let pool = pool(&opts, 8).await;
    let receiver = Receiver::default();
    let addr = start(receiver.clone()).await;
    let id = enqueue_with(&pool, operation_task(format!("http://{addr}/hook"))).await;
    drain(&pool, services(), tasks::registry(), config("w")).await;

    let received = receiver.received.lock().unwrap().clone();
    assert_eq!(received.len(), 1);
    let (headers, body) = &received[0];
    assert_eq!(headers["content-type"], "application/json");
    let signature = headers["x-osb-signature"].to_str().unwrap();
    assert!(crypto::constant_time_eq(
        signature.as_bytes(),
        crypto::sign(SECRET, body).as_bytes()
    ));
    let body: WebhookBody = serde_json::from_slice(body).unwrap();
    assert_eq!(body.instance_id, "instance-1");
    assert_eq!(body.operation, id.to_string());
    assert_eq!(body.state, "succeeded");
    let text = String::from_utf8_lossy(&received[0].1).to_lowercase();
    for secret in ["password", "database_url", "postgres://", "webhook-secret"] {
        assert!(!text.contains(secret), "the webhook body carries {secret}");
    }

    let (state, attempts, status): (String, i32, Option<i32>) = sqlx::query_as(
        "SELECT state, attempts, last_status FROM webhook_deliveries WHERE task_id = $1",
    )
    .bind(id.0)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        (state.as_str(), attempts, status),
        ("delivered", 1, Some(204))
    );
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn a_failing_receiver_is_retried(_: PgPoolOptions, opts: PgConnectOptions) {
    let pool = pool(&opts, 8).await;
    let receiver = Receiver {
        fail_first: 1,
        ..Default::default()
    };
    let addr = start(receiver.clone()).await;
    let id = enqueue_with(&pool, operation_task(format!("http://{addr}/hook"))).await;
    drain(&pool, services(), tasks::registry(), config("w")).await;

    let received = receiver.received.lock().unwrap().clone();
    assert_eq!(received.len(), 2);
    assert_eq!(
        received[0].1, received[1].1,
        "the retry sends the same body"
    );
    let (state, attempts, status): (String, i32, Option<i32>) = sqlx::query_as(
        "SELECT state, attempts, last_status FROM webhook_deliveries WHERE task_id = $1",
    )
    .bind(id.0)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        (state.as_str(), attempts, status),
        ("delivered", 2, Some(204))
    );
    let (kind_state, task_attempts): (String, i32) =
        sqlx::query_as("SELECT state, attempts FROM tasks WHERE kind = 'webhook.deliver'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!((kind_state.as_str(), task_attempts), ("succeeded", 2));
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn a_receiver_that_never_answers_2xx_ends_failed(_: PgPoolOptions, opts: PgConnectOptions) {
    let pool = pool(&opts, 8).await;
    let receiver = Receiver {
        fail_first: usize::MAX,
        ..Default::default()
    };
    let addr = start(receiver.clone()).await;
    enqueue_with(&pool, operation_task(format!("http://{addr}/hook"))).await;
    drain(&pool, services(), tasks::registry(), config("w")).await;

    assert_eq!(receiver.received.lock().unwrap().len(), 8);
    let (state, attempts): (String, i32) =
        sqlx::query_as("SELECT state, attempts FROM webhook_deliveries")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!((state.as_str(), attempts), ("failed", 8));
}

/// A binding's operation that fails: the webhook says `failed`, names the binding and carries the error as its
/// description (and still no secret).
#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn a_failed_binding_operation_posts_failed_with_the_binding(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let pool = pool(&opts, 8).await;
    let receiver = Receiver::default();
    let addr = start(receiver.clone()).await;
    let mut task = operation_task(format!("http://{addr}/hook"));
    task.kind = "test.no_such_kind";
    task.binding_id = Some("binding-1".into());
    task.operation = Some(Operation::Bind);
    let id = enqueue_with(&pool, task).await;
    drain(&pool, services(), tasks::registry(), config("w")).await;

    assert_eq!(task_state(&pool, id).await, "failed");
    let received = receiver.received.lock().unwrap().clone();
    assert_eq!(received.len(), 1);
    let (headers, raw) = &received[0];
    assert_eq!(
        headers["x-osb-signature"].to_str().unwrap(),
        crypto::sign(SECRET, raw)
    );
    let body: WebhookBody = serde_json::from_slice(raw).unwrap();
    assert_eq!(body.instance_id, "instance-1");
    assert_eq!(body.binding_id.as_deref(), Some("binding-1"));
    assert_eq!(body.operation, id.to_string());
    assert_eq!(body.state, "failed");
    assert!(
        body.description.contains("test.no_such_kind"),
        "{}",
        body.description
    );
    assert!(!String::from_utf8_lossy(raw).contains("webhook-secret"));
}

async fn task_state(pool: &sqlx::PgPool, id: broker::model::TaskId) -> broker::model::TaskState {
    task(pool, id).await.state
}

fn services_allowing_loopback(allow: bool) -> std::sync::Arc<berth_worker::Services> {
    let mut settings = settings();
    settings.webhook_allow_loopback = allow;
    std::sync::Arc::new(berth_worker::Services::new(settings, cipher()).unwrap())
}

async fn delivery(pool: &sqlx::PgPool) -> (String, i32, Option<String>) {
    sqlx::query_as("SELECT state, attempts, last_error FROM webhook_deliveries")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// The worker checks the target again after resolving it: a name that resolves to loopback is refused
/// unless loopback is allowed (the delivery fails at once, saying why, without calling anything).
#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn a_name_resolving_to_loopback_is_delivered_only_when_allowed(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let pool = pool(&opts, 8).await;
    let receiver = Receiver::default();
    let addr = start(receiver.clone()).await;
    // `localhost`, and this machine's own name where it resolves to loopback only (a name no rule knows).
    let mut names = vec!["localhost".to_string()];
    let own = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap_or_default()
        .trim()
        .to_string();
    let resolved: Vec<_> = match tokio::net::lookup_host((own.as_str(), 80)).await {
        Ok(addresses) => addresses.collect(),
        Err(_) => vec![],
    };
    if own != "localhost" && !resolved.is_empty() && resolved.iter().all(|a| a.ip().is_loopback()) {
        names.push(own);
    }
    names.push("127.0.0.1".into());
    for name in &names {
        sqlx::query("TRUNCATE webhook_deliveries, tasks")
            .execute(&pool)
            .await
            .unwrap();
        let url = format!("http://{name}:{}/hook?token=t0ken", addr.port());
        enqueue_with(&pool, operation_task(url.clone())).await;
        drain(
            &pool,
            services_allowing_loopback(false),
            tasks::registry(),
            config("w"),
        )
        .await;
        let (state, attempts, error) = delivery(&pool).await;
        let error = error.unwrap_or_default();
        assert_eq!((state.as_str(), attempts), ("failed", 1), "{name}: {error}");
        assert!(
            error.contains("is refused") && error.contains("WEBHOOK_ALLOW_LOOPBACK"),
            "{name}: {error}"
        );
        assert!(
            !error.contains("t0ken") && !error.contains("webhook-secret"),
            "{error}"
        );
        assert!(
            receiver.received.lock().unwrap().is_empty(),
            "{name} was called"
        );

        sqlx::query("TRUNCATE webhook_deliveries, tasks")
            .execute(&pool)
            .await
            .unwrap();
        enqueue_with(&pool, operation_task(url)).await;
        drain(
            &pool,
            services_allowing_loopback(true),
            tasks::registry(),
            config("w"),
        )
        .await;
        assert_eq!(delivery(&pool).await.0, "delivered", "{name}");
        assert_eq!(receiver.received.lock().unwrap().len(), 1, "{name}");
        receiver.received.lock().unwrap().clear();
    }
}

/// A redirect is not followed (it could point anywhere): the attempt fails with the 3xx.
#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn redirects_are_not_followed(_: PgPoolOptions, opts: PgConnectOptions) {
    let pool = pool(&opts, 8).await;
    let receiver = Receiver::default();
    let target = start(receiver.clone()).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let redirector = listener.local_addr().unwrap();
    let location = format!("http://{target}/hook");
    let app = Router::new().route(
        "/hook",
        post(move || async move { (StatusCode::TEMPORARY_REDIRECT, [("location", location)]) }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let mut task = operation_task(format!("http://{redirector}/hook"));
    task.max_attempts = 1;
    enqueue_with(&pool, task).await;
    drain(&pool, services(), tasks::registry(), config("w")).await;
    let (state, _, error) = delivery(&pool).await;
    assert_eq!(state, "failed");
    assert!(error.unwrap_or_default().contains("307"));
    assert!(
        receiver.received.lock().unwrap().is_empty(),
        "the redirect was followed"
    );
}
