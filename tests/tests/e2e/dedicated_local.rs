use std::{
    path::Path,
    time::{Duration, Instant},
};

use berth_tests::{Stack, processes_in};
use reqwest::Method;
use serde_json::{Value, json};
use sqlx::{Connection, PgConnection};

/// initdb and the first start take a few seconds on a busy 2-core machine; leave room.
const WAIT: Duration = Duration::from_secs(180);

fn dedicated_ids(catalog: &Value) -> (String, String) {
    let service = catalog["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "postgres")
        .expect("postgres service in the catalog");
    let plan = service["plans"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "dedicated")
        .expect("dedicated plan in the catalog (LOCAL_ENGINE=on)");
    (
        service["id"].as_str().unwrap().into(),
        plan["id"].as_str().unwrap().into(),
    )
}

fn postmaster_pid(data: &Path) -> Option<u32> {
    std::fs::read_to_string(data.join("postmaster.pid"))
        .ok()?
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}

async fn instance_details(stack: &Stack, instance: &str) -> Value {
    let mut db = PgConnection::connect(&stack.broker_db_url).await.unwrap();
    let details: Value = sqlx::query_scalar("SELECT details FROM service_instances WHERE id = $1")
        .bind(instance)
        .fetch_one(&mut db)
        .await
        .unwrap();
    db.close().await.unwrap();
    details
}

#[tokio::test]
async fn dedicated_server_survives_a_killed_postmaster_and_leaves_nothing_behind() {
    let stack = Stack::start().await.unwrap();
    let (_, catalog) = stack
        .send(stack.request(Method::GET, "/v2/catalog"))
        .await
        .unwrap();
    let ids = dedicated_ids(&catalog);
    let instance = uuid::Uuid::new_v4().to_string();
    let base = format!("/v2/service_instances/{instance}");

    // Provision a dedicated server.
    let (status, body) = stack
        .send(stack.request(Method::PUT, &format!("{base}?accepts_incomplete=true")).json(&json!({
            "service_id": ids.0, "plan_id": ids.1, "organization_guid": "org", "space_guid": "space",
            "parameters": {"tuning_profile": "web", "extensions": ["pgcrypto"], "app_db_name": "orders"},
        })))
        .await
        .unwrap();
    assert_eq!(status, 202, "{body}");
    let (status, last) = stack
        .wait_operation(&format!("{base}/last_operation"), WAIT)
        .await
        .unwrap();
    assert_eq!(
        (status, last["state"].as_str()),
        (200, Some("succeeded")),
        "{last}\n{}",
        stack.logs()
    );

    // Bind and connect over TLS with DATABASE_URL.
    let path = format!("{base}/service_bindings/app");
    let (status, body) = stack
        .send(
            stack
                .request(Method::PUT, &format!("{path}?accepts_incomplete=true"))
                .json(&json!({
                    "service_id": ids.0, "plan_id": ids.1, "app_guid": "app-1",
                })),
        )
        .await
        .unwrap();
    assert_eq!(status, 202, "{body}");
    let (status, last) = stack
        .wait_operation(&format!("{path}/last_operation"), WAIT)
        .await
        .unwrap();
    assert_eq!(
        (status, last["state"].as_str()),
        (200, Some("succeeded")),
        "{last}\n{}",
        stack.logs()
    );
    let (status, fetched) = stack.send(stack.request(Method::GET, &path)).await.unwrap();
    assert_eq!(status, 200, "{fetched}");
    let creds = &fetched["credentials"];
    for key in [
        "DATABASE_URL",
        "uri",
        "PGHOST",
        "PGPORT",
        "PGDATABASE",
        "PGUSER",
        "PGPASSWORD",
        "PGSSLMODE",
    ] {
        assert!(creds[key].is_string(), "credentials lack {key}: {creds}");
    }
    let url = creds["DATABASE_URL"].as_str().unwrap().to_string();
    assert!(url.ends_with("/orders?sslmode=require"), "{url}");
    let mut conn = PgConnection::connect(&url)
        .await
        .expect("connect over TLS with DATABASE_URL");
    sqlx::raw_sql("CREATE TABLE kept (id int PRIMARY KEY); INSERT INTO kept VALUES (42)")
        .execute(&mut conn)
        .await
        .unwrap();
    let digest: String = sqlx::query_scalar("SELECT encode(digest('x', 'sha256'), 'hex')")
        .fetch_one(&mut conn)
        .await
        .expect("pgcrypto is created");
    assert_eq!(digest.len(), 64);
    conn.close().await.unwrap();
    let plain = url.replace("sslmode=require", "sslmode=disable");
    assert!(
        PgConnection::connect(&plain).await.is_err(),
        "a connection without TLS was accepted"
    );

    // kill -9 the postmaster: the worker's reconcile loop starts the server again.
    let root = stack.servers_dir.join(broker::names::instance_server(
        &stack.name_prefix,
        &instance,
    ));
    let data = root.join("data");
    let killed = postmaster_pid(&data).expect("postmaster.pid");
    let status = std::process::Command::new("kill")
        .arg("-KILL")
        .arg(killed.to_string())
        .status()
        .unwrap();
    assert!(status.success());
    // Back means: a new postmaster, the restart recorded (committed just after the start), and DATABASE_URL
    // working again with the data intact.
    let deadline = Instant::now() + WAIT;
    loop {
        let restarted = postmaster_pid(&data).is_some_and(|pid| pid != killed);
        let recorded = instance_details(&stack, &instance).await["restarts"]
            .as_i64()
            .unwrap_or(0)
            >= 1;
        if restarted
            && recorded
            && let Ok(mut conn) = PgConnection::connect(&url).await
        {
            let kept: i32 = sqlx::query_scalar("SELECT id FROM kept")
                .fetch_one(&mut conn)
                .await
                .unwrap();
            assert_eq!(kept, 42, "the data survived the crash");
            conn.close().await.unwrap();
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the server did not come back\n{}",
            stack.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let details = instance_details(&stack, &instance).await;
    assert!(details["last_recovered_at"].is_string(), "{details}");
    assert!(
        stack.log("worker.log").contains("starting it"),
        "the restart is logged"
    );

    // Unbind, then deprovision: no process and no files are left.
    let (status, body) = stack
        .send(stack.request(
            Method::DELETE,
            &format!(
                "{path}?service_id={}&plan_id={}&accepts_incomplete=true",
                ids.0, ids.1
            ),
        ))
        .await
        .unwrap();
    assert_eq!(status, 202, "{body}");
    let (status, _) = stack
        .wait_operation(&format!("{path}/last_operation"), WAIT)
        .await
        .unwrap();
    assert!(status == 410 || status == 200, "unbind ended with {status}");
    assert!(
        PgConnection::connect(&url).await.is_err(),
        "an unbound role still logs in"
    );

    let (status, body) = stack
        .send(stack.request(
            Method::DELETE,
            &format!(
                "{base}?service_id={}&plan_id={}&accepts_incomplete=true",
                ids.0, ids.1
            ),
        ))
        .await
        .unwrap();
    assert_eq!(status, 202, "{body}");
    let (status, last) = stack
        .wait_operation(&format!("{base}/last_operation"), WAIT)
        .await
        .unwrap();
    assert_eq!(status, 410, "{last}\n{}", stack.logs());
    assert!(
        processes_in(&data).is_empty(),
        "a server process survived deprovision"
    );
    assert!(!root.exists(), "{} survived deprovision", root.display());
    stack.stop().await;
}
