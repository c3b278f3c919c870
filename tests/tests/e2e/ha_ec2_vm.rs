//! The `ha` plan on `HA_ENGINE=ec2` with VMs that really boot: moto keeps the EC2 state and the VM emulator
//! (docs/vm-emulator.md, started by scripts/test.sh) boots a container for each running instance at its private
//! address on a network matching its subnet, and runs its user-data. The worker sees only moto; the tests reach the
//! members the way an app in the VPC would (their private addresses, through the bridge).
//!
//! Each test makes its own VPC in moto (10.202.0.0/17 and 10.202.128.0/17: other emulated tests use other ranges)
//! with a subnet per zone, as the engine spreads members over zones.

use std::{
    collections::BTreeMap,
    process::Command,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use berth_tests::{Stack, plan_ids};
use reqwest::Method;
use serde_json::{Value, json};
use sqlx::{
    Connection, PgConnection,
    postgres::{PgConnectOptions, PgSslMode},
};

/// Boots, base backups and elections of several VMs on a busy 2-core machine: leave room.
const WAIT: Duration = Duration::from_secs(600);
const ZONES: [&str; 3] = ["us-east-1a", "us-east-1b", "us-east-1c"];

/// moto's EC2, through Python's boto3 (installed with moto; the tests crate has no AWS SDK).
#[derive(Clone)]
struct Moto {
    url: String,
    key: String,
    secret: String,
}

fn required(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run ./scripts/test.sh, which starts moto and the VM emulator")
    })
}

impl Moto {
    fn from_env() -> Self {
        assert_eq!(
            std::env::var("BERTH_TEST_VM_EMULATOR").as_deref(),
            Ok("1"),
            "the VM emulator is not running: run ./scripts/test.sh (docs/vm-emulator.md)"
        );
        Self {
            url: required("BERTH_TEST_MOTO_URL"),
            key: required("BERTH_TEST_MOTO_ACCESS_KEY"),
            secret: required("BERTH_TEST_MOTO_SECRET_KEY"),
        }
    }

    /// `aws_helper.py` (the emulator's hands on moto, docs/vm-emulator.md): one command, its JSON answer.
    fn helper(&self, args: &[&str]) -> Value {
        let out = Command::new("python3")
            .arg(berth_tests::repo_dir().join("scripts/vm-emulator/aws_helper.py"))
            .args(args)
            .env("BERTH_TEST_MOTO_URL", &self.url)
            .env("BERTH_TEST_MOTO_ACCESS_KEY", &self.key)
            .env("BERTH_TEST_MOTO_SECRET_KEY", &self.secret)
            .output()
            .expect("python3 runs");
        assert!(
            out.status.success(),
            "aws_helper.py {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn terminate(&self, vm: &str) {
        self.helper(&["terminate", vm]);
    }

    /// The instance's network interfaces left in moto (`aws_helper.py tagged` counts the rest).
    fn interfaces(&self, instance: &str) -> usize {
        const CALL: &str = "import boto3, json, sys\n\
            c = boto3.client('ec2', endpoint_url=sys.argv[1], region_name='us-east-1',\n\
                             aws_access_key_id=sys.argv[2], aws_secret_access_key=sys.argv[3])\n\
            f = [{'Name': 'tag:berth:instance', 'Values': [sys.argv[4]]}]\n\
            print(len(c.describe_network_interfaces(Filters=f)['NetworkInterfaces']))\n";
        let out = Command::new("python3")
            .args(["-c", CALL, &self.url, &self.key, &self.secret, instance])
            .output()
            .expect("python3 runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    }
}

/// The emulator's docker engine: the VMs' containers and the VPC's network.
struct Docker {
    host: String,
    /// The emulator's name: its containers are `<name>-<VM id>`, a VPC's network `<name>-us-east-1-<VPC id>`.
    name: String,
}

impl Docker {
    fn from_env() -> Self {
        Self {
            host: required("BERTH_TEST_VM_DOCKER_HOST"),
            name: required("BERTH_TEST_VM_NAME"),
        }
    }

    fn run(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new("docker")
            .arg("-H")
            .arg(&self.host)
            .args(args)
            .output()
            .expect("docker runs");
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
        }
    }

    fn container(&self, vm: &str) -> String {
        format!("{}-{vm}", self.name)
    }

    fn network(&self, vpc: &str) -> String {
        format!("{}-us-east-1-{vpc}", self.name)
    }

    /// `sql` run in `database` as the VM's postgres superuser on its Unix socket (reachable whatever its network
    /// does).
    fn psql_in(&self, vm: &str, database: &str, sql: &str) -> Result<String, String> {
        self.run(&[
            "exec",
            "-u",
            "postgres",
            &self.container(vm),
            "psql",
            "-h",
            "/var/run/postgresql",
            "-d",
            database,
            "-XqAtc",
            sql,
        ])
    }
}

/// One cluster under test: the stack, its instance, and how the tests reach its members.
struct Cluster {
    stack: Stack,
    moto: Moto,
    docker: Docker,
    vpc: String,
    instance: String,
    ids: (String, String),
    /// The cluster's CA (from a binding): Patroni's REST API and Postgres are TLS.
    ca: Option<String>,
    /// Every VM the cluster had: none may be left in docker after the deprovision.
    vms_seen: Mutex<std::collections::BTreeSet<String>>,
    _guard: VmsGuard,
}

/// A failing test never reaches the deprovision: its VMs are terminated on moto (the emulator removes them), so
/// they do not run on beside the next tests.
struct VmsGuard {
    moto: Moto,
    instance: String,
}

impl Drop for VmsGuard {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let left = self.moto.helper(&["tagged", &self.instance]);
        for vm in left["vms"].as_array().into_iter().flatten() {
            if let Some(id) = vm["id"].as_str() {
                self.moto.terminate(id);
            }
        }
    }
}

impl Cluster {
    /// A stack on `HA_ENGINE=ec2` and moto, in a VPC of its own (`vpc_cidr`) that the emulator follows.
    async fn start(vpc_cidr: &str) -> Self {
        let moto = Moto::from_env();
        let docker = Docker::from_env();
        let network = moto.helper(&["vpc", vpc_cidr, "ha-ec2-vm"]);
        let subnets: Vec<&str> = ZONES
            .iter()
            .map(|z| network["subnets"][z].as_str().unwrap())
            .collect();
        let stack = Stack::start_with(vec![
            ("HA_ENGINE", "ec2".into()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_ENDPOINT_URL", moto.url.clone()),
            ("AWS_ACCESS_KEY_ID", moto.key.clone()),
            ("AWS_SECRET_ACCESS_KEY", moto.secret.clone()),
            (
                "EC2_AMI_X86_64",
                network["ami_x86_64"].as_str().unwrap().into(),
            ),
            (
                "EC2_AMI_ARM64",
                network["ami_arm64"].as_str().unwrap().into(),
            ),
            ("EC2_SUBNET_IDS", subnets.join(",")),
            ("EC2_READINESS_PROBE", "true".into()),
        ])
        .await
        .unwrap();
        let ids = plan_ids(&stack.catalog().await.unwrap(), "postgres", "ha");
        let instance = uuid::Uuid::new_v4().to_string();
        Self {
            stack,
            _guard: VmsGuard {
                moto: moto.clone(),
                instance: instance.clone(),
            },
            moto,
            docker,
            vpc: network["vpc"].as_str().unwrap().to_string(),
            instance,
            ids,
            ca: None,
            vms_seen: Default::default(),
        }
    }

    fn base(&self) -> String {
        format!("/v2/service_instances/{}", self.instance)
    }

    /// Provisions 3 synchronous members on PostgreSQL 15 (the VM image's) over the 3 zones; how long it took.
    async fn provision(&self) -> Duration {
        let started = Instant::now();
        let body = json!({
            "service_id": self.ids.0, "plan_id": self.ids.1, "organization_guid": "org", "space_guid": "space",
            "parameters": {
                "members": 3, "synchronous": true, "postgres_version": "15", "zones": ZONES,
                "storage_min": 2, "extensions": ["pgcrypto"],
            },
        });
        self.stack.put_until_done(&self.base(), &body, WAIT).await;
        started.elapsed()
    }

    /// Binds an app; its credentials (and the CA kept for the REST API).
    async fn bind(&mut self, app: &str) -> Value {
        let path = format!("{}/service_bindings/{app}", self.base());
        let body = json!({ "service_id": self.ids.0, "plan_id": self.ids.1, "app_guid": app });
        self.stack.put_until_done(&path, &body, WAIT).await;
        let creds = self.stack.fetch_credentials(&path).await;
        self.ca = Some(creds["ca_certificate"].as_str().unwrap().to_string());
        creds
    }

    /// The member slots as the engine records them: name → (private address, VM id).
    async fn members(&self) -> BTreeMap<String, (String, String)> {
        let details = self.stack.instance_details(&self.instance).await;
        let slots = details["ha_ec2"]["members"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        self.vms_seen.lock().unwrap().extend(
            slots
                .iter()
                .filter_map(|m| m["vm_id"].as_str())
                .map(str::to_string),
        );
        slots
            .iter()
            .filter(|m| m["retiring"] != true)
            .map(|m| {
                (
                    m["name"].as_str().unwrap().to_string(),
                    (
                        m["private_ip"].as_str().unwrap_or_default().to_string(),
                        m["vm_id"].as_str().unwrap_or_default().to_string(),
                    ),
                )
            })
            .collect()
    }

    fn http(&self) -> reqwest::Client {
        let mut builder = reqwest::Client::builder().timeout(Duration::from_secs(3));
        if let Some(ca) = &self.ca {
            builder = builder
                .add_root_certificate(reqwest::Certificate::from_pem(ca.as_bytes()).unwrap());
        }
        builder.build().unwrap()
    }

    /// Patroni's view of the cluster (`GET /cluster` over TLS), from the first member in `from` that answers.
    async fn patroni(&self, from: &[String]) -> Option<Value> {
        let http = self.http();
        for ip in from {
            if let Ok(response) = http.get(format!("https://{ip}:8008/cluster")).send().await
                && let Ok(body) = response.json::<Value>().await
            {
                return Some(body);
            }
        }
        None
    }

    /// Waits until Patroni lists `n` members, one leader and `n - 1` streaming replicas; the leader's name.
    async fn wait_healthy(&self, n: usize) -> String {
        let deadline = Instant::now() + WAIT;
        let mut seen = Value::Null;
        loop {
            let ips: Vec<String> = self.members().await.into_values().map(|m| m.0).collect();
            if let Some(cluster) = self.patroni(&ips).await {
                let members = cluster["members"].as_array().cloned().unwrap_or_default();
                let leader = members
                    .iter()
                    .find(|m| m["role"] == "leader" && m["state"] == "running");
                let streaming = members
                    .iter()
                    .filter(|m| {
                        m["role"] != "leader"
                            && (m["state"] == "streaming" || m["state"] == "running")
                            && m["lag"].is_number()
                    })
                    .count();
                if let Some(leader) = leader
                    && members.len() == n
                    && streaming == n - 1
                {
                    return leader["name"].as_str().unwrap().to_string();
                }
                seen = cluster;
            }
            assert!(
                Instant::now() < deadline,
                "the cluster did not reach {n} healthy members; Patroni last said {seen}\n{}",
                self.stack.logs()
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// etcd's members (through etcd's JSON gateway on a member that answers): name → (id, peer URL).
    async fn etcd_members(&self) -> BTreeMap<String, (String, String)> {
        let http = self.http();
        for (ip, _) in self.members().await.into_values() {
            let Ok(response) = http
                .post(format!("http://{ip}:2379/v3/cluster/member/list"))
                .json(&json!({}))
                .send()
                .await
            else {
                continue;
            };
            let Ok(body) = response.json::<Value>().await else {
                continue;
            };
            return body["members"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| {
                    (
                        m["name"].as_str().unwrap_or("-").to_string(),
                        (
                            m["ID"].as_str().unwrap_or_default().to_string(),
                            m["peerURLs"][0].as_str().unwrap_or_default().to_string(),
                        ),
                    )
                })
                .collect();
        }
        panic!("no member's etcd answered");
    }

    async fn update_members(&self, members: usize) {
        let (status, body) = self
            .stack
            .send(
                self.stack
                    .request(
                        Method::PATCH,
                        &format!("{}?accepts_incomplete=true", self.base()),
                    )
                    .json(&json!({ "service_id": self.ids.0, "parameters": {"members": members} })),
            )
            .await
            .unwrap();
        assert_eq!(status, 202, "{body}");
        self.stack.wait_succeeded(&self.base(), WAIT).await;
    }

    /// Deprovisions: nothing of the instance is left in moto, and no container, network or loop device of it in
    /// the emulator's docker.
    async fn deprovision(self) {
        self.members().await;
        let volumes: Vec<String> = self.moto.helper(&["tagged", &self.instance])["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["id"].as_str().unwrap().to_string())
            .collect();
        let (status, last) = self
            .stack
            .delete_until_done(&self.base(), &self.ids, WAIT)
            .await;
        assert!(
            status == 410 || (status == 200 && last["state"] == "succeeded"),
            "{status} {last}\n{}",
            self.stack.logs()
        );
        let left = self.moto.helper(&["tagged", &self.instance]);
        for kind in ["vms", "volumes", "addresses", "security_groups"] {
            assert_eq!(left[kind], json!([]), "{kind} left in moto: {left}");
        }
        assert_eq!(
            self.moto.interfaces(&self.instance),
            0,
            "interfaces left in moto"
        );
        // The emulator follows within a poll or two.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let containers = self
                .docker
                .run(&["ps", "-a", "--format", "{{.Names}}"])
                .unwrap();
            let networks = self
                .docker
                .run(&["network", "ls", "--format", "{{.Name}}"])
                .unwrap();
            let status = std::fs::read_to_string(
                std::path::Path::new(&required("BERTH_TEST_VM_STATE_DIR")).join("status.json"),
            )
            .unwrap_or_default();
            let left: Vec<String> = self
                .vms_seen
                .lock()
                .unwrap()
                .iter()
                .map(|vm| self.docker.container(vm))
                .filter(|c| containers.lines().any(|l| l == c))
                .chain(
                    Some(self.docker.network(&self.vpc))
                        .filter(|n| networks.lines().any(|l| l == n)),
                )
                .chain(
                    volumes
                        .iter()
                        .filter(|v| status.contains(v.as_str()))
                        .cloned(),
                )
                .collect();
            if left.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "left in the emulator's docker after the deprovision: {left:?}"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        self.moto.helper(&["delete-vpc", &self.vpc]);
        self.stack.stop().await;
    }
}

pub(crate) fn psql() -> std::path::PathBuf {
    broker::embedded::find_bin_dir().unwrap().join("psql")
}

/// Runs `sql` through libpq (psql) with `url`; the output, or the error.
pub(crate) fn run_psql(url: &str, sql: &str) -> Result<String, String> {
    let out = Command::new(psql())
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

/// A writer committing rows one by one on `primary` (one connection, as an app would keep it): the ids the
/// primary acknowledged, and when its first write failed, once it stops.
struct Writer {
    acked: Arc<Mutex<Vec<i32>>>,
    task: tokio::task::JoinHandle<Instant>,
}

impl Writer {
    async fn start(creds: &Value, primary: &str) -> Self {
        let options = PgConnectOptions::new()
            .host(primary)
            .port(5432)
            .username(creds["PGUSER"].as_str().unwrap())
            .password(creds["PGPASSWORD"].as_str().unwrap())
            .database(creds["PGDATABASE"].as_str().unwrap())
            .ssl_mode(PgSslMode::Require);
        let acked = Arc::new(Mutex::new(Vec::<i32>::new()));
        let mut conn = PgConnection::connect_with(&options).await.unwrap();
        let task = {
            let acked = acked.clone();
            tokio::spawn(async move {
                for id in 1.. {
                    let write = sqlx::query("INSERT INTO acked VALUES ($1)")
                        .bind(id)
                        .execute(&mut conn);
                    match tokio::time::timeout(Duration::from_secs(5), write).await {
                        Ok(Ok(_)) => acked.lock().unwrap().push(id),
                        _ => break,
                    }
                }
                Instant::now()
            })
        };
        tokio::time::sleep(Duration::from_millis(2000)).await;
        Self { acked, task }
    }

    /// Waits for the writer to stop; every acknowledged id and when it stopped.
    async fn stopped(self) -> (Vec<i32>, Instant) {
        let stopped = tokio::time::timeout(Duration::from_secs(60), self.task)
            .await
            .expect("the writer stops with its primary")
            .unwrap();
        let acked = self.acked.lock().unwrap().clone();
        assert!(
            acked.len() > 5,
            "the writer committed rows first ({})",
            acked.len()
        );
        (acked, stopped)
    }
}

/// Waits for a write through DATABASE_URL to succeed (a new primary); when it did.
async fn first_write(stack: &Stack, url: &str, since: Instant) -> Instant {
    loop {
        if run_psql(url, "INSERT INTO acked VALUES (-1) ON CONFLICT DO NOTHING").is_ok() {
            return Instant::now();
        }
        assert!(
            since.elapsed() < Duration::from_secs(180),
            "no new primary took a write\n{}",
            stack.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn assert_every_acked_write_is_there(url: &str, acked: &[i32]) {
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
        "an acknowledged write was lost"
    );
}

#[tokio::test]
async fn ha_ec2_vms_form_a_cluster_lose_the_primary_vm_and_heal() {
    let mut cluster = Cluster::start("10.202.0.0/17").await;
    let provisioned = cluster.provision().await;
    eprintln!("bench: ha_ec2 provision→ready (3 VMs): {provisioned:.1?}");
    let creds = cluster.bind("app").await;
    let first_leader = cluster.wait_healthy(3).await;
    let members = cluster.members().await;
    assert_eq!(members.len(), 3);
    // One etcd cluster and one Patroni cluster across the three VMs, one per subnet (zone).
    let etcd = cluster.etcd_members().await;
    assert_eq!(
        etcd.keys().collect::<Vec<_>>(),
        ["m1", "m2", "m3"],
        "{etcd:?}"
    );
    let subnets: std::collections::BTreeSet<String> = members
        .values()
        .map(|(ip, _)| ip.rsplit_once('.').unwrap().0.to_string())
        .collect();
    assert_eq!(
        subnets.len(),
        3,
        "one member per zone's subnet: {members:?}"
    );

    // The binding's multi-host DATABASE_URL names the three VMs and writes on the primary.
    let url = creds["DATABASE_URL"].as_str().unwrap().to_string();
    for (ip, _) in members.values() {
        assert!(url.contains(&format!("{ip}:5432")), "{url}");
    }
    run_psql(&url, "CREATE TABLE acked (id int PRIMARY KEY)").unwrap();
    assert_eq!(run_psql(&url, "SELECT pg_is_in_recovery()").unwrap(), "f");

    // The primary's VM is terminated under a writer: a new primary takes writes through the same URL, with every
    // write the old one acknowledged (synchronous mode).
    let (primary_ip, primary_vm) = members[&first_leader].clone();
    let writer = Writer::start(&creds, &primary_ip).await;
    let killed = Instant::now();
    cluster.moto.terminate(&primary_vm);
    // The emulator removes the VM's container within a poll or two of moto's change: the VM's real death.
    let container = cluster.docker.container(&primary_vm);
    while cluster
        .docker
        .run(&["inspect", "--format", "{{.Id}}", &container])
        .is_ok()
    {
        assert!(
            killed.elapsed() < Duration::from_secs(60),
            "the VM never went"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let gone = Instant::now();
    let (acked, _) = writer.stopped().await;
    let written = first_write(&cluster.stack, &url, killed).await;
    eprintln!(
        "bench: ha_ec2 kill-VM failover: write outage {:.1?} from the VM's removal ({:.1?} from TerminateInstances) \
         to the first acknowledged write through DATABASE_URL on the new primary",
        written - gone,
        written - killed
    );
    assert_every_acked_write_is_there(&url, &acked);
    let new_leader = cluster.wait_healthy(3).await;
    assert_ne!(new_leader, first_leader, "the killed member does not lead");

    // The reconcile loop launches a replacement in the dead member's slot (same address); it removes the dead
    // etcd member and joins in its place, and Patroni clones it.
    let deadline = Instant::now() + WAIT;
    loop {
        let now = cluster.members().await;
        if now[&first_leader].1 != primary_vm && !now[&first_leader].1.is_empty() {
            assert_eq!(
                now[&first_leader].0, primary_ip,
                "the slot keeps its address"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no replacement VM\n{}",
            cluster.stack.logs()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(cluster.wait_healthy(3).await, new_leader);
    let healed = cluster.etcd_members().await;
    assert_eq!(
        healed.keys().collect::<Vec<_>>(),
        ["m1", "m2", "m3"],
        "{healed:?}"
    );
    assert_ne!(
        healed[&first_leader].0, etcd[&first_leader].0,
        "the dead etcd member was removed and the replacement added"
    );
    assert_every_acked_write_is_there(&url, &acked);

    cluster.deprovision().await;
}

#[tokio::test]
async fn ha_ec2_vms_scale_and_survive_a_partition_of_the_primary() {
    let mut cluster = Cluster::start("10.202.128.0/17").await;
    cluster.provision().await;
    let creds = cluster.bind("app").await;
    let url = creds["DATABASE_URL"].as_str().unwrap().to_string();
    let database = creds["PGDATABASE"].as_str().unwrap().to_string();
    cluster.wait_healthy(3).await;
    run_psql(&url, "CREATE TABLE acked (id int PRIMARY KEY)").unwrap();

    // Scale 3 → 5 → 3, one member at a time; etcd follows (the scale-down's members are pruned by the others).
    for n in [5, 3] {
        cluster.update_members(n).await;
        cluster.wait_healthy(n).await;
        let deadline = Instant::now() + WAIT;
        while cluster.etcd_members().await.len() != n {
            assert!(
                Instant::now() < deadline,
                "etcd never had {n} members: {:?}",
                cluster.etcd_members().await
            );
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    // A partition of the primary's VM (docker network disconnect: its cable pulled). Cut off from etcd's quorum,
    // its Patroni cannot renew the leader key and demotes it: it stops taking writes. The others elect a new
    // primary, which takes writes through the same DATABASE_URL. When the partition heals, the old primary
    // rejoins as a replica of the new one (pg_rewind), and the new primary keeps leading: the healed member's
    // etcd, stale until it catches up, must not make it step down (docs/ha.md).
    let leader = cluster.wait_healthy(3).await;
    let members = cluster.members().await;
    let (old_ip, old_vm) = members[&leader].clone();
    run_psql(&url, "INSERT INTO acked VALUES (1)").unwrap();
    let (container, network) = (
        cluster.docker.container(&old_vm),
        cluster.docker.network(&cluster.vpc),
    );
    let cut = Instant::now();
    cluster
        .docker
        .run(&["network", "disconnect", &network, &container])
        .unwrap();
    // Patroni demotes it "offline": PostgreSQL stops, and later starts again read-only. Either way no write.
    loop {
        let primary = cluster
            .docker
            .psql_in(&old_vm, &database, "SELECT pg_is_in_recovery()");
        if primary.as_deref() != Ok("f") {
            break;
        }
        assert!(
            cut.elapsed() < Duration::from_secs(90),
            "the cut-off primary never stopped taking writes"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let demoted = cut.elapsed();
    let refused = cluster
        .docker
        .psql_in(&old_vm, &database, "INSERT INTO acked VALUES (2)");
    assert!(
        refused.is_err(),
        "the cut-off old primary refuses writes: {refused:?}"
    );
    let others: Vec<String> = members
        .iter()
        .filter(|(name, _)| **name != leader)
        .map(|(_, (ip, _))| ip.clone())
        .collect();
    let new_leader = loop {
        let view = cluster.patroni(&others).await.unwrap_or_default();
        let elected = view["members"].as_array().and_then(|m| {
            m.iter().find(|m| {
                m["role"] == "leader" && m["state"] == "running" && m["name"] != leader.as_str()
            })
        });
        if let Some(elected) = elected {
            break elected["name"].as_str().unwrap().to_string();
        }
        assert!(
            cut.elapsed() < Duration::from_secs(120),
            "no new primary was elected: {view}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let written = first_write(&cluster.stack, &url, cut).await;
    eprintln!(
        "partition of the primary's VM: it stopped taking writes after {demoted:.1?}; the new primary took a write through \
         DATABASE_URL after {:.1?}",
        written - cut
    );
    let healed = Instant::now();
    cluster
        .docker
        .run(&["network", "connect", "--ip", &old_ip, &network, &container])
        .unwrap();
    assert_eq!(
        cluster.wait_healthy(3).await,
        new_leader,
        "the healed member rejoins as a replica"
    );
    // Streaming for real: on the new primary's timeline (rewound), not the read-only restart of its old data.
    let leader_ip = members[&new_leader].0.clone();
    loop {
        let view = cluster
            .patroni(std::slice::from_ref(&leader_ip))
            .await
            .unwrap_or_default();
        let listed = view["members"].as_array().cloned().unwrap_or_default();
        let timeline_of = |name: &str| {
            listed
                .iter()
                .find(|m| m["name"] == name)
                .map(|m| m["timeline"].clone())
        };
        let old = listed.iter().find(|m| m["name"] == leader.as_str());
        if let (Some(old), Some(timeline)) = (old, timeline_of(&new_leader))
            && timeline.is_number()
            && old["timeline"] == timeline
            && old["lag"].is_number()
        {
            break;
        }
        assert!(
            healed.elapsed() < WAIT,
            "the old primary never streamed on the new timeline: {view}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let streaming = healed.elapsed();
    assert_eq!(
        cluster
            .docker
            .psql_in(&old_vm, &database, "SELECT pg_is_in_recovery()")
            .as_deref(),
        Ok("t")
    );
    eprintln!(
        "partition healed: the old primary streams as a replica of the new one after {streaming:.1?}"
    );
    // The leadership stays put once the old primary is back: every member's Patroni names the new primary for
    // longer than a leader key lives (a new primary made to step down would lose its key within the ttl).
    let all: Vec<String> = members.values().map(|(ip, _)| ip.clone()).collect();
    let steady = Instant::now();
    while steady.elapsed() < Duration::from_secs(10) {
        for ip in &all {
            // A member slow to answer (3 s) is asked again on the next round.
            let Some(view) = cluster.patroni(std::slice::from_ref(ip)).await else {
                continue;
            };
            let leader = view["members"].as_array().and_then(|listed| {
                listed.iter().find_map(|m| {
                    (m["role"] == "leader")
                        .then(|| m["name"].as_str().unwrap_or_default().to_string())
                })
            });
            assert_eq!(
                leader.as_deref(),
                Some(new_leader.as_str()),
                "the leadership moved after the heal (view from {ip}): {view}"
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(
        run_psql(&url, "SELECT count(*) FROM acked WHERE id IN (1, -1)").unwrap(),
        "2",
        "the writes before and during the partition are on the new primary"
    );

    cluster.deprovision().await;
}
