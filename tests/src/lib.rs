//! The end-to-end harness: a fresh broker database on the test Postgres (DATABASE_URL names a superuser URL
//! of that server), the real `berth-api` and `berth-worker` binaries started against it, and a small OSB
//! client to drive them over HTTP.

use std::{
    path::PathBuf,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::Context;
use serde_json::Value;
use sqlx::{Connection, PgConnection};
use tokio::process::{Child, Command};

pub mod browser;

pub const API_VERSION: &str = "2.17";
/// The shipped `postgres` service and its `shared` plan (plans/postgres.json).
pub const PG_SERVICE: &str = "3bdd3b6c-801f-470b-a45f-bc1849fa2124";
pub const PG_SHARED: &str = "707a3e6f-f8db-4339-88da-1533837a9810";

/// A running broker (API + one worker) on its own database.
pub struct Stack {
    /// The OSB client for this stack's API (`stack.request(…)`, `stack.base_url`, … through `Deref`).
    pub client: OsbClient,
    /// Superuser URL of the test server's `postgres` database (also the `shared` plan's server).
    pub admin_url: String,
    /// URL of this stack's broker database.
    pub broker_db_url: String,
    pub name_prefix: String,
    /// Where the worker keeps `local` engine servers (`dedicated` plan).
    pub servers_dir: PathBuf,
    api: Child,
    worker: Child,
    /// The stack's folder: logs, keys, and the data dir (`BERTH_DATA_DIR`: snapshot key and `file://` store).
    pub dir: PathBuf,
    env: Vec<(&'static str, String)>,
}

fn server_url() -> String {
    std::env::var("DATABASE_URL")
        .expect("DATABASE_URL must name a superuser URL of the test Postgres")
}

/// `url` with its database replaced by `db`.
pub fn with_database(url: &str, db: &str) -> String {
    let mut parsed = url::Url::parse(url).expect("DATABASE_URL is a URL");
    parsed.set_path(&format!("/{db}"));
    parsed.to_string()
}

/// The folder holding the workspace's binaries (`target/debug`), found from this test executable.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target/<profile>/deps/<test>")
        .to_path_buf();
    assert!(
        dir.join("berth-api").exists() && dir.join("berth-worker").exists(),
        "berth-api/berth-worker not found in {}: run `cargo build --workspace --bins` first (scripts/test.sh does)",
        dir.display()
    );
    dir
}

pub fn repo_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

impl Stack {
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(Vec::new()).await
    }

    /// Like [`Stack::start`], with more environment for both processes (an S3 store's settings, say).
    pub async fn start_with(extra_env: Vec<(&'static str, String)>) -> anyhow::Result<Self> {
        let tag = uuid::Uuid::new_v4().simple().to_string()[..10].to_string();
        let admin_url = with_database(&server_url(), "postgres");
        let db_name = format!("e2e_{tag}");
        let mut admin = PgConnection::connect(&admin_url)
            .await
            .context("connecting to the test Postgres")?;
        sqlx::query(&format!("CREATE DATABASE {db_name}"))
            .execute(&mut admin)
            .await?;
        admin.close().await?;
        let broker_db_url = with_database(&server_url(), &db_name);

        let dir = std::env::temp_dir().join(format!("berth-e2e-{tag}"));
        std::fs::create_dir_all(&dir)?;
        let key = dir.join("master.key");
        broker::crypto::generate_key_file(&key)?;
        let port = free_port()?;
        let username = "e2e".to_string();
        let password = broker::crypto::random_password(24);
        let name_prefix = format!("e2e{}_", &tag[..6]);
        let servers_dir = dir.join("servers");
        let mut env: Vec<(&'static str, String)> = vec![
            ("DATABASE_URL", broker_db_url.clone()),
            ("SHARED_POSTGRES_URL", admin_url.clone()),
            ("BERTH_KEY_FILE", key.display().to_string()),
            ("PLANS_DIR", repo_dir().join("plans").display().to_string()),
            ("BROKER_USERNAME", username.clone()),
            ("BROKER_PASSWORD", password.clone()),
            ("NAME_PREFIX", name_prefix.clone()),
            ("PORT", port.to_string()),
            ("BIND_ADDRESS", "127.0.0.1".into()),
            ("WORKER_POLL_MS", "500".into()),
            ("LOCAL_ENGINE", "on".into()),
            ("LOCAL_SERVERS_DIR", servers_dir.display().to_string()),
            ("RECONCILE_INTERVAL_MS", "500".into()),
            ("RUST_LOG", "info".into()),
            ("BERTH_DATA_DIR", dir.display().to_string()),
            // The tests' webhook receivers listen on 127.0.0.1.
            ("WEBHOOK_ALLOW_LOOPBACK", "true".into()),
        ];
        env.extend(extra_env);
        let api = spawn(&dir, &env, "berth-api", "api.log")?;
        let worker = spawn(&dir, &env, "berth-worker", "worker.log")?;
        let stack = Self {
            client: OsbClient::new(format!("http://127.0.0.1:{port}"), username, password)?,
            admin_url,
            broker_db_url,
            name_prefix,
            servers_dir,
            api,
            worker,
            dir,
            env,
        };
        stack.wait_healthy(Duration::from_secs(30)).await?;
        Ok(stack)
    }

    /// Kills the worker with SIGKILL (no chance to hand anything back).
    pub async fn kill_worker(&mut self) {
        let _ = self.worker.start_kill();
        let _ = self.worker.wait().await;
    }

    /// Starts the worker again (after [`Stack::kill_worker`]), with `changes` to its environment.
    pub fn restart_worker(&mut self, changes: Vec<(&'static str, String)>) -> anyhow::Result<()> {
        for (key, value) in changes {
            self.env.retain(|(k, _)| *k != key);
            self.env.push((key, value));
        }
        self.worker = spawn(&self.dir, &self.env, "berth-worker", "worker-restarted.log")?;
        Ok(())
    }

    /// Stops the API and starts it again with `changes` to the environment (kept for later restarts), waiting
    /// until it is healthy.
    pub async fn restart_api(
        &mut self,
        changes: Vec<(&'static str, String)>,
    ) -> anyhow::Result<()> {
        let _ = self.api.start_kill();
        let _ = self.api.wait().await;
        for (key, value) in changes {
            self.env.retain(|(k, _)| *k != key);
            self.env.push((key, value));
        }
        self.api = spawn(&self.dir, &self.env, "berth-api", "api-restarted.log")?;
        self.client
            .wait_healthy(Duration::from_secs(30))
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "berth-api did not become healthy again ({e}); its log:\n{}",
                    self.log("api-restarted.log")
                )
            })
    }

    /// A command running `binary` (`berth-api`, `berth-worker`) with this stack's environment and `changes`
    /// to it, for a process of one's own next to the stack's.
    pub fn command(&self, binary: &str, changes: &[(&str, String)]) -> std::process::Command {
        self.command_under(&[], binary, changes)
    }

    /// [`Stack::command`] run by another program (`prefix`: `["prlimit", "--nofile=256:256", "--"]`, say).
    pub fn command_under(
        &self,
        prefix: &[&str],
        binary: &str,
        changes: &[(&str, String)],
    ) -> std::process::Command {
        let mut cmd = match prefix.split_first() {
            Some((program, args)) => {
                let mut cmd = std::process::Command::new(program);
                cmd.args(args).arg(bin_dir().join(binary));
                cmd
            }
            None => std::process::Command::new(bin_dir().join(binary)),
        };
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default());
        for (key, value) in &self.env {
            if !changes.iter().any(|(k, _)| k == key) {
                cmd.env(key, value);
            }
        }
        cmd.envs(changes.iter().map(|(k, v)| (*k, v.as_str())));
        cmd
    }

    /// Waits up to `timeout` for the worker to exit by itself; its exit status, or `None` if it still runs.
    pub async fn wait_worker_exit(
        &mut self,
        timeout: Duration,
    ) -> Option<std::process::ExitStatus> {
        tokio::time::timeout(timeout, self.worker.wait())
            .await
            .ok()
            .and_then(Result::ok)
    }

    /// Waits for the task of an accepted request (`answer["operation"]`) and asserts it succeeded.
    pub async fn assert_task_succeeded(&self, answer: &Value, timeout: Duration) {
        let operation = answer["operation"].as_str().expect("an operation");
        let task = self.wait_task(operation, timeout).await.unwrap();
        assert_eq!(task["state"], "succeeded", "{task}\n{}", self.logs());
    }

    /// Polls `/berth/v1/tasks/{operation}` until the task is finished; returns its body.
    pub async fn wait_task(&self, operation: &str, timeout: Duration) -> anyhow::Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let (status, body) = self
                .send(self.request(
                    reqwest::Method::GET,
                    &format!("/berth/v1/tasks/{operation}"),
                ))
                .await?;
            anyhow::ensure!(status == 200, "task {operation}: {status} {body}");
            if body["state"] == "succeeded" || body["state"] == "failed" {
                return Ok(body);
            }
            if Instant::now() > deadline {
                anyhow::bail!(
                    "task {operation} still {} after {timeout:?}\n{}",
                    body["state"],
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn wait_healthy(&self, timeout: Duration) -> anyhow::Result<()> {
        self.client.wait_healthy(timeout).await.map_err(|e| {
            anyhow::anyhow!(
                "berth-api did not become healthy ({e}); its log:\n{}",
                self.log("api.log")
            )
        })
    }

    /// What a process wrote (for failure messages).
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(name)).unwrap_or_default()
    }

    pub fn logs(&self) -> String {
        format!(
            "--- api.log\n{}\n--- worker.log\n{}\n--- worker-restarted.log\n{}",
            self.log("api.log"),
            self.log("worker.log"),
            self.log("worker-restarted.log")
        )
    }

    /// Like [`OsbClient::wait_operation`], with the stack's logs in the error.
    pub async fn wait_operation(
        &self,
        path: &str,
        timeout: Duration,
    ) -> anyhow::Result<(u16, Value)> {
        self.client
            .wait_operation(path, timeout)
            .await
            .map_err(|e| anyhow::anyhow!("{e:#}\n{}", self.logs()))
    }

    /// PUTs `body` to `path` (an instance or a binding) with `accepts_incomplete=true`, asserts the 202, and
    /// waits for the operation to succeed; returns the last operation's body.
    pub async fn put_until_done(&self, path: &str, body: &Value, timeout: Duration) -> Value {
        let (status, answer) = self
            .send(
                self.request(
                    reqwest::Method::PUT,
                    &format!("{path}?accepts_incomplete=true"),
                )
                .json(body),
            )
            .await
            .unwrap();
        assert_eq!(status, 202, "{answer}");
        self.wait_succeeded(path, timeout).await
    }

    /// Waits for the last operation of `path` (an instance or a binding) and asserts that it succeeded; returns
    /// its body.
    pub async fn wait_succeeded(&self, path: &str, timeout: Duration) -> Value {
        let (status, last) = self
            .wait_operation(&format!("{path}/last_operation"), timeout)
            .await
            .unwrap();
        assert_eq!(
            (status, last["state"].as_str()),
            (200, Some("succeeded")),
            "{last}\n{}",
            self.logs()
        );
        last
    }

    /// DELETEs `path` (an instance or a binding of the plan `ids`) with `accepts_incomplete=true`, asserts the
    /// 202, and waits for the operation to end; returns the last operation's status (410 once it is gone) and body.
    pub async fn delete_until_done(
        &self,
        path: &str,
        ids: &(String, String),
        timeout: Duration,
    ) -> (u16, Value) {
        let (status, body) = self
            .send(self.request(
                reqwest::Method::DELETE,
                &format!(
                    "{path}?service_id={}&plan_id={}&accepts_incomplete=true",
                    ids.0, ids.1
                ),
            ))
            .await
            .unwrap();
        assert_eq!(status, 202, "{body}");
        self.wait_operation(&format!("{path}/last_operation"), timeout)
            .await
            .unwrap()
    }

    /// GETs a binding (`path`).
    pub async fn fetch_binding(&self, path: &str) -> Value {
        let (status, fetched) = self
            .send(self.request(reqwest::Method::GET, path))
            .await
            .unwrap();
        assert_eq!(status, 200, "{fetched}");
        fetched
    }

    /// GETs a binding (`path`) and returns its credentials.
    pub async fn fetch_credentials(&self, path: &str) -> Value {
        self.fetch_binding(path).await["credentials"].clone()
    }

    /// An instance's `details` column, read from the broker database.
    pub async fn instance_details(&self, instance: &str) -> Value {
        let mut db = PgConnection::connect(&self.broker_db_url).await.unwrap();
        let details: Value =
            sqlx::query_scalar("SELECT details FROM service_instances WHERE id = $1")
                .bind(instance)
                .fetch_one(&mut db)
                .await
                .unwrap();
        db.close().await.unwrap();
        details
    }

    pub async fn admin(&self) -> anyhow::Result<PgConnection> {
        Ok(PgConnection::connect(&self.admin_url).await?)
    }

    pub async fn stop(mut self) {
        let _ = self.api.start_kill();
        let _ = self.worker.start_kill();
        let _ = self.api.wait().await;
        let _ = self.worker.wait().await;
        self.kill_servers();
        let _ = std::fs::remove_dir_all(&self.dir);
    }

    /// Kills the `local` and `ha_local` engine processes still running under this stack's servers folder:
    /// Postgres servers (by working directory), Patroni and etcd (by an argument naming a path in it).
    fn kill_servers(&self) {
        kill_all(processes_under(&self.servers_dir));
    }
}

impl std::ops::Deref for Stack {
    type Target = OsbClient;

    fn deref(&self) -> &OsbClient {
        &self.client
    }
}

/// A small OSB client: basic auth and `X-Broker-API-Version` on every request.
#[derive(Clone)]
pub struct OsbClient {
    pub base_url: String,
    pub username: String,
    pub password: String,
    pub http: reqwest::Client,
}

impl OsbClient {
    pub fn new(base_url: String, username: String, password: String) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            // Below every header-read timeout the stacks set: a request must never go out on a connection the
            // broker is closing as idle at that moment.
            .pool_idle_timeout(Duration::from_secs(1))
            .build()?;
        Ok(Self {
            base_url,
            username,
            password,
            http,
        })
    }

    /// An OSB request with auth and the version header.
    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base_url))
            .basic_auth(&self.username, Some(&self.password))
            .header("X-Broker-API-Version", API_VERSION)
    }

    pub async fn send(&self, req: reqwest::RequestBuilder) -> anyhow::Result<(u16, Value)> {
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        let text = resp.text().await?;
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        Ok((status, body))
    }

    /// The catalog (`GET /v2/catalog`'s body).
    pub async fn catalog(&self) -> anyhow::Result<Value> {
        let (_, catalog) = self
            .send(self.request(reqwest::Method::GET, "/v2/catalog"))
            .await?;
        Ok(catalog)
    }

    /// Waits until the API answers `/health` with 200.
    pub async fn wait_healthy(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let health = self
                .http
                .get(format!("{}/health", self.base_url))
                .send()
                .await;
            if health.is_ok_and(|r| r.status().is_success()) {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "berth-api at {} never became healthy",
                self.base_url
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Polls a last_operation URL until it leaves `in progress` (or answers 410); returns (status, body).
    pub async fn wait_operation(
        &self,
        path: &str,
        timeout: Duration,
    ) -> anyhow::Result<(u16, Value)> {
        let deadline = Instant::now() + timeout;
        loop {
            let (status, body) = self.send(self.request(reqwest::Method::GET, path)).await?;
            let done = status == 410 || (status == 200 && body["state"] != "in progress");
            if done {
                return Ok((status, body));
            }
            if status != 200 {
                anyhow::bail!("{path} answered {status}: {body}");
            }
            if Instant::now() > deadline {
                anyhow::bail!("{path} still in progress after {timeout:?}: {body}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A catalog's service by name, if it is offered.
pub fn find_service<'a>(catalog: &'a Value, name: &str) -> Option<&'a Value> {
    catalog["services"]
        .as_array()?
        .iter()
        .find(|s| s["name"] == name)
}

/// A catalog's plan by service and plan name (panics naming what is missing).
pub fn find_plan<'a>(catalog: &'a Value, service: &str, plan: &str) -> &'a Value {
    let offered = find_service(catalog, service)
        .unwrap_or_else(|| panic!("no service {service} in the catalog: {catalog}"));
    offered["plans"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == plan)
        .unwrap_or_else(|| panic!("no plan {plan} of {service} in the catalog: {catalog}"))
}

/// The (service id, plan id) of a catalog's plan, by service and plan name.
pub fn plan_ids(catalog: &Value, service: &str, plan: &str) -> (String, String) {
    let service_id = find_service(catalog, service).unwrap()["id"]
        .as_str()
        .unwrap();
    let plan_id = find_plan(catalog, service, plan)["id"].as_str().unwrap();
    (service_id.to_string(), plan_id.to_string())
}

/// The pid in a Postgres data folder's `postmaster.pid`, if there is one.
pub fn postmaster_pid(data: &std::path::Path) -> Option<u32> {
    std::fs::read_to_string(data.join("postmaster.pid"))
        .ok()?
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}

/// Sends SIGKILL to each process.
pub fn kill_all(pids: impl IntoIterator<Item = u32>) {
    for pid in pids {
        let _ = std::process::Command::new("kill")
            .arg("-KILL")
            .arg(pid.to_string())
            .status();
    }
}

fn spawn(
    dir: &std::path::Path,
    env: &[(&str, String)],
    name: &str,
    log: &str,
) -> anyhow::Result<Child> {
    let log = std::fs::File::create(dir.join(log))?;
    Command::new(bin_dir().join(name))
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log))
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {name}"))
}

/// A test that panics never reaches [`Stack::stop`]: its binaries die with their `Child` handles
/// (`kill_on_drop`), and the Postgres servers the worker started must not outlive it either. The folder stays
/// for a look at the logs.
impl Drop for Stack {
    fn drop(&mut self) {
        self.kill_servers();
    }
}

/// A test's own folder: whatever still runs under it (a Postgres, a worker's servers) is killed and the folder
/// removed when the guard drops, also when the test panics (then the folder stays, for a look at the logs).
pub struct TestFolder(pub std::path::PathBuf);

impl Drop for TestFolder {
    fn drop(&mut self) {
        kill_all(processes_under(&self.0));
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Pids of processes working in `dir` or below it, or with an argument naming a path in it.
pub fn processes_under(dir: &std::path::Path) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let prefix = dir.as_os_str().as_encoded_bytes();
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
        .filter(|pid| {
            let cwd = std::fs::read_link(format!("/proc/{pid}/cwd"))
                .is_ok_and(|cwd| cwd.starts_with(dir));
            cwd || std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.split(|b| *b == 0).any(|arg| arg.starts_with(prefix)))
        })
        .collect()
}

pub use broker::embedded::free_port;

/// One POST a [`WebhookReceiver`] got.
#[derive(Debug, Clone)]
pub struct ReceivedWebhook {
    pub signature: Option<String>,
    pub body: Vec<u8>,
}

/// A local HTTP server on 127.0.0.1 that records every POST.
pub struct WebhookReceiver {
    pub url: String,
    rx: tokio::sync::mpsc::UnboundedReceiver<ReceivedWebhook>,
}

impl WebhookReceiver {
    pub async fn start() -> anyhow::Result<Self> {
        use axum::{Router, body::Bytes, http::HeaderMap, routing::post};
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let app = Router::new().route(
            "/hook",
            post(move |headers: HeaderMap, body: Bytes| {
                let tx = tx.clone();
                async move {
                    let signature = headers
                        .get("x-osb-signature")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string);
                    let _ = tx.send(ReceivedWebhook {
                        signature,
                        body: body.to_vec(),
                    });
                    "ok"
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/hook", listener.local_addr()?);
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { url, rx })
    }

    /// The next POST, waiting up to `timeout`.
    pub async fn next(&mut self, timeout: Duration) -> anyhow::Result<ReceivedWebhook> {
        tokio::time::timeout(timeout, self.rx.recv())
            .await
            .context("no webhook arrived in time")?
            .context("receiver closed")
    }
}

/// Runs `cmd` to its end (at most `limit`); returns its success and what it wrote to stderr and stdout.
pub async fn run_to_end(cmd: std::process::Command, limit: Duration) -> (bool, String) {
    let out = tokio::time::timeout(limit, Command::from(cmd).kill_on_drop(true).output())
        .await
        .expect("the process ends by itself")
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    (out.status.success(), text)
}
