use std::time::Duration;

use berth_tests::{ReceivedWebhook, Stack, WebhookReceiver, plan_ids};
use reqwest::Method;
use serde_json::{Value, json};
use sqlx::{Connection, PgConnection};

const WAIT: Duration = Duration::from_secs(60);

async fn bind(
    stack: &Stack,
    instance: &str,
    binding: &str,
    ids: &(String, String),
    params: Value,
) -> Value {
    let path = format!("/v2/service_instances/{instance}/service_bindings/{binding}");
    let body = json!({
        "service_id": ids.0, "plan_id": ids.1, "app_guid": "app-1", "parameters": params,
    });
    stack.put_until_done(&path, &body, WAIT).await;
    stack.fetch_credentials(&path).await
}

/// Every row of every table of the stack's broker database, as text (bytea as hex).
async fn broker_database_text(stack: &Stack) -> String {
    let mut conn = PgConnection::connect(&stack.broker_db_url).await.unwrap();
    let tables: Vec<String> =
        sqlx::query_scalar("SELECT tablename::text FROM pg_tables WHERE schemaname = 'public'")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    assert!(tables.iter().any(|t| t == "service_bindings"), "{tables:?}");
    let mut all = String::new();
    for table in tables {
        let rows: String = sqlx::query_scalar(&format!(
            "SELECT coalesce(string_agg(t::text, '\n'), '') FROM \"{table}\" t"
        ))
        .fetch_one(&mut conn)
        .await
        .unwrap();
        all.push_str(&rows);
    }
    conn.close().await.unwrap();
    all
}

#[tokio::test]
async fn shared_database_from_provision_to_deprovision() {
    let stack = Stack::start().await.unwrap();
    let mut hooks = WebhookReceiver::start().await.unwrap();
    let ids = plan_ids(&stack.catalog().await.unwrap(), "postgres", "shared");
    let instance = uuid::Uuid::new_v4().to_string();
    let secret = "webhook-secret-e2e";

    // Provision, with an extension and a webhook.
    let (status, body) = stack
        .send(
            stack.request(Method::PUT, &format!("/v2/service_instances/{instance}?accepts_incomplete=true")).json(
                &json!({
                    "service_id": ids.0, "plan_id": ids.1, "organization_guid": "org", "space_guid": "space",
                    "parameters": {"extensions": ["citext"], "webhook": {"url": hooks.url, "secret": secret}},
                }),
            ),
        )
        .await
        .unwrap();
    assert_eq!(status, 202, "{body}");
    let operation = body["operation"].as_str().expect("operation").to_string();
    stack
        .wait_succeeded(&format!("/v2/service_instances/{instance}"), WAIT)
        .await;

    // The webhook arrives signed, and says what happened without any credentials.
    let hook = hooks.next(WAIT).await.unwrap();
    assert_signed_instance_webhook(&hook, secret, &instance, &operation);

    // The instance can be fetched, without the webhook secret in its parameters.
    let (status, fetched) = stack
        .send(stack.request(Method::GET, &format!("/v2/service_instances/{instance}")))
        .await
        .unwrap();
    assert_eq!(status, 200, "{fetched}");
    assert_eq!(fetched["parameters"], json!({"extensions": ["citext"]}));

    // A read-write binding: a working DATABASE_URL.
    let rw = bind(&stack, &instance, "rw-binding", &ids, json!({})).await;
    for key in [
        "DATABASE_URL",
        "uri",
        "PGHOST",
        "PGPORT",
        "PGDATABASE",
        "PGUSER",
        "PGPASSWORD",
    ] {
        assert!(rw[key].is_string(), "credentials lack {key}: {rw}");
    }
    let rw_url = rw["DATABASE_URL"].as_str().unwrap().to_string();
    write_a_citext_note(&rw_url).await;

    // The secret never went into the webhook.
    assert!(!String::from_utf8_lossy(&hook.body).contains(rw["PGPASSWORD"].as_str().unwrap()));
    // Nor, in the clear, into the broker's database (as text or as bytes) or the logs.
    let rw_password = rw["PGPASSWORD"].as_str().unwrap();
    assert_never_in_the_clear(&stack, &[rw_password, secret]).await;

    // A read-only binding reads the table and cannot write.
    let ro = bind(
        &stack,
        &instance,
        "ro-binding",
        &ids,
        json!({"access": "read-only"}),
    )
    .await;
    assert_ne!(ro["PGUSER"], rw["PGUSER"]);
    assert_reads_but_cannot_write(ro["DATABASE_URL"].as_str().unwrap()).await;

    // Unbind the read-write binding: its role can no longer log in.
    let path = format!("/v2/service_instances/{instance}/service_bindings/rw-binding");
    let (status, _) = stack.delete_until_done(&path, &ids, WAIT).await;
    assert!(status == 410 || status == 200, "unbind ended with {status}");
    assert!(
        PgConnection::connect(&rw_url).await.is_err(),
        "an unbound role still logs in"
    );
    let (status, _) = stack.send(stack.request(Method::GET, &path)).await.unwrap();
    assert_eq!(status, 404);

    // Deprovision: the database and every role are gone.
    let (status, last) = stack
        .delete_until_done(&format!("/v2/service_instances/{instance}"), &ids, WAIT)
        .await;
    assert_eq!(status, 410, "{last}\n{}", stack.logs());
    assert_no_database_and_no_role_left(&stack, &instance).await;

    // Nothing in either log carries a credential.
    let logs = stack.logs();
    for secret in [
        rw["PGPASSWORD"].as_str().unwrap(),
        ro["PGPASSWORD"].as_str().unwrap(),
        secret,
    ] {
        assert!(!logs.contains(secret), "a secret reached a log");
    }
    stack.stop().await;
}

/// The webhook of an instance operation: signed with `secret`, naming the instance and the operation, no binding.
fn assert_signed_instance_webhook(
    hook: &ReceivedWebhook,
    secret: &str,
    instance: &str,
    operation: &str,
) {
    assert_eq!(
        hook.signature.as_deref(),
        Some(broker::crypto::sign(secret.as_bytes(), &hook.body).as_str())
    );
    let hook_body: Value = serde_json::from_slice(&hook.body).unwrap();
    assert_eq!(hook_body["instance_id"], instance);
    assert_eq!(hook_body["operation"], operation);
    assert_eq!(hook_body["state"], "succeeded");
    assert!(hook_body["description"].is_string(), "{hook_body}");
    assert!(
        hook_body.get("binding_id").is_none(),
        "an instance operation names no binding: {hook_body}"
    );
}

/// Creates the table `notes` (a citext column) with the row 'Hello', and finds it case-insensitively.
async fn write_a_citext_note(url: &str) {
    let mut conn = PgConnection::connect(url)
        .await
        .expect("connect with the binding's DATABASE_URL");
    sqlx::query("CREATE TABLE notes (id serial PRIMARY KEY, body citext)")
        .execute(&mut conn)
        .await
        .unwrap();
    sqlx::query("INSERT INTO notes (body) VALUES ('Hello')")
        .execute(&mut conn)
        .await
        .unwrap();
    let found: String = sqlx::query_scalar("SELECT body::text FROM notes WHERE body = 'HELLO'")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(found, "Hello");
    conn.close().await.unwrap();
}

/// A read-only binding reads the table `notes` (one row) and cannot write it.
async fn assert_reads_but_cannot_write(url: &str) {
    let mut conn = PgConnection::connect(url).await.unwrap();
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM notes")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(count, 1);
    let write = sqlx::query("INSERT INTO notes (body) VALUES ('nope')")
        .execute(&mut conn)
        .await;
    assert!(write.is_err(), "a read-only binding wrote a row");
    conn.close().await.unwrap();
}

/// Deprovisioned: the instance's database and every role of the stack are gone, and the instance is not found.
async fn assert_no_database_and_no_role_left(stack: &Stack, instance: &str) {
    let database = broker::names::instance_database(&stack.name_prefix, instance);
    let mut admin = stack.admin().await.unwrap();
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_database WHERE datname = $1")
        .bind(&database)
        .fetch_one(&mut admin)
        .await
        .unwrap();
    assert_eq!(left, 0, "database {database} survived deprovision");
    let roles: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_roles WHERE rolname LIKE $1")
        .bind(format!("{}%", stack.name_prefix))
        .fetch_one(&mut admin)
        .await
        .unwrap();
    assert_eq!(roles, 0, "roles survived deprovision");
    let (status, _) = stack
        .send(stack.request(Method::GET, &format!("/v2/service_instances/{instance}")))
        .await
        .unwrap();
    assert_eq!(status, 404);
    admin.close().await.unwrap();
}

/// None of `secrets` is stored in the clear in the broker's database (as text or as hex bytes) or in a log.
async fn assert_never_in_the_clear(stack: &Stack, secrets: &[&str]) {
    let everything = broker_database_text(stack).await;
    for plain in secrets {
        let hex: String = plain.bytes().map(|b| format!("{b:02x}")).collect();
        assert!(
            !everything.contains(plain) && !everything.contains(&hex),
            "{plain:?} is stored in the clear"
        );
        assert!(!stack.logs().contains(plain), "{plain:?} reached a log");
    }
}
