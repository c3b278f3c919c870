//! Warm pools of the `ha` plan (local engine, real etcd and Patroni; docs/pools.md): a hit is answered at once
//! and works through a binding; every password the cluster was made with (its sealed secrets, Patroni's
//! configuration) is refused after the take, on the primary and the replicas, and still after a switchover; a
//! miss takes the ordinary path; deprovision leaves nothing of the cluster; the pool refills.

use std::{path::PathBuf, time::Instant};

use berth_tests::{Stack, plan_ids, processes_under};
use serde_json::{Value, json};
use sqlx::{
    Connection, PgConnection,
    postgres::{PgConnectOptions, PgSslMode},
};

use super::{
    ha_local::{ClusterFiles, WAIT, request_a_switchover, run_psql, wait_healthy},
    pools::{body, metrics, provision_sync, sample, wait_pool},
};

/// The cluster's roles and where the item's sealed secrets keep their passwords.
const ROLES: [(&str, &str); 3] = [
    ("postgres", "superuser_password"),
    ("replicator", "replication_password"),
    ("rewinder", "rewind_password"),
];

async fn logs_in(port: u16, user: &str, password: &str, database: &str) -> bool {
    let options = PgConnectOptions::new()
        .host("127.0.0.1")
        .port(port)
        .username(user)
        .password(password)
        .database(database)
        .ssl_mode(PgSslMode::Require);
    match PgConnection::connect_with(&options).await {
        Ok(conn) => {
            let _ = conn.close().await;
            true
        }
        Err(_) => false,
    }
}

fn pg_ports(files: &ClusterFiles) -> Vec<u16> {
    files.state()["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["pg_port"].as_u64().unwrap() as u16)
        .collect()
}

/// The cluster's passwords as `secrets.json` holds them now.
fn current_secrets(files: &ClusterFiles) -> Value {
    serde_json::from_slice(&std::fs::read(files.root.join("secrets.json")).unwrap()).unwrap()
}

/// Every pooled password is refused on every member (primary and replicas), the REST API refuses the pooled
/// password, no member's Patroni configuration holds one, and the cluster's new passwords work everywhere.
async fn assert_no_pooled_credential_works(files: &ClusterFiles, pooled: &Value, when: &str) {
    let now = current_secrets(files);
    let old_admin = pooled["admin_password"].as_str().unwrap();
    for port in pg_ports(files) {
        for (role, key) in ROLES {
            let old = pooled[key].as_str().unwrap();
            assert!(
                !logs_in(port, role, old, "postgres").await,
                "{when}: the pooled password of {role} still logs in on port {port}"
            );
        }
        for (user, db) in [("app_admin", "app"), ("boss", "orders")] {
            assert!(
                !logs_in(port, user, old_admin, db).await,
                "{when}: the pooled admin password logs in as {user} on port {port}"
            );
        }
        for (role, key) in [
            ("postgres", "superuser"),
            ("replicator", "replication"),
            ("rewinder", "rewind"),
        ] {
            assert!(
                logs_in(port, role, now[key].as_str().unwrap(), "postgres").await,
                "{when}: the new password of {role} is refused on port {port}"
            );
        }
    }
    let http = reqwest::Client::new();
    for port in files.api_ports() {
        let answer = http
            .post(format!("http://127.0.0.1:{port}/reload"))
            .basic_auth(
                "berth",
                Some(pooled["patroni_api_password"].as_str().unwrap()),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(
            answer.status().as_u16(),
            401,
            "{when}: Patroni's REST API on {port} takes the pooled password"
        );
    }
    for member in files.state()["members"].as_array().unwrap() {
        let name = member["name"].as_str().unwrap();
        let config = std::fs::read_to_string(files.root.join(name).join("patroni.yml")).unwrap();
        for key in [
            "superuser_password",
            "replication_password",
            "rewind_password",
            "patroni_api_password",
        ] {
            assert!(
                !config.contains(pooled[key].as_str().unwrap()),
                "{when}: {name}'s Patroni configuration keeps the pooled {key}"
            );
        }
        assert!(
            config.contains(now["superuser"].as_str().unwrap()),
            "{when}: {name}'s Patroni configuration lacks the new superuser password"
        );
    }
}

#[tokio::test]
async fn ha_pool_hit_replaces_every_password_survives_a_switchover_and_a_miss_falls_back() {
    let stack = Stack::start_with(vec![
        ("POOL_TARGETS", "ha=1".into()),
        ("POOL_CHECK_MS", "200".into()),
    ])
    .await
    .unwrap();
    let ids = plan_ids(&stack.catalog().await.unwrap(), "postgres", "ha");
    let item = wait_pool(&stack, &ids.1, 1, WAIT).await.remove(0);
    let files = ClusterFiles {
        root: PathBuf::from(item.details["cluster_dir"].as_str().unwrap()),
    };
    let cipher = broker::crypto::Cipher::from_key_files(&[stack.dir.join("master.key")]).unwrap();
    let pooled: Value = cipher.open_json(item.secrets.as_ref().unwrap()).unwrap();
    // The item works with what it was made with, before it is taken (so the refusals below mean something).
    let pooled_leader = wait_healthy(&stack, &files, 3).await;
    let leader_port = files.member(&pooled_leader)["pg_port"].as_u64().unwrap() as u16;
    for (role, key) in ROLES {
        assert!(
            logs_in(leader_port, role, pooled[key].as_str().unwrap(), "postgres").await,
            "the pooled {role} logs in before the take"
        );
    }
    // The item was offered once settled: each replica streams through the slot Patroni gave it.
    let mut primary = PgConnection::connect_with(
        &PgConnectOptions::new()
            .host("127.0.0.1")
            .port(leader_port)
            .username("postgres")
            .password(pooled["superuser_password"].as_str().unwrap())
            .database("postgres")
            .ssl_mode(PgSslMode::Require),
    )
    .await
    .unwrap();
    let slotted: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_replication r JOIN pg_replication_slots s ON s.active_pid = r.pid \
         WHERE r.state = 'streaming'",
    )
    .fetch_one(&mut primary)
    .await
    .unwrap();
    assert_eq!(slotted, 2, "both replicas stream through their slots");
    primary.close().await.unwrap();

    // A hit: 201 without accepts_incomplete, the names asked for.
    let instance = uuid::Uuid::new_v4().to_string();
    let parameters = json!({"app_db_name": "orders", "admin_user": "boss", "members": 3,
                            "extensions": ["pgcrypto"]});
    let started = Instant::now();
    let (status, answer) = provision_sync(&stack, &instance, &body(&ids, parameters)).await;
    let took = started.elapsed();
    assert_eq!(status, 201, "{answer}\n{}", stack.logs());
    println!("ha provision from the pool answered in {took:?}");
    for line in stack
        .log("worker.log")
        .lines()
        .filter(|l| l.contains("adopted"))
    {
        println!("{line}");
    }
    let details = stack.instance_details(&instance).await;
    assert_eq!(details["pool_item"], json!(item.id), "{details}");
    assert_eq!(details["cluster_dir"], item.details["cluster_dir"]);
    assert_eq!(
        (&details["app_db_name"], &details["admin_user"]),
        (&json!("orders"), &json!("boss"))
    );
    assert_no_pooled_credential_works(&files, &pooled, "after the take").await;

    // A binding's DATABASE_URL writes and reads.
    let base = format!("/v2/service_instances/{instance}");
    let binding = format!("{base}/service_bindings/app");
    stack
        .put_until_done(
            &binding,
            &json!({"service_id": ids.0, "plan_id": ids.1, "app_guid": "app-1"}),
            WAIT,
        )
        .await;
    let url = stack.fetch_credentials(&binding).await["DATABASE_URL"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(url.contains("/orders?"), "{url}");
    run_psql(
        &url,
        "CREATE TABLE notes (n int); INSERT INTO notes VALUES (1), (2)",
    )
    .unwrap();
    assert_eq!(run_psql(&url, "SELECT sum(n) FROM notes").unwrap(), "3");

    // A switchover (Patroni restarts the old primary as a replica from its configuration files): the cluster
    // is healthy, the binding writes on the new primary, and still no pooled password works.
    let before = wait_healthy(&stack, &files, 3).await;
    request_a_switchover(&stack, &instance).await;
    let after = wait_healthy(&stack, &files, 3).await;
    assert_ne!(before, after, "the switchover moved the primary");
    run_psql(&url, "INSERT INTO notes VALUES (3)").unwrap();
    assert_eq!(run_psql(&url, "SELECT sum(n) FROM notes").unwrap(), "6");
    assert_no_pooled_credential_works(&files, &pooled, "after a switchover").await;

    // Deprovision: the cluster's processes, ports and folder (named after the item) are gone.
    let ports = files.all_ports();
    let (status, _) = stack.delete_until_done(&binding, &ids, WAIT).await;
    assert!(status == 200 || status == 410);
    let (status, last) = stack.delete_until_done(&base, &ids, WAIT).await;
    assert_eq!(status, 410, "{last}\n{}", stack.logs());
    assert!(
        !files.root.exists(),
        "{} survived deprovision",
        files.root.display()
    );
    assert!(processes_under(&files.root).is_empty());
    for port in ports {
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
            "port {port} still listens"
        );
    }

    // The pool refilled with a new cluster.
    let refilled = wait_pool(&stack, &ids.1, 1, WAIT).await.remove(0);
    assert_ne!(refilled.id, item.id);

    // A miss: a synchronous cluster is not what the pool holds. Without accepts_incomplete: 422 AsyncRequired;
    // with it, the ordinary path builds a cluster of its own.
    let other = uuid::Uuid::new_v4().to_string();
    let miss = body(&ids, json!({"synchronous": true}));
    let (status, answer) = provision_sync(&stack, &other, &miss).await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (422, Some("AsyncRequired")),
        "{answer}"
    );
    let path = format!("/v2/service_instances/{other}");
    stack.put_until_done(&path, &miss, WAIT).await;
    let details = stack.instance_details(&other).await;
    assert!(details.get("pool_item").is_none(), "{details}");
    assert_ne!(details["cluster_dir"], refilled.details["cluster_dir"]);
    let text = metrics(&stack).await;
    assert_eq!(
        sample(&text, "berth_pool_hits_total", "ha", ""),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "berth_pool_misses_total", "ha", ""),
        Some(2.0),
        "{text}"
    );
    let (status, _) = stack.delete_until_done(&path, &ids, WAIT).await;
    assert_eq!(status, 410);

    stack.stop().await;
}
