//! Warm pools of the `ha` plan on `HA_ENGINE=ec2` (docs/pools.md) on VMs that boot under the VM emulator
//! (docs/vm-emulator.md): the pool fills a cluster of 3 VMs, finished by another worker when the first is killed
//! mid-fill (the same VMs); a provision takes it in seconds; every password the
//! cluster was made with (superuser, replication, rewind, Patroni's REST API, the admin user) is refused after the
//! take and the instance's work, and no member's Patroni configuration holds an old one (the re-key went through
//! the database and each VM's agent, not through user-data); a binding writes; replicas whose stream is cut
//! stream again (with the new replication password); a replica's VM lost after the take is replaced from the
//! instance's secrets and streams; deprovision leaves nothing in moto or docker; the pool
//! refills; a provision the pool cannot serve (`zones`) is a miss and boots a cluster the ordinary way (timed
//! beside the take); a worker restarted with the target at 0 drains the pool. Ten VM boots in all.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use berth_tests::{Stack, TestFolder, plan_ids};
use serde_json::{Value, json};
use sqlx::{
    Connection, PgConnection,
    postgres::{PgConnectOptions, PgSslMode},
};

use crate::{
    dedicated_spot_vm::{aws, container, container_runs, docker, env, eventually, tagged},
    ha_ec2_vm::{psql, run_psql},
    pools::{Item, drain_by_restart, pool_items, wait_pool},
    pools_ec2::{assert_nothing_tagged, fill_seconds, plans_on_the_image_version},
};

/// This test's VPC: a CIDR no other test uses (docs/vm-emulator.md).
const CIDR: &str = "10.204.0.0/16";
/// Boots, cloud-init, etcd and Patroni's bootstrap on three VMs of a busy 2-core machine: leave room.
const WAIT: Duration = Duration::from_secs(900);

/// A failing test never reaches the deprovision: what moto holds under these keys is terminated, so its VMs do
/// not run on beside the next tests.
struct VmsGuard(std::sync::Mutex<Vec<String>>);

impl Drop for VmsGuard {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for key in self.0.lock().unwrap().iter() {
            let left = tagged(key);
            for vm in left["vms"].as_array().into_iter().flatten() {
                if let Some(id) = vm["id"].as_str() {
                    aws(&["terminate", id]);
                }
            }
        }
    }
}

/// The members (name, VM id, private address) as the item's details list them.
fn members_of(details: &Value) -> Vec<(String, String, String)> {
    details["ha_ec2"]["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["name"].as_str().unwrap().to_string(),
                m["vm_id"].as_str().unwrap().to_string(),
                m["private_ip"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn login(host: &str, user: &str, password: &str, database: &str, ca: &str) -> PgConnectOptions {
    PgConnectOptions::new()
        .host(host)
        .port(5432)
        .username(user)
        .password(password)
        .database(database)
        .ssl_mode(PgSslMode::VerifyCa)
        .ssl_root_cert_from_pem(ca.as_bytes().to_vec())
}

async fn logs_in(options: &PgConnectOptions) -> bool {
    match PgConnection::connect_with(options).await {
        Ok(conn) => {
            conn.close().await.unwrap();
            true
        }
        Err(_) => false,
    }
}

/// A replication connection (what a replica's walreceiver opens) as `replicator`, through libpq.
fn replication_login(host: &str, password: &str) -> bool {
    Command::new(psql())
        .arg(format!(
            "host={host} port=5432 user=replicator dbname=postgres replication=true sslmode=require connect_timeout=5"
        ))
        .args(["-XqAtc", "IDENTIFY_SYSTEM"])
        .env("PGPASSWORD", password)
        .output()
        .unwrap()
        .status
        .success()
}

/// The status of a no-op PATCH of the cluster's settings on a member's REST API with `password`.
async fn rest_status(http: &reqwest::Client, host: &str, password: &str) -> u16 {
    http.patch(format!("https://{host}:8008/config"))
        .basic_auth("berth", Some(password))
        .json(&json!({ "postgresql": {} }))
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

fn sealed_secrets(cipher: &broker::crypto::Cipher, sealed: &[u8]) -> Value {
    cipher.open_json(sealed).unwrap()
}

#[tokio::test]
async fn ha_ec2_pool_is_taken_in_seconds_with_every_password_replaced_and_drains() {
    assert_eq!(
        env("BERTH_TEST_VM_EMULATOR"),
        "1",
        "the VM emulator is not running"
    );
    let vpc = aws(&["vpc", CIDR, "pools-ha-ec2"]);
    let subnets: Vec<&str> = vpc["subnets"]
        .as_object()
        .unwrap()
        .values()
        .map(|s| s.as_str().unwrap())
        .collect();
    let folder = TestFolder(std::env::temp_dir().join(format!(
        "berth-pools-ha-ec2-{}",
        uuid::Uuid::new_v4().simple()
    )));
    let plans_dir = plans_on_the_image_version(&folder, "ha");
    let mut stack = Stack::start_with(vec![
        ("PLANS_DIR", plans_dir),
        ("HA_ENGINE", "ec2".into()),
        ("AWS_REGION", "us-east-1".into()),
        ("AWS_ENDPOINT_URL", env("BERTH_TEST_MOTO_URL")),
        ("AWS_ACCESS_KEY_ID", env("BERTH_TEST_MOTO_ACCESS_KEY")),
        ("AWS_SECRET_ACCESS_KEY", env("BERTH_TEST_MOTO_SECRET_KEY")),
        ("EC2_AMI_X86_64", vpc["ami_x86_64"].as_str().unwrap().into()),
        ("EC2_AMI_ARM64", vpc["ami_arm64"].as_str().unwrap().into()),
        ("EC2_SUBNET_IDS", subnets.join(",")),
        ("EC2_READINESS_PROBE", "true".into()),
        ("POOL_TARGETS", "ha=1".into()),
        ("POOL_CHECK_MS", "500".into()),
        // The killed worker's fill comes back to the queue soon.
        ("WORKER_LEASE_SECS", "5".into()),
    ])
    .await
    .unwrap();
    let ids = plan_ids(&stack.catalog().await.unwrap(), "postgres", "ha");
    let cipher = broker::crypto::Cipher::from_key_files(&[stack.dir.join("master.key")]).unwrap();
    let guard = VmsGuard(Default::default());

    // The pool fills a cluster of 3 VMs with the plan's defaults. A worker killed once the fill launched them
    // leaves the fill to another (the progress is on the item's row), which finishes the same VMs.
    let deadline = Instant::now() + WAIT;
    let filling: Item = loop {
        let items = pool_items(&stack, &ids.1).await;
        if let Some(item) = items.iter().find(|i| {
            i.state == "filling"
                && i.details["ha_ec2"]["members"]
                    .as_array()
                    .is_some_and(|m| m.len() == 3 && m.iter().all(|m| m["vm_id"].is_string()))
        }) {
            break item.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no fill seen launching its VMs: {items:?}\n{}",
            stack.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    guard.0.lock().unwrap().push(filling.id.clone());
    let launched = |details: &Value| {
        let mut vms: Vec<String> = members_of(details)
            .into_iter()
            .map(|(_, vm, _)| vm)
            .collect();
        vms.sort();
        vms
    };
    stack.kill_worker().await;
    stack.restart_worker(Vec::new()).unwrap();
    let item: Item = wait_pool(&stack, &ids.1, 1, WAIT).await.remove(0);
    assert_eq!(item.id, filling.id, "the killed fill was not finished");
    assert_eq!(
        launched(&item.details),
        launched(&filling.details),
        "the same VMs"
    );
    assert_eq!(
        tagged(&item.id)["vms"].as_array().map(Vec::len),
        Some(3),
        "no VM launched twice"
    );
    let first_fill = fill_seconds(&stack, &item.id).await;
    let members = members_of(&item.details);
    assert_eq!(members.len(), 3, "{}", item.details);
    for (_, vm, _) in &members {
        assert!(container_runs(vm), "the item's VM {vm} does not run");
    }
    assert_eq!(item.details["postgres_version"], "15", "{}", item.details);
    let pooled = sealed_secrets(&cipher, item.secrets.as_ref().unwrap());
    let ca = pooled["ca"]["cert"].as_str().unwrap().to_string();
    let old = |key: &str| pooled[key].as_str().unwrap().to_string();
    assert!(
        pooled["rekey_key"].as_str().is_some_and(|k| k.len() == 64),
        "the item has a re-key key"
    );
    let (ip1, ip2, ip3) = (&members[0].2, &members[1].2, &members[2].2);
    assert!(
        logs_in(&login(ip1, "postgres", &old("superuser"), "postgres", &ca)).await,
        "the pooled superuser password logs in before the take"
    );

    // A provision takes it: names, extensions and tags the finishing step applies.
    let instance = uuid::Uuid::new_v4().to_string();
    guard.0.lock().unwrap().push(instance.clone());
    let base = format!("/v2/service_instances/{instance}");
    let provision = json!({
        "service_id": ids.0, "plan_id": ids.1, "organization_guid": "org", "space_guid": "space",
        "parameters": { "app_db_name": "shop", "admin_user": "boss", "extensions": ["pgcrypto"],
                        "tags": { "team": "pools" } },
    });
    let started = Instant::now();
    stack.put_until_done(&base, &provision, WAIT).await;
    let pooled_take = started.elapsed();
    for line in stack
        .log("worker-restarted.log")
        .lines()
        .filter(|l| l.contains("pooled ha cluster on EC2 adopted"))
    {
        println!("{line}");
    }
    assert!(
        pooled_take < Duration::from_secs(60),
        "a pooled take took {pooled_take:?}\n{}",
        stack.logs()
    );
    let details = stack.instance_details(&instance).await;
    assert_eq!(details["pool_item"], item.id.as_str(), "{details}");
    assert_eq!(details["app_db_name"], "shop");
    assert_eq!(details["admin_user"], "boss");
    let rekey_wait_ms = details["rekey_wait_ms"].as_u64().unwrap();
    let secrets = {
        let mut db = PgConnection::connect(&stack.broker_db_url).await.unwrap();
        let sealed: Vec<u8> =
            sqlx::query_scalar("SELECT secrets FROM service_instances WHERE id = $1")
                .bind(&instance)
                .fetch_one(&mut db)
                .await
                .unwrap();
        db.close().await.unwrap();
        sealed_secrets(&cipher, &sealed)
    };
    assert!(secrets.get("taking").is_none(), "the take's leftovers went");
    let new = |key: &str| secrets[key].as_str().unwrap().to_string();
    for key in [
        "superuser",
        "replication",
        "rewind",
        "restapi",
        "admin_password",
    ] {
        assert_ne!(old(key), new(key), "{key} was not replaced");
    }
    let text = crate::pools::metrics(&stack).await;
    assert_eq!(
        crate::pools::sample(&text, "berth_pool_hits_total", "ha", ""),
        Some(1.0),
        "{text}"
    );

    // The resources carry the instance's key and tags now; nothing is left under the item's.
    let held = tagged(&instance);
    let vms = held["vms"].as_array().unwrap();
    assert_eq!(vms.len(), 3, "{held}");
    assert!(vms.iter().all(|v| v["tags"]["team"] == "pools"), "{held}");
    assert_eq!(
        held["security_groups"].as_array().unwrap().len(),
        1,
        "{held}"
    );
    assert_nothing_tagged(&item.id);

    // Every old password is refused on every member, and the new ones work.
    let http = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca.as_bytes()).unwrap())
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    for ip in [ip1, ip2, ip3] {
        assert!(!logs_in(&login(ip, "postgres", &old("superuser"), "postgres", &ca)).await);
        assert!(logs_in(&login(ip, "postgres", &new("superuser"), "postgres", &ca)).await);
        assert!(!logs_in(&login(ip, "rewinder", &old("rewind"), "postgres", &ca)).await);
        assert!(logs_in(&login(ip, "rewinder", &new("rewind"), "postgres", &ca)).await);
        assert!(!logs_in(&login(ip, "boss", &old("admin_password"), "shop", &ca)).await);
        assert!(logs_in(&login(ip, "boss", &new("admin_password"), "shop", &ca)).await);
        assert!(!replication_login(ip, &old("replication")));
        assert!(
            replication_login(ip, &new("replication")),
            "replication with the new password on {ip}"
        );
        assert_eq!(rest_status(&http, ip, &old("restapi")).await, 401, "{ip}");
        assert_eq!(rest_status(&http, ip, &new("restapi")).await, 200, "{ip}");
    }
    // No member's Patroni configuration holds an old password (the agent rewrote each one).
    for (name, vm, _) in &members {
        let config = docker(&["exec", &container(vm), "cat", "/etc/berth/patroni.yml"]).unwrap();
        for key in ["superuser", "replication", "rewind", "restapi"] {
            assert!(
                !config.contains(&old(key)),
                "{name}'s patroni.yml holds the old {key} password"
            );
            assert!(
                config.contains(&new(key)),
                "{name}'s patroni.yml lacks the new {key} password"
            );
        }
    }

    // A binding writes on the renamed database, with the extension asked for.
    let binding = format!("{base}/service_bindings/app");
    stack
        .put_until_done(
            &binding,
            &json!({ "service_id": ids.0, "plan_id": ids.1 }),
            WAIT,
        )
        .await;
    let url = stack.fetch_credentials(&binding).await["DATABASE_URL"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(url.contains("/shop?"), "{url}");
    // A multi-host URL (every member; libpq finds the primary).
    let written = run_psql(
        &url,
        "CREATE TABLE kept (id int PRIMARY KEY, digest text); \
         INSERT INTO kept VALUES (1, encode(digest('x', 'sha256'), 'hex')); \
         SELECT count(*) FROM kept",
    );
    assert_eq!(written.as_deref(), Ok("1"), "the binding writes and reads");

    // The replicas' streams are cut on the primary: they connect again with the new replication password and
    // replay what is written after.
    let primary = details["primary"].as_str().unwrap().to_string();
    let primary_ip = members
        .iter()
        .find(|(name, ..)| *name == primary)
        .unwrap()
        .2
        .clone();
    let mut su = PgConnection::connect_with(&login(
        &primary_ip,
        "postgres",
        &new("superuser"),
        "shop",
        &ca,
    ))
    .await
    .unwrap();
    let cut_at: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT now()")
        .fetch_one(&mut su)
        .await
        .unwrap();
    let cut: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_replication) t",
    )
    .fetch_one(&mut su)
    .await
    .unwrap();
    assert_eq!(cut, 2, "two replicas streamed before the cut");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let again: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming' AND backend_start > $1",
        )
        .bind(cut_at)
        .fetch_one(&mut su)
        .await
        .unwrap();
        if again == 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{again} of 2 replicas stream again after the cut"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    sqlx::query("INSERT INTO kept VALUES (2, 'after the cut')")
        .execute(&mut su)
        .await
        .unwrap();
    su.close().await.unwrap();
    for (name, vm, _) in members.iter().filter(|(name, ..)| *name != primary) {
        eventually(
            Duration::from_secs(30),
            &format!("replica {name} replays the row written after the cut"),
            || {
                docker(&[
                    "exec",
                    "-u",
                    "postgres",
                    &container(vm),
                    "psql",
                    "-h",
                    "/var/run/postgresql",
                    "-d",
                    "shop",
                    "-XqAtc",
                    "SELECT count(*) FROM kept",
                ])
                .as_deref()
                    == Some("2")
            },
        )
        .await;
    }

    // A replica's VM is lost after the take: the reconcile loop's replacement boots from user-data rendered with
    // the instance's secrets (the new passwords and the re-key key), clones from the primary with the new
    // replication password, and its agent finds nothing to change.
    let (lost_name, lost_vm, lost_ip) = members
        .iter()
        .find(|(name, ..)| *name != primary)
        .cloned()
        .unwrap();
    let mut su = PgConnection::connect_with(&login(
        &primary_ip,
        "postgres",
        &new("superuser"),
        "postgres",
        &ca,
    ))
    .await
    .unwrap();
    let lost_at: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT now()")
        .fetch_one(&mut su)
        .await
        .unwrap();
    aws(&["terminate", &lost_vm]);
    let deadline = Instant::now() + WAIT;
    let replacement = loop {
        let now = stack.instance_details(&instance).await;
        // (The slot has no VM for a moment: the old one is forgotten before the new one is launched.)
        let vm = now["ha_ec2"]["members"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|m| m["name"] == lost_name.as_str())
            .and_then(|m| m["vm_id"].as_str())
            .map(str::to_string);
        if let Some(vm) = vm.filter(|vm| *vm != lost_vm && container_runs(vm)) {
            break vm;
        }
        assert!(
            Instant::now() < deadline,
            "member {lost_name} was not replaced\n{}",
            stack.logs()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let deadline = Instant::now() + WAIT;
    loop {
        let streaming: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_replication \
             WHERE state = 'streaming' AND client_addr = $1::inet AND backend_start > $2",
        )
        .bind(&lost_ip)
        .bind(lost_at)
        .fetch_one(&mut su)
        .await
        .unwrap();
        if streaming == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the replacement of {lost_name} does not stream\n{}",
            stack.logs()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    su.close().await.unwrap();
    let config = docker(&[
        "exec",
        &container(&replacement),
        "cat",
        "/etc/berth/patroni.yml",
    ])
    .unwrap();
    for key in ["superuser", "replication", "rewind", "restapi"] {
        assert!(
            !config.contains(&old(key)) && config.contains(&new(key)),
            "{key}"
        );
    }
    eventually(
        Duration::from_secs(30),
        "the replacement's agent records the take's nonce as applied",
        || {
            docker(&[
                "exec",
                &container(&replacement),
                "test",
                "-s",
                "/etc/berth/rekey.applied",
            ])
            .is_some()
        },
    )
    .await;
    assert_eq!(rest_status(&http, &lost_ip, &new("restapi")).await, 200);

    // Deprovision: nothing of the instance (nor of the item it was) is left in moto or in docker.
    let (status, _) = stack.delete_until_done(&binding, &ids, WAIT).await;
    assert!(status == 410 || status == 200, "unbind ended with {status}");
    let (status, last) = stack.delete_until_done(&base, &ids, WAIT).await;
    assert_eq!(status, 410, "{last}\n{}", stack.logs());
    assert_nothing_tagged(&instance);
    assert_nothing_tagged(&item.id);
    for vm in members
        .iter()
        .map(|(_, vm, _)| vm)
        .chain(std::iter::once(&replacement))
    {
        eventually(
            Duration::from_secs(60),
            "the instance's VM containers are gone",
            || docker(&["inspect", &container(vm)]).is_none(),
        )
        .await;
    }

    // The pool was refilled meanwhile (three more boots).
    let refill = wait_pool(&stack, &ids.1, 1, WAIT).await.remove(0);
    guard.0.lock().unwrap().push(refill.id.clone());
    let refill_seconds = fill_seconds(&stack, &refill.id).await;
    let refill_vms: Vec<String> = members_of(&refill.details)
        .into_iter()
        .map(|(_, vm, _)| vm)
        .collect();

    // A provision asking for zones is a miss: an ordinary provision, timed the same way (three more boots).
    let ordinary = uuid::Uuid::new_v4().to_string();
    guard.0.lock().unwrap().push(ordinary.clone());
    let ordinary_base = format!("/v2/service_instances/{ordinary}");
    let started = Instant::now();
    stack
        .put_until_done(
            &ordinary_base,
            &json!({
                "service_id": ids.0, "plan_id": ids.1, "organization_guid": "org", "space_guid": "space",
                "parameters": { "zones": ["us-east-1a", "us-east-1b", "us-east-1c"] },
            }),
            WAIT,
        )
        .await;
    let ordinary_provision = started.elapsed();
    let ordinary_details = stack.instance_details(&ordinary).await;
    assert!(
        ordinary_details.get("pool_item").is_none(),
        "{ordinary_details}"
    );
    let text = crate::pools::metrics(&stack).await;
    assert_eq!(
        crate::pools::sample(&text, "berth_pool_misses_total", "ha", ""),
        Some(1.0),
        "{text}"
    );
    let (status, last) = stack.delete_until_done(&ordinary_base, &ids, WAIT).await;
    assert_eq!(status, 410, "{last}\n{}", stack.logs());
    assert_nothing_tagged(&ordinary);

    // A worker restarted with the target at 0 drains the pool.
    drain_by_restart(&mut stack, &ids.1, "ha=0", WAIT).await;
    assert_nothing_tagged(&refill.id);
    for vm in &refill_vms {
        eventually(
            Duration::from_secs(60),
            "the drained item's VM containers are gone",
            || docker(&["inspect", &container(vm)]).is_none(),
        )
        .await;
    }
    aws(&["delete-vpc", vpc["vpc"].as_str().unwrap()]);
    stack.stop().await;

    println!(
        "bench ha pool on EC2 (VM emulator): PUT→last_operation succeeded: a pooled take {:.1} s (of which the \
         re-key wait {rekey_wait_ms} ms), an ordinary provision {:.1} s; the fills (item created→ready) \
         {first_fill:.1} s and {refill_seconds:.1} s (same run)",
        pooled_take.as_secs_f64(),
        ordinary_provision.as_secs_f64()
    );
}
