use std::{
    path::Path,
    time::{Duration, Instant},
};

use berth_tests::{Stack, plan_ids, postmaster_pid, processes_under};
use serde_json::{Value, json};
use sqlx::{Connection, PgConnection};

/// initdb and the first start take a few seconds on a busy 2-core machine; leave room.
const WAIT: Duration = Duration::from_secs(180);

#[tokio::test]
async fn dedicated_server_survives_a_killed_postmaster_and_leaves_nothing_behind() {
    let stack = Stack::start().await.unwrap();
    let ids = plan_ids(&stack.catalog().await.unwrap(), "postgres", "dedicated");
    let instance = uuid::Uuid::new_v4().to_string();
    let base = format!("/v2/service_instances/{instance}");

    // Provision a dedicated server.
    let provision = json!({
        "service_id": ids.0, "plan_id": ids.1, "organization_guid": "org", "space_guid": "space",
        "parameters": {"tuning_profile": "web", "extensions": ["pgcrypto"], "app_db_name": "orders"},
    });
    stack.put_until_done(&base, &provision, WAIT).await;

    // Bind and connect over TLS with DATABASE_URL.
    let path = format!("{base}/service_bindings/app");
    let bind = json!({ "service_id": ids.0, "plan_id": ids.1, "app_guid": "app-1" });
    stack.put_until_done(&path, &bind, WAIT).await;
    let url = connect_over_tls_and_keep_a_row(&stack.fetch_credentials(&path).await).await;

    // kill -9 the postmaster: the worker's reconcile loop starts the server again.
    let root = stack.servers_dir.join(broker::names::instance_server(
        &stack.name_prefix,
        &instance,
    ));
    let data = root.join("data");
    kill_the_postmaster_and_wait_for_its_return(&stack, &instance, &data, &url).await;

    // Unbind, then deprovision: no process and no files are left.
    let (status, _) = stack.delete_until_done(&path, &ids, WAIT).await;
    assert!(status == 410 || status == 200, "unbind ended with {status}");
    assert!(
        PgConnection::connect(&url).await.is_err(),
        "an unbound role still logs in"
    );
    let (status, last) = stack.delete_until_done(&base, &ids, WAIT).await;
    assert_eq!(status, 410, "{last}\n{}", stack.logs());
    assert!(
        processes_under(&data).is_empty(),
        "a server process survived deprovision"
    );
    assert!(!root.exists(), "{} survived deprovision", root.display());
    stack.stop().await;
}

/// The binding's credentials are complete; DATABASE_URL connects over TLS only, pgcrypto is there, and the table
/// `kept` gets a row. Returns DATABASE_URL.
async fn connect_over_tls_and_keep_a_row(creds: &Value) -> String {
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
    url
}

/// kill -9 of the postmaster in `data`; back means: a new postmaster, the restart recorded (committed just after
/// the start), and DATABASE_URL working again with the data intact.
async fn kill_the_postmaster_and_wait_for_its_return(
    stack: &Stack,
    instance: &str,
    data: &Path,
    url: &str,
) {
    let killed = postmaster_pid(data).expect("postmaster.pid");
    let status = std::process::Command::new("kill")
        .arg("-KILL")
        .arg(killed.to_string())
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + WAIT;
    loop {
        let restarted = postmaster_pid(data).is_some_and(|pid| pid != killed);
        let recorded = stack.instance_details(instance).await["restarts"]
            .as_i64()
            .unwrap_or(0)
            >= 1;
        if restarted
            && recorded
            && let Ok(mut conn) = PgConnection::connect(url).await
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
    let details = stack.instance_details(instance).await;
    assert!(details["last_recovered_at"].is_string(), "{details}");
    assert!(
        stack.log("worker.log").contains("starting it"),
        "the restart is logged"
    );
}
