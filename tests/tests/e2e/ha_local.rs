//! The `ha` plan on the `ha_local` engine through the real binaries, with real etcd and Patroni: a 3-member
//! synchronous cluster is provisioned, bound and written to through its multi-host DATABASE_URL (libpq's
//! psql), loses its primary to kill -9 without losing an acknowledged write, is healed back to 3 members by
//! the reconcile loop, switches over on request, scales 3 → 5 → 3, and leaves nothing behind.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use berth_tests::{Stack, kill_all, plan_ids, postmaster_pid, processes_under};
use reqwest::Method;
use serde_json::{Value, json};
use sqlx::{
    Connection, PgConnection,
    postgres::{PgConnectOptions, PgSslMode},
};

/// Cluster bootstraps and base backups on a busy 2-core machine: leave room.
pub(crate) const WAIT: Duration = Duration::from_secs(300);

/// The cluster's folder and what it remembers (ports, members, passwords), as the engine wrote them.
pub(crate) struct ClusterFiles {
    pub(crate) root: PathBuf,
}

impl ClusterFiles {
    pub(crate) fn state(&self) -> Value {
        serde_json::from_slice(&std::fs::read(self.root.join("cluster.json")).unwrap()).unwrap()
    }
    pub(crate) fn superuser_password(&self) -> String {
        let secrets: Value =
            serde_json::from_slice(&std::fs::read(self.root.join("secrets.json")).unwrap())
                .unwrap();
        secrets["superuser"].as_str().unwrap().to_string()
    }
    pub(crate) fn member(&self, name: &str) -> Value {
        self.state()["members"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == name)
            .cloned()
            .unwrap()
    }
    pub(crate) fn api_ports(&self) -> Vec<u64> {
        self.state()["members"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["api_port"].as_u64().unwrap())
            .collect()
    }
    pub(crate) fn all_ports(&self) -> Vec<u16> {
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
    pub(crate) async fn superuser(&self, port: u16) -> PgConnection {
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
pub(crate) async fn wait_healthy(stack: &Stack, files: &ClusterFiles, n: usize) -> String {
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
pub(crate) fn run_psql(url: &str, sql: &str) -> Result<String, String> {
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

#[tokio::test]
async fn ha_cluster_fails_over_heals_switches_scales_and_leaves_nothing() {
    let stack = Stack::start().await.unwrap();
    let ids = plan_ids(&stack.catalog().await.unwrap(), "postgres", "ha");
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
    let provision = json!({
        "service_id": ids.0, "plan_id": ids.1, "organization_guid": "org", "space_guid": "space",
        "parameters": {"members": 3, "synchronous": true, "extensions": ["pgcrypto"]},
    });
    let provisioning = Instant::now();
    stack.put_until_done(&base, &provision, WAIT).await;
    let first_leader = wait_healthy(&stack, &files, 3).await;
    eprintln!(
        "bench: ha_local provision→ready (3 members): {:.1?}",
        provisioning.elapsed()
    );
    assert_a_synchronous_tls_only_cluster(&stack, &files, &instance, &first_leader).await;

    // Bind: multi-host URLs, endpoints for every member.
    let binding = format!("{base}/service_bindings/app");
    let bind = json!({ "service_id": ids.0, "plan_id": ids.1, "app_guid": "app-1" });
    stack.put_until_done(&binding, &bind, WAIT).await;
    let fetched = stack.fetch_binding(&binding).await;
    let creds = &fetched["credentials"];
    let url = assert_multi_host_urls(&fetched);

    // A writer commits rows one by one on the primary while its Patroni and postmaster die (kill -9); a new
    // primary takes writes through the same DATABASE_URL with every acknowledged write.
    let (acked, killed_at) = kill_the_primary_under_a_writer(&files, &first_leader, creds).await;
    assert_a_new_primary_has_every_acked_write(&stack, &url, &acked, killed_at).await;

    // The reconcile loop brings the dead member back: 3 healthy members again, the new primary recorded.
    let healed_leader = wait_healthy(&stack, &files, 3).await;
    assert_ne!(
        healed_leader, first_leader,
        "the crashed primary came back as a replica"
    );
    wait_for_the_recovery_record(&stack, &instance, &first_leader, &healed_leader).await;
    assert_eq!(
        patroni_pid(&files, &first_leader).len(),
        1,
        "the crashed member's Patroni runs again"
    );

    // Switchover through berth's endpoint: auth required, unknown candidates refused, then any healthy replica.
    request_a_switchover(&stack, &instance).await;
    let switched = wait_healthy(&stack, &files, 3).await;
    assert_ne!(switched, healed_leader, "the switchover moved the primary");
    assert_eq!(
        stack.instance_details(&instance).await["primary"],
        switched.as_str()
    );
    assert!(
        run_psql(&url, "INSERT INTO acked VALUES (-2)").is_ok(),
        "DATABASE_URL follows the switchover"
    );

    // Scale 3 → 5 → 3, one member at a time.
    scale_three_to_five_to_three(&stack, &files, &instance, &ids).await;
    assert_eq!(
        run_psql(&url, "SELECT count(*) > 0 FROM acked").unwrap(),
        "t",
        "the data survived the scaling"
    );

    // Unbind and deprovision: no process, port or file is left.
    let ports = files.all_ports();
    let (status, _) = stack.delete_until_done(&binding, &ids, WAIT).await;
    assert!(status == 200 || status == 410);
    assert!(
        run_psql(&url, "SELECT 1").is_err(),
        "an unbound role still logs in"
    );
    let (status, last) = stack.delete_until_done(&base, &ids, WAIT).await;
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

/// Recorded with 3 members, synchronous, a short TTL; the leader is a primary naming a synchronous standby,
/// admitting only TLS from 127.0.0.1; the superuser's password is in no log.
async fn assert_a_synchronous_tls_only_cluster(
    stack: &Stack,
    files: &ClusterFiles,
    instance: &str,
    leader: &str,
) {
    let recorded = stack.instance_details(instance).await;
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
    let leader_port = files.member(leader)["pg_port"].as_u64().unwrap() as u16;
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
    let log = std::fs::read_to_string(files.root.join(format!("{leader}/patroni.log")))
        .unwrap_or_default();
    assert!(
        !log.contains(&files.superuser_password()),
        "a password reached Patroni's log"
    );
    assert!(
        !stack.logs().contains(&files.superuser_password()),
        "a password reached berth's logs"
    );
}

/// The binding's DATABASE_URL names all 3 members and reaches the primary; its read-only URL prefers a standby;
/// endpoints for every member and the CA come with it. Creates the table `acked` (row 0); returns DATABASE_URL.
fn assert_multi_host_urls(fetched: &Value) -> String {
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
    url
}

/// Starts a writer committing rows one by one on the primary, then kill -9s the primary's Patroni and postmaster;
/// returns every id the primary acknowledged and when it was killed.
async fn kill_the_primary_under_a_writer(
    files: &ClusterFiles,
    leader: &str,
    creds: &Value,
) -> (Vec<i32>, Instant) {
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

    let data = files.root.join(leader).join("data");
    let mut victims = patroni_pid(files, leader);
    assert_eq!(victims.len(), 1, "one Patroni for {leader}");
    victims.push(postmaster_pid(&data).expect("the primary's postmaster.pid"));
    let killed_at = Instant::now();
    kill_all(victims);
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
    (acked, killed_at)
}

/// A new primary takes writes through DATABASE_URL within 2 minutes, and no acknowledged write was lost.
async fn assert_a_new_primary_has_every_acked_write(
    stack: &Stack,
    url: &str,
    acked: &[i32],
    killed_at: Instant,
) {
    loop {
        if run_psql(url, "INSERT INTO acked VALUES (-1)").is_ok() {
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
        "bench: ha_local kill -9 failover: write outage {:.1?} (a write through DATABASE_URL succeeded after the \
         primary's Patroni and postmaster were killed)",
        killed_at.elapsed()
    );
    let list = acked
        .iter()
        .map(i32::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let present = run_psql(
        url,
        &format!("SELECT count(*) FROM acked WHERE id IN ({list})"),
    )
    .unwrap();
    assert_eq!(
        present,
        acked.len().to_string(),
        "an acknowledged write was lost in the failover"
    );
}

/// Waits until the instance's details record the crashed member as recovered and the new primary.
async fn wait_for_the_recovery_record(stack: &Stack, instance: &str, crashed: &str, primary: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let recorded = stack.instance_details(instance).await;
        let restored = recorded["last_recovered"]
            .as_array()
            .is_some_and(|r| r.iter().any(|m| m == crashed));
        if restored && recorded["primary"] == primary {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the recovery was not recorded: {recorded}\n{}",
            stack.logs()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// POSTs berth's switchover endpoint: refused without auth and for an unknown candidate; then `berth switchover`
/// (any healthy replica) waits for it.
pub(crate) async fn request_a_switchover(stack: &Stack, instance: &str) {
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
    // Accepted and waited for by the command line, as a person would.
    let out = tokio::process::Command::new(berth_tests::bin_dir().join("berth"))
        .args(["switchover", instance, "--timeout", "10m", "--json"])
        .env("BERTH_URL", &stack.base_url)
        .env("BROKER_USERNAME", &stack.username)
        .env("BROKER_PASSWORD", &stack.password)
        .output()
        .await
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}\n{}", stack.logs());
    let done: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(done["state"], "succeeded", "{done}");
    stack
        .wait_succeeded(&format!("/v2/service_instances/{instance}"), WAIT)
        .await;
}

/// Updates the member count to 5, then back to 3; each time the cluster is healthy with that many members,
/// recorded; the removed members' Patroni no longer runs.
async fn scale_three_to_five_to_three(
    stack: &Stack,
    files: &ClusterFiles,
    instance: &str,
    ids: &(String, String),
) {
    let base = format!("/v2/service_instances/{instance}");
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
        stack.wait_succeeded(&base, WAIT).await;
        wait_healthy(stack, files, members).await;
        assert_eq!(files.state()["members"].as_array().unwrap().len(), members);
        assert_eq!(
            stack.instance_details(instance).await["members"]
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
            patroni_pid(files, removed).is_empty(),
            "removed member {removed} still runs"
        );
    }
}
