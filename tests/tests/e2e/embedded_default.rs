//! The embedded default: `berth-api` with no `DATABASE_URL` and no credentials brings its own Postgres under
//! its data folder, prints the URL and the credentials it made, runs a worker, serves a `shared` database end
//! to end, stops everything on SIGTERM, and on the next start finds its credentials and data again.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Stdio,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use berth_tests::{
    OsbClient, TestFolder, bin_dir, free_port, kill_all, plan_ids, processes_under, repo_dir,
};
use reqwest::Method;
use serde_json::{Value, json};
use sqlx::{Connection, PgConnection};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};

const WAIT: Duration = Duration::from_secs(90);

/// One run of `berth-api` in the embedded default, its stdout collected line by line.
struct Embedded {
    child: Child,
    output: Arc<Mutex<Vec<String>>>,
    /// With the URL and credentials the banner printed.
    client: OsbClient,
}

impl std::ops::Deref for Embedded {
    type Target = OsbClient;

    fn deref(&self) -> &OsbClient {
        &self.client
    }
}

impl Embedded {
    /// Starts `berth-api` with a bare environment (no DATABASE_URL, no broker credentials) and waits for its
    /// banner.
    async fn start(dir: &Path, port: u16) -> Self {
        let mut child = command(dir, port)
            .stdout(Stdio::piped())
            .stderr(Stdio::from(
                std::fs::File::create(dir.join(format!("api-{port}.log"))).unwrap(),
            ))
            .kill_on_drop(true)
            .spawn()
            .expect("starting berth-api");
        let output = Arc::new(Mutex::new(Vec::new()));
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let sink = output.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                sink.lock().unwrap().push(line);
            }
        });
        let deadline = Instant::now() + WAIT;
        let (base_url, username, password) = loop {
            {
                let lines = output.lock().unwrap();
                let field = |name: &str| {
                    lines
                        .iter()
                        .find_map(|l| l.trim().strip_prefix(name).map(|v| v.trim().to_string()))
                };
                if let (Some(url), Some(user), Some(pass)) =
                    (field("broker URL:"), field("username:"), field("password:"))
                {
                    break (url, user, pass);
                }
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "berth-api exited ({status}) before its banner: {:?}\n{}",
                    output.lock().unwrap(),
                    log(dir, port)
                );
            }
            assert!(
                Instant::now() < deadline,
                "no banner after {WAIT:?}: {:?}",
                output.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        Self {
            child,
            output,
            client: OsbClient::new(base_url, username, password).unwrap(),
        }
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> (u16, Value) {
        self.client.send(req).await.expect("request")
    }

    /// Polls a last_operation URL until it leaves `in progress`; returns its body.
    async fn wait_operation(&self, path: &str) -> Value {
        let (status, body) = self.client.wait_operation(path, WAIT).await.unwrap();
        assert_eq!(status, 200, "{path}: {body}");
        body
    }

    /// SIGTERM, as Ctrl-C would; waits for a clean exit and returns what it printed.
    async fn stop(mut self) -> Vec<String> {
        let pid = self.child.id().expect("running");
        let sent = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status()
            .unwrap();
        assert!(sent.success());
        let status = tokio::time::timeout(Duration::from_secs(60), self.child.wait())
            .await
            .expect("berth-api stops within 60 s of SIGTERM")
            .unwrap();
        assert!(status.success(), "berth-api exited with {status}");
        tokio::time::sleep(Duration::from_millis(200)).await;
        self.output.lock().unwrap().clone()
    }
}

/// `berth-api` with a bare environment (no DATABASE_URL, no broker credentials) in `dir`.
fn command(dir: &Path, port: u16) -> Command {
    let mut cmd = Command::new(bin_dir().join("berth-api"));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("BERTH_DATA_DIR", dir.join(".berth"))
        .env("PLANS_DIR", repo_dir().join("plans"))
        .env("PORT", port.to_string())
        .env("RUST_LOG", "info")
        // No warm pool: its pooled servers would outlive the stop these tests check (as instances' servers do).
        .env("POOL_TARGETS", "")
        .current_dir(dir);
    cmd
}

fn log(dir: &Path, port: u16) -> String {
    std::fs::read_to_string(dir.join(format!("api-{port}.log"))).unwrap_or_default()
}

#[tokio::test]
async fn embedded_default_from_nothing_to_a_working_database_and_back() {
    let dir = std::env::temp_dir().join(format!(
        "berth-embedded-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let folder = TestFolder(dir.clone());
    let port = free_port().unwrap();

    let first = Embedded::start(&dir, port).await;
    assert_eq!(first.base_url, format!("http://127.0.0.1:{port}"));
    assert_eq!(first.username, "berth");
    assert!(first.password.len() >= 20, "a generated password");
    let banner = first.output.lock().unwrap().join("\n");
    assert!(
        banner.contains("plain HTTP (no TLS) on 127.0.0.1: only this machine can reach it"),
        "the banner says how and where it listens: {banner}"
    );
    // What it made for itself: the server, the key and the credentials (private).
    let data = dir.join(".berth");
    assert!(data.join("postgres/data/PG_VERSION").exists());
    assert!(data.join("master.key").exists());
    let credentials = data.join("broker-credentials.json");
    assert_eq!(
        std::fs::metadata(&credentials)
            .unwrap()
            .permissions()
            .mode()
            & 0o077,
        0,
        "credentials file is private"
    );
    // The password is printed for the operator, and never logged.
    assert!(
        !log(&dir, port).contains(&first.password),
        "the password reached the log"
    );

    // Wrong credentials are refused.
    let (status, _) = first
        .send(
            first
                .http
                .get(format!("{}/v2/catalog", first.base_url))
                .basic_auth("berth", Some("wrong"))
                .header("X-Broker-API-Version", "2.17"),
        )
        .await;
    assert_eq!(status, 401);

    // A shared database, provisioned and bound through the embedded worker.
    let (status, catalog) = first.send(first.request(Method::GET, "/v2/catalog")).await;
    assert_eq!(status, 200, "{catalog}");
    let (service_id, plan_id) = plan_ids(&catalog, "postgres", "shared");
    let (status, body) = first
        .send(first.request(Method::PUT, "/v2/service_instances/emb-1?accepts_incomplete=true").json(&json!({
            "service_id": service_id, "plan_id": plan_id, "organization_guid": "o", "space_guid": "s",
        })))
        .await;
    assert_eq!(status, 202, "{body}");
    let last = first
        .wait_operation("/v2/service_instances/emb-1/last_operation")
        .await;
    assert_eq!(last["state"], "succeeded", "{last}\n{}", log(&dir, port));
    let binding = "/v2/service_instances/emb-1/service_bindings/app-1";
    let (status, body) = first
        .send(first.request(Method::PUT, &format!("{binding}?accepts_incomplete=true")).json(&json!({
            "service_id": service_id, "plan_id": plan_id, "bind_resource": {"app_guid": "app"},
        })))
        .await;
    assert_eq!(status, 202, "{body}");
    let last = first
        .wait_operation(&format!("{binding}/last_operation"))
        .await;
    assert_eq!(last["state"], "succeeded", "{last}");
    let (status, fetched) = first.send(first.request(Method::GET, binding)).await;
    assert_eq!(status, 200, "{fetched}");
    let url = fetched["credentials"]["DATABASE_URL"]
        .as_str()
        .expect("DATABASE_URL")
        .to_string();
    let mut conn = PgConnection::connect(&url)
        .await
        .expect("the binding's DATABASE_URL connects");
    let user: String = sqlx::query_scalar("SELECT session_user::text")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(user, fetched["credentials"]["PGUSER"].as_str().unwrap());
    conn.close().await.unwrap();
    let pg_port = fetched["credentials"]["PGPORT"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| fetched["credentials"]["PGPORT"].to_string());

    // SIGTERM stops the API, the worker and the embedded Postgres.
    let password = first.password.clone();
    let printed = first.stop().await;
    assert!(
        printed.iter().any(|l| l.contains("berth: stopped")),
        "{printed:?}"
    );
    assert!(
        std::net::TcpStream::connect(format!("127.0.0.1:{pg_port}")).is_err(),
        "the embedded Postgres still listens on {pg_port}"
    );
    let left = processes_under(&dir);
    assert!(
        left.is_empty(),
        "processes left running under {}: {left:?}",
        dir.display()
    );

    // The next start reuses the same server, key and credentials: the instance is still there.
    let port = free_port().unwrap();
    let second = Embedded::start(&dir, port).await;
    assert_eq!(
        (second.username.as_str(), second.password.as_str()),
        ("berth", password.as_str())
    );
    let (status, instance) = second
        .send(second.request(Method::GET, "/v2/service_instances/emb-1"))
        .await;
    assert_eq!(status, 200, "{instance}");
    let (status, fetched_again) = second.send(second.request(Method::GET, binding)).await;
    assert_eq!(status, 200);
    assert_eq!(
        fetched_again["credentials"]["DATABASE_URL"],
        url.as_str(),
        "the sealed credentials decrypt with the kept key"
    );
    second.stop().await;
    assert!(processes_under(&dir).is_empty());
    drop(folder);
}

/// A fresh folder for one test, removed (and its processes killed) when the test ends.
fn new_folder() -> (PathBuf, TestFolder) {
    let dir = std::env::temp_dir().join(format!(
        "berth-embedded-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    ));
    std::fs::create_dir_all(&dir).unwrap();
    (dir.clone(), TestFolder(dir))
}

/// A live `berth-worker` process (a zombie waiting for its reaper has exited).
fn is_berth_worker(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.contains("(berth-worker)") && !stat.contains(") Z ")
}

/// Polls `/health` (which asks the broker's database) until it answers 200, for up to `limit`.
async fn wait_healthy(api: &Embedded, limit: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let health = api
            .http
            .get(format!("{}/health", api.base_url))
            .send()
            .await;
        if health.is_ok_and(|r| r.status() == 200) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "/health did not answer 200 within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_second_start_in_the_same_folder_is_refused_and_a_killed_first_blocks_nothing() {
    let (dir, _folder) = new_folder();
    let first = Embedded::start(&dir, free_port().unwrap()).await;
    let first_pid = first.child.id().unwrap();

    // A second start in the same folder exits non-zero, naming the running one (pid and URL).
    let second = tokio::time::timeout(
        WAIT,
        command(&dir, free_port().unwrap())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the second start ends by itself")
    .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&second.stdout),
        String::from_utf8_lossy(&second.stderr)
    );
    assert!(
        !second.status.success(),
        "a second start in the same folder ran: {said}"
    );
    assert!(
        said.contains("already running")
            && said.contains(&format!("pid {first_pid}"))
            && said.contains(&first.base_url),
        "{said}"
    );

    // The first keeps working, its database included.
    tokio::time::sleep(Duration::from_secs(1)).await;
    wait_healthy(&first, Duration::from_secs(1)).await;
    let (status, catalog) = first.send(first.request(Method::GET, "/v2/catalog")).await;
    assert_eq!(status, 200, "{catalog}");
    let (status, body) = first
        .send(first.request(Method::GET, "/v2/service_instances/none"))
        .await;
    assert_eq!(status, 404, "{body}");

    // kill -9 of the first: its worker, left alone, stops by itself.
    let mut first = first;
    let workers = || {
        processes_under(&dir)
            .into_iter()
            .filter(|pid| is_berth_worker(*pid))
            .collect::<Vec<_>>()
    };
    assert_eq!(workers().len(), 1, "one embedded worker");
    first.child.start_kill().unwrap();
    first.child.wait().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !workers().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the worker outlived its API: {:?}",
            workers()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // And everything else it started: its lock goes with it, so the next start works.
    kill_all(processes_under(&dir));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !processes_under(&dir).is_empty() {
        assert!(
            Instant::now() < deadline,
            "killed processes still there: {:?}",
            processes_under(&dir)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        dir.join(".berth/berth.lock").exists(),
        "the lock file stays behind"
    );
    let next = Embedded::start(&dir, free_port().unwrap()).await;
    wait_healthy(&next, Duration::from_secs(30)).await;
    next.stop().await;
}

#[tokio::test]
async fn an_embedded_postgres_stopped_under_a_running_api_is_started_again() {
    let (dir, _folder) = new_folder();
    let api = Embedded::start(&dir, free_port().unwrap()).await;
    wait_healthy(&api, Duration::from_secs(30)).await;
    // The worker too (a worker that cannot reach its database while it starts exits, and takes the API along).
    let deadline = Instant::now() + WAIT;
    while !api
        .output
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.contains("worker started"))
    {
        assert!(
            Instant::now() < deadline,
            "the embedded worker did not start: {:?}",
            api.output.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let server = broker::embedded::PgServer::open(&dir.join(".berth/postgres")).unwrap();
    let before = server.postmaster_pid().expect("a running postmaster");
    let pg_ctl = server.bin_dir().join("pg_ctl");
    let mut stop = match broker::embedded::os_user_for_postgres().unwrap() {
        Some(user) => {
            let mut cmd = std::process::Command::new("runuser");
            cmd.args(["-u", &user, "--"]).arg(&pg_ctl);
            cmd
        }
        None => std::process::Command::new(&pg_ctl),
    };
    let stopped = stop
        .arg("stop")
        .arg("-D")
        .arg(server.data_dir())
        .args(["-m", "immediate", "-w"])
        .status()
        .unwrap();
    assert!(stopped.success());
    let stopped_at = Instant::now();

    // Started again, and the API's pool reconnects: its database answers within a bounded time.
    let took = wait_healthy(&api, Duration::from_secs(30)).await;
    let after = server.postmaster_pid().expect("a postmaster again");
    assert_ne!(after, before, "a new postmaster");
    let (status, body) = api
        .send(api.request(Method::GET, "/v2/service_instances/none"))
        .await;
    assert_eq!(status, 404, "{body}");
    eprintln!(
        "the API answered again {:?} after its Postgres was stopped ({took:?} of polling)",
        stopped_at.elapsed()
    );
    let printed = api.stop().await;
    assert!(
        printed.iter().any(|l| l.contains("berth: stopped")),
        "{printed:?}"
    );
    assert!(
        processes_under(&dir).is_empty(),
        "SIGTERM still stops everything, the restarted Postgres included"
    );
}
