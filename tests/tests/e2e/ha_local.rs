//! The `ha` plan on the `ha_local` engine through the real binaries, with real etcd and Patroni: a 3-member
//! synchronous cluster is provisioned, bound and written to through its multi-host DATABASE_URL (libpq's
//! psql), loses its primary to kill -9 without losing an acknowledged write, is healed back to 3 members by
//! the reconcile loop, switches over on request, scales 3 → 5 → 3, and leaves nothing behind.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use berth_tests::{Stack, processes_under};
use reqwest::Method;
use serde_json::{Value, json};
use sqlx::{
    Connection, PgConnection,
    postgres::{PgConnectOptions, PgSslMode},
};

/// Cluster bootstraps and base backups on a busy 2-core machine: leave room.
const WAIT: Duration = Duration::from_secs(300);

fn ha_ids(catalog: &Value) -> (String, String) {
    let service = catalog["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "postgres")
        .unwrap();
    let plan = service["plans"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "ha")
        .expect("ha plan in the catalog (LOCAL_ENGINE=on)");
    (
        service["id"].as_str().unwrap().into(),
        plan["id"].as_str().unwrap().into(),
    )
}

async fn details(stack: &Stack, instance: &str) -> Value {
    let mut db = PgConnection::connect(&stack.broker_db_url).await.unwrap();
    let details: Value = sqlx::query_scalar("SELECT details FROM service_instances WHERE id = $1")
        .bind(instance)
        .fetch_one(&mut db)
        .await
        .unwrap();
    db.close().await.unwrap();
    details
}

/// The cluster's folder and what it remembers (ports, members, passwords), as the engine wrote them.
struct ClusterFiles {
    root: PathBuf,
}

impl ClusterFiles {
    fn state(&self) -> Value {
        serde_json::from_slice(&std::fs::read(self.root.join("cluster.json")).unwrap()).unwrap()
    }
    fn superuser_password(&self) -> String {
        let secrets: Value =
            serde_json::from_slice(&std::fs::read(self.root.join("secrets.json")).unwrap())
                .unwrap();
        secrets["superuser"].as_str().unwrap().to_string()
    }
    fn member(&self, name: &str) -> Value {
        self.state()["members"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == name)
            .cloned()
            .unwrap()
    }
    fn api_ports(&self) -> Vec<u64> {
        self.state()["members"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["api_port"].as_u64().unwrap())
            .collect()
    }
    fn all_ports(&self) -> Vec<u16> {
        let state = self.state();
        let mut ports: Vec<u16> = state["members"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|m| {
                [
                    m["pg_port"].as_u64().unwrap() as u16,
                    m["api_port"].as_u64().unwrap() as u16,
                ]
            })
            .collect();
        ports.push(state["etcd_client_port"].as_u64().unwrap() as u16);
        ports.push(state["etcd_peer_port"].as_u64().unwrap() as u16);
        ports
    }
    /// A superuser connection to one member (TLS, the cluster's CA).
    async fn superuser(&self, port: u16) -> PgConnection {
        let options = PgConnectOptions::new()
            .host("127.0.0.1")
            .port(port)
            .username("postgres")
            .password(&self.superuser_password())
            .database("postgres")
            .ssl_mode(PgSslMode::VerifyCa)
            .ssl_root_cert(self.root.join("tls/ca.crt"));
        PgConnection::connect_with(&options).await.unwrap()
    }
}

/// Patroni's view of the cluster, from the first member that answers.
async fn patroni_cluster(files: &ClusterFiles) -> Option<Value> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    for port in files.api_ports() {
        if let Ok(response) = http
            .get(format!("http://127.0.0.1:{port}/cluster"))
            .send()
            .await
            && let Ok(body) = response.json::<Value>().await
        {
            return Some(body);
        }
    }
    None
}

/// Waits until Patroni lists `n` members, one leader and `n - 1` running replicas with a known lag, and the
/// leader streams to all of them; returns the leader's name.
async fn wait_healthy(stack: &Stack, files: &ClusterFiles, n: usize) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(cluster) = patroni_cluster(files).await {
            let members = cluster["members"].as_array().cloned().unwrap_or_default();
            let leader = members
                .iter()
                .find(|m| m["role"] == "leader" && m["state"] == "running");
            let replicas = members
                .iter()
                .filter(|m| {
                    m["role"] != "leader" && m["state"] == "running" && m["lag"].is_number()
                })
                .count();
            if let Some(leader) = leader
                && members.len() == n
                && replicas == n - 1
            {
                let name = leader["name"].as_str().unwrap().to_string();
                let port = files.member(&name)["pg_port"].as_u64().unwrap() as u16;
                let mut su = files.superuser(port).await;
                let streaming: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'",
                )
                .fetch_one(&mut su)
                .await
                .unwrap();
                if streaming as usize == n - 1 {
                    return name;
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "the cluster did not reach {n} healthy members\n{}",
            stack.logs()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn psql() -> PathBuf {
    broker::embedded::find_bin_dir().unwrap().join("psql")
}

/// Runs `sql` through libpq (psql) with `url`; the output, or the error.
fn run_psql(url: &str, sql: &str) -> Result<String, String> {
    let out = std::process::Command::new(psql())
        .arg(url)
        .args(["-v", "ON_ERROR_STOP=1", "-qAtc", sql])
        .env("PGCONNECT_TIMEOUT", "3")
        .output()
        .unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

fn kill9(pids: &[u32]) {
    for pid in pids {
        let _ = std::process::Command::new("kill")
            .arg("-KILL")
            .arg(pid.to_string())
            .status();
    }
}

fn patroni_pid(files: &ClusterFiles, member: &str) -> Vec<u32> {
    let config = files.root.join(member).join("patroni.yml");
    let config = config.as_os_str().as_encoded_bytes().to_vec();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            !matches!(comm.trim(), "runuser" | "setsid")
                && std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| c.split(|b| *b == 0).any(|a| a == config.as_slice()))
        })
        .collect()
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

async fn operation_succeeds(stack: &Stack, path: &str) {
    let (status, last) = stack.wait_operation(path, WAIT).await.unwrap();
    assert_eq!(
        (status, last["state"].as_str()),
        (200, Some("succeeded")),
        "{last}\n{}",
        stack.logs()
    );
}

#[tokio::test]
async fn ha_cluster_fails_over_heals_switches_scales_and_leaves_nothing() {
    let stack = Stack::start().await.unwrap();
    let (_, catalog) = stack
        .send(stack.request(Method::GET, "/v2/catalog"))
        .await
        .unwrap();
    let ids = ha_ids(&catalog);
    let instance = uuid::Uuid::new_v4().to_string();
    let base = format!("/v2/service_instances/{instance}");
    let files = ClusterFiles {
        root: stack.servers_dir.join(broker::names::instance_cluster(
            &stack.name_prefix,
            &instance,
        )),
    };

    // A schema check first: an even member count is refused and writes nothing.
    let (status, body) = stack
        .send(stack.request(Method::PUT, &format!("{base}?accepts_incomplete=true")).json(&json!({
            "service_id": ids.0, "plan_id": ids.1, "organization_guid": "org", "space_guid": "space",
            "parameters": {"members": 4},
        })))
        .await
        .unwrap();
    assert_eq!(status, 400, "{body}");

    // Provision: 3 members, synchronous.
    let (status, body) = stack
        .send(stack.request(Method::PUT, &format!("{base}?accepts_incomplete=true")).json(&json!({
            "service_id": ids.0, "plan_id": ids.1, "organization_guid": "org", "space_guid": "space",
            "parameters": {"members": 3, "synchronous": true, "extensions": ["pgcrypto"]},
        })))
        .await
        .unwrap();
    assert_eq!(status, 202, "{body}");
    operation_succeeds(&stack, &format!("{base}/last_operation")).await;
    let first_leader = wait_healthy(&stack, &files, 3).await;
    let recorded = details(&stack, &instance).await;
    assert_eq!(
        recorded["members"].as_array().unwrap().len(),
        3,
        "{recorded}"
    );
    assert_eq!(recorded["synchronous"], true);
    assert!(
        recorded["patroni"]["ttl"].as_u64().unwrap() <= 10,
        "{recorded}"
    );
    let leader_port = files.member(&first_leader)["pg_port"].as_u64().unwrap() as u16;
    let mut su = files.superuser(leader_port).await;
    let in_recovery: bool = sqlx::query_scalar("SELECT pg_is_in_recovery()")
        .fetch_one(&mut su)
        .await
        .unwrap();
    assert!(!in_recovery, "the leader is a primary");
    let sync: String = sqlx::query_scalar("SHOW synchronous_standby_names")
        .fetch_one(&mut su)
        .await
        .unwrap();
    assert!(
        !sync.is_empty(),
        "synchronous: true names a synchronous standby"
    );
    let hba: Vec<String> =
        sqlx::query_scalar("SELECT type || ' ' || coalesce(address, '') FROM pg_hba_file_rules")
            .fetch_all(&mut su)
            .await
            .unwrap();
    assert!(
        hba.iter().all(|r| r.starts_with("hostssl 127.0.0.1")),
        "pg_hba admits only TLS from 127.0.0.1: {hba:?}"
    );
    su.close().await.unwrap();
    let log = std::fs::read_to_string(files.root.join(format!("{first_leader}/patroni.log")))
        .unwrap_or_default();
    assert!(
        !log.contains(&files.superuser_password()),
        "a password reached Patroni's log"
    );
    assert!(
        !stack.logs().contains(&files.superuser_password()),
        "a password reached berth's logs"
    );

    // Bind: multi-host URLs, endpoints for every member.
    let binding = format!("{base}/service_bindings/app");
    let (status, body) = stack
        .send(
            stack
                .request(Method::PUT, &format!("{binding}?accepts_incomplete=true"))
                .json(&json!({
                    "service_id": ids.0, "plan_id": ids.1, "app_guid": "app-1",
                })),
        )
        .await
        .unwrap();
    assert_eq!(status, 202, "{body}");
    operation_succeeds(&stack, &format!("{binding}/last_operation")).await;
    let (status, fetched) = stack
        .send(stack.request(Method::GET, &binding))
        .await
        .unwrap();
    assert_eq!(status, 200, "{fetched}");
    let creds = &fetched["credentials"];
    let url = creds["DATABASE_URL"].as_str().unwrap().to_string();
    let readonly_url = creds["DATABASE_READONLY_URL"].as_str().unwrap().to_string();
    assert!(
        url.contains("target_session_attrs=read-write") && url.matches("127.0.0.1:").count() == 3,
        "{url}"
    );
    assert!(
        readonly_url.contains("target_session_attrs=prefer-standby"),
        "{readonly_url}"
    );
    assert_eq!(
        fetched["endpoints"].as_array().map(Vec::len),
        Some(3),
        "{fetched}"
    );
    assert_eq!(
        creds["endpoints"]["replicas"].as_array().map(Vec::len),
        Some(2),
        "{creds}"
    );
    assert!(
        creds["ca_certificate"]
            .as_str()
            .unwrap()
            .contains("BEGIN CERTIFICATE")
    );

    run_psql(&url, "CREATE TABLE acked (id int PRIMARY KEY)").unwrap();
    run_psql(&url, "INSERT INTO acked VALUES (0)").unwrap();
    assert_eq!(
        run_psql(&url, "SELECT pg_is_in_recovery()").unwrap(),
        "f",
        "DATABASE_URL reaches the primary"
    );
    assert_eq!(
        run_psql(&readonly_url, "SELECT pg_is_in_recovery()").unwrap(),
        "t",
        "the read-only URL prefers a standby"
    );

    // A writer commits rows one by one on the primary; every acknowledged id is remembered.
    let primary_port: u16 = creds["endpoints"]["primary"]
        .as_str()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let options = PgConnectOptions::new()
        .host("127.0.0.1")
        .port(primary_port)
        .username(creds["PGUSER"].as_str().unwrap())
        .password(creds["PGPASSWORD"].as_str().unwrap())
        .database(creds["PGDATABASE"].as_str().unwrap())
        .ssl_mode(PgSslMode::Require);
    let acked = Arc::new(Mutex::new(Vec::<i32>::new()));
    let writer = {
        let acked = acked.clone();
        tokio::spawn(async move {
            let mut conn = PgConnection::connect_with(&options).await.unwrap();
            for id in 1.. {
                match sqlx::query("INSERT INTO acked VALUES ($1)")
                    .bind(id)
                    .execute(&mut conn)
                    .await
                {
                    Ok(_) => acked.lock().unwrap().push(id),
                    Err(_) => return,
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // kill -9 the primary's Patroni and postmaster.
    let data = files.root.join(&first_leader).join("data");
    let mut victims = patroni_pid(&files, &first_leader);
    assert_eq!(victims.len(), 1, "one Patroni for {first_leader}");
    victims.push(postmaster_pid(&data).expect("the primary's postmaster.pid"));
    let killed_at = Instant::now();
    kill9(&victims);
    tokio::time::timeout(Duration::from_secs(30), writer)
        .await
        .expect("the writer stops with the primary")
        .unwrap();
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > 5,
        "the writer committed rows before the crash ({})",
        acked.len()
    );

    // A new primary takes writes through the same DATABASE_URL.
    loop {
        if run_psql(&url, "INSERT INTO acked VALUES (-1)").is_ok() {
            break;
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(120),
            "no new primary after the crash\n{}",
            stack.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "failover: a write through DATABASE_URL succeeded {:?} after kill -9",
        killed_at.elapsed()
    );
    let list = acked
        .iter()
        .map(i32::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let present = run_psql(
        &url,
        &format!("SELECT count(*) FROM acked WHERE id IN ({list})"),
    )
    .unwrap();
    assert_eq!(
        present,
        acked.len().to_string(),
        "an acknowledged write was lost in the failover"
    );

    // The reconcile loop brings the dead member back: 3 healthy members again, the new primary recorded.
    let healed_leader = wait_healthy(&stack, &files, 3).await;
    assert_ne!(
        healed_leader, first_leader,
        "the crashed primary came back as a replica"
    );
    let deadline = Instant::now() + WAIT;
    loop {
        let recorded = details(&stack, &instance).await;
        let restored = recorded["last_recovered"]
            .as_array()
            .is_some_and(|r| r.iter().any(|m| m == first_leader.as_str()));
        if restored && recorded["primary"] == healed_leader.as_str() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the recovery was not recorded: {recorded}\n{}",
            stack.logs()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(
        patroni_pid(&files, &first_leader).len(),
        1,
        "the crashed member's Patroni runs again"
    );

    // Switchover through berth's endpoint: auth required, unknown candidates refused, then any healthy replica.
    let switchover = format!("/berth/v1/instances/{instance}/switchover");
    let anonymous = stack
        .http
        .post(format!("{}{switchover}", stack.base_url))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
    let (status, body) = stack
        .send(
            stack
                .request(Method::POST, &switchover)
                .json(&json!({"candidate": "m99"})),
        )
        .await
        .unwrap();
    assert_eq!(status, 422, "{body}");
    let (status, body) = stack
        .send(stack.request(Method::POST, &switchover))
        .await
        .unwrap();
    assert_eq!(status, 202, "{body}");
    operation_succeeds(&stack, &format!("{base}/last_operation")).await;
    let switched = wait_healthy(&stack, &files, 3).await;
    assert_ne!(switched, healed_leader, "the switchover moved the primary");
    assert_eq!(
        details(&stack, &instance).await["primary"],
        switched.as_str()
    );
    assert!(
        run_psql(&url, "INSERT INTO acked VALUES (-2)").is_ok(),
        "DATABASE_URL follows the switchover"
    );

    // Scale 3 → 5 → 3, one member at a time.
    for members in [5, 3] {
        let (status, body) = stack
            .send(
                stack
                    .request(Method::PATCH, &format!("{base}?accepts_incomplete=true"))
                    .json(&json!({
                        "service_id": ids.0, "parameters": {"members": members},
                    })),
            )
            .await
            .unwrap();
        assert_eq!(status, 202, "{body}");
        operation_succeeds(&stack, &format!("{base}/last_operation")).await;
        wait_healthy(&stack, &files, members).await;
        assert_eq!(files.state()["members"].as_array().unwrap().len(), members);
        assert_eq!(
            details(&stack, &instance).await["members"]
                .as_array()
                .unwrap()
                .len(),
            members
        );
    }
    for removed in ["m4", "m5"].iter().filter(|m| {
        files.state()["members"]
            .as_array()
            .unwrap()
            .iter()
            .all(|x| x["name"] != **m)
    }) {
        assert!(
            patroni_pid(&files, removed).is_empty(),
            "removed member {removed} still runs"
        );
    }
    assert_eq!(
        run_psql(&url, "SELECT count(*) > 0 FROM acked").unwrap(),
        "t",
        "the data survived the scaling"
    );

    // Unbind and deprovision: no process, port or file is left.
    let ports = files.all_ports();
    let (status, _) = stack
        .send(stack.request(
            Method::DELETE,
            &format!(
                "{binding}?service_id={}&plan_id={}&accepts_incomplete=true",
                ids.0, ids.1
            ),
        ))
        .await
        .unwrap();
    assert_eq!(status, 202);
    let (status, _) = stack
        .wait_operation(&format!("{binding}/last_operation"), WAIT)
        .await
        .unwrap();
    assert!(status == 200 || status == 410);
    assert!(
        run_psql(&url, "SELECT 1").is_err(),
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
        !files.root.exists(),
        "{} survived deprovision",
        files.root.display()
    );
    assert!(
        processes_under(&files.root).is_empty(),
        "a cluster process survived deprovision"
    );
    for port in ports {
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
            "port {port} still listens"
        );
    }
    stack.stop().await;
}
