//! The embedded default: no `DATABASE_URL`, so berth brings its own. A private Postgres under the data folder
//! (`.berth/`) holds the broker's database and serves the `shared` plan; a key and broker credentials are made
//! on first start and kept there; one worker runs as a child process. Ctrl-C stops the API, then the worker,
//! then Postgres. The running API owns its data folder (a lock the kernel releases when the process dies, so a
//! second start in the same folder is refused while a crashed one never blocks the next), and starts its
//! Postgres again if it stops underneath.

use std::{
    fs::{File, TryLockError},
    net::SocketAddr,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    sync::Mutex,
    time::Duration,
};

mod banner;

use anyhow::Context;
use broker::{
    config::{SettingSources, Settings},
    embedded::PgServer,
};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use tokio::{process::Child, task::JoinHandle};
use tokio_util::sync::CancellationToken;

pub struct Embedded {
    /// Held for the life of this process: the folder is ours.
    lock: FolderLock,
    server: PgServer,
    supervisor: Mutex<Option<JoinHandle<()>>>,
    worker: Mutex<Option<Child>>,
    worker_env: Vec<(String, String)>,
    username: String,
    password: SecretString,
    /// Plans of the catalog files this start leaves out, with what would add them (for the banner).
    missing_plans: Vec<banner::MissingPlans>,
}

#[derive(Serialize, Deserialize)]
struct StoredCredentials {
    username: String,
    password: String,
}

impl Embedded {
    /// Starts (or reuses) the private Postgres and fills `settings` in for it (and, where `sources` gave
    /// none, picks the defaults of a machine of one's own).
    pub async fn start(settings: &mut Settings, sources: &SettingSources) -> anyhow::Result<Self> {
        let data_dir = absolute(&settings.data_dir)?;
        std::fs::create_dir_all(&data_dir)
            .with_context(|| format!("creating {}", data_dir.display()))?;
        let lock = FolderLock::acquire(&data_dir)?;
        println!(
            "berth: starting the embedded Postgres under {} ...",
            data_dir.join("postgres").display()
        );
        let server = PgServer::ensure_started(&data_dir.join("postgres")).await?;
        server.ensure_database("berth").await?;

        settings.database_url = Some(server.url("berth"));
        if settings.shared_postgres_url.is_none() {
            settings.shared_postgres_url = Some(server.url("postgres"));
        }
        if !sources.is_given("BIND_ADDRESS") {
            settings.bind_address = "127.0.0.1".into();
        }
        let key_path = absolute(&settings.key_path())?;
        // A list of keys (BERTH_KEY_FILES) is the operator's: used as it is, never made here.
        let key_setting = match settings.key_files.clone() {
            Some(list) => ("BERTH_KEY_FILES".to_string(), list),
            None => {
                if !key_path.exists() {
                    broker::crypto::generate_key_file(&key_path)?;
                }
                settings.key_file = Some(key_path.clone());
                ("BERTH_KEY_FILE".to_string(), key_path.display().to_string())
            }
        };
        let (username, password) = load_or_make_credentials(&data_dir, settings)?;
        settings.broker_username = Some(SecretString::from(username.clone()));
        settings.broker_password = Some(password.clone());

        // The local engine (a Postgres server per `dedicated` instance) needs no cloud: on unless LOCAL_ENGINE
        // is given (as a flag, in the environment or in the config file).
        if !sources.is_given("LOCAL_ENGINE") {
            settings.local_engine = true;
        }
        // Everything runs on this machine: webhooks to 127.0.0.1 are the normal case.
        if !sources.is_given("WEBHOOK_ALLOW_LOOPBACK") {
            settings.webhook_allow_loopback = true;
        }
        // Warm pools of local servers: a `dedicated` provision is ready in milliseconds (docs/pools.md).
        if !sources.is_given("POOL_TARGETS") && settings.dedicated_engine == "local" {
            settings.pool_targets =
                Some(broker::pools::embedded_default_targets(&settings.ha_engine));
        }
        settings.data_dir = data_dir.clone();
        let plans_dir = absolute(&settings.plans_dir)?;
        // The API's config file and flags first, so that the worker reads what the API read; then what
        // the embedded default decided, which wins.
        let mut worker_env = sources.child_env();
        worker_env.extend([
            (
                "DATABASE_URL".to_string(),
                server.url("berth").expose_secret().to_string(),
            ),
            key_setting,
            ("PLANS_DIR".to_string(), plans_dir.display().to_string()),
            ("BERTH_DATA_DIR".to_string(), data_dir.display().to_string()),
            (
                "LOCAL_ENGINE".to_string(),
                if settings.local_engine { "on" } else { "off" }.to_string(),
            ),
            (
                "LOCAL_SERVERS_DIR".to_string(),
                settings.servers_dir().display().to_string(),
            ),
            (
                "WEBHOOK_ALLOW_LOOPBACK".to_string(),
                settings.webhook_allow_loopback.to_string(),
            ),
            (
                "POOL_TARGETS".to_string(),
                settings.pool_targets.clone().unwrap_or_default(),
            ),
        ]);
        if let Some(shared) = &settings.shared_postgres_url {
            worker_env.push((
                "SHARED_POSTGRES_URL".into(),
                shared.expose_secret().to_string(),
            ));
        }
        // A bad catalog stops start-up right after this, with its own message: no hints then.
        let unpublished = broker::catalog::unpublished_plans(settings).unwrap_or_default();
        let missing_plans = banner::missing_plans(settings, &unpublished);
        Ok(Self {
            lock,
            server,
            supervisor: Mutex::new(None),
            worker: Mutex::new(None),
            worker_env,
            username,
            password,
            missing_plans,
        })
    }

    /// Starts `berth-worker` (next to this binary) in its own process group, so Ctrl-C reaches only the API,
    /// which then stops the worker in order. If the worker dies, the API shuts down too.
    pub fn spawn_worker(&self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let exe = std::env::current_exe()?.with_file_name("berth-worker");
        let mut cmd = tokio::process::Command::new(&exe);
        cmd.envs(self.worker_env.iter().map(|(k, v)| (k, v)))
            .process_group(0)
            .kill_on_drop(true);
        // The worker's stdin stays open as long as this process lives (the handle sits in `Child`): when the API
        // dies, even by kill -9, the worker reads end of file and stops rather than outliving it.
        cmd.env("BERTH_STOP_WHEN_STDIN_CLOSES", "1")
            .stdin(std::process::Stdio::piped());
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", exe.display()))?;
        let pid = child.id();
        *self.worker.lock().expect("worker lock") = Some(child);
        tokio::spawn(watch_worker(pid, shutdown));
        Ok(())
    }

    /// Watches the embedded Postgres until `shutdown` and starts it again whenever it stops underneath the
    /// API (a crash, an OOM kill, someone's `pg_ctl stop`); the API's pool reconnects by itself.
    pub fn supervise_postgres(&self, shutdown: CancellationToken) {
        let handle = tokio::spawn(supervise(self.server.clone(), shutdown));
        *self.supervisor.lock().expect("supervisor lock") = Some(handle);
    }

    /// `tls`: TLS files are set (the embedded default itself serves plain HTTP on 127.0.0.1).
    pub fn print_banner(&self, addr: SocketAddr, tls: bool) {
        let banner = banner::Banner {
            addr,
            tls,
            username: &self.username,
            password: self.password.expose_secret(),
            postgres_port: self.server.port,
            postgres_data: &self.server.data_dir(),
            missing: &self.missing_plans,
        };
        if let Err(e) = self
            .lock
            .describe(&format!("pid {}, {}", std::process::id(), banner.url()))
        {
            eprintln!("berth: writing {}: {e:#}", self.lock.path.display());
        }
        print!("{}", banner.text());
    }

    /// Asks the worker to stop (SIGTERM) and waits up to `grace` before killing it.
    pub async fn stop_worker(&self, grace: Duration) {
        let child = self.worker.lock().expect("worker lock").take();
        let Some(mut child) = child else { return };
        if let Some(pid) = child.id() {
            let _ = tokio::process::Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status()
                .await;
        }
        if tokio::time::timeout(grace, child.wait()).await.is_err() {
            eprintln!("berth: the worker did not stop in {grace:?}; killing it");
            let _ = child.kill().await;
        }
    }

    pub async fn stop(self) {
        let supervisor = self.supervisor.lock().expect("supervisor lock").take();
        if let Some(supervisor) = supervisor {
            supervisor.abort();
            let _ = supervisor.await;
        }
        self.stop_worker(Duration::from_secs(25)).await;
        if let Err(e) = self.server.stop().await {
            eprintln!("berth: stopping the embedded Postgres: {e:#}");
        } else {
            println!("berth: stopped");
        }
    }
}

async fn supervise(server: PgServer, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        // No process started for the check: postmaster.pid and /proc (a zombie counts as gone).
        if server.postmaster_alive() {
            continue;
        }
        eprintln!("berth: the embedded Postgres stopped; starting it again");
        match server.start().await {
            Ok(()) => eprintln!("berth: the embedded Postgres runs again"),
            Err(e) => {
                eprintln!("berth: starting the embedded Postgres again failed (retrying): {e:#}")
            }
        }
    }
}

/// `<data dir>/berth.lock`, locked (flock) by the API that owns the folder and naming it (pid, URL). The
/// kernel drops the lock with the process, however it ends, so the file itself never blocks a start.
struct FolderLock {
    file: File,
    path: PathBuf,
}

impl FolderLock {
    fn acquire(data_dir: &Path) -> anyhow::Result<Self> {
        let path = data_dir.join("berth.lock");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let holder = std::fs::read_to_string(&path).unwrap_or_default();
                let holder = if holder.trim().is_empty() {
                    "another berth-api"
                } else {
                    holder.trim()
                };
                anyhow::bail!(
                    "berth is already running in {} ({holder}); stop that one first (Ctrl-C, or kill -TERM its \
                     pid), or start this one in another folder (BERTH_DATA_DIR)",
                    data_dir.display()
                );
            }
            Err(TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("locking {}", path.display()));
            }
        }
        let lock = Self { file, path };
        lock.describe(&format!("pid {}, starting", std::process::id()))?;
        Ok(lock)
    }

    /// Replaces what the file says about its holder.
    fn describe(&self, holder: &str) -> anyhow::Result<()> {
        self.file.set_len(0)?;
        self.file
            .write_all_at(format!("{holder}\n").as_bytes(), 0)?;
        Ok(())
    }
}

async fn watch_worker(pid: Option<u32>, shutdown: CancellationToken) {
    let Some(pid) = pid else { return };
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        if !std::path::Path::new(&format!("/proc/{pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|s| s.contains(") Z "))
        {
            eprintln!("berth: the worker exited; stopping");
            shutdown.cancel();
            return;
        }
    }
}

/// BROKER_USERNAME/BROKER_PASSWORD when set; else the pair kept in `<data dir>/broker-credentials.json`;
/// else a new pair (password from the OS RNG), kept there (mode 0600).
fn load_or_make_credentials(
    data_dir: &std::path::Path,
    settings: &Settings,
) -> anyhow::Result<(String, SecretString)> {
    if let (Some(u), Some(p)) = (&settings.broker_username, &settings.broker_password) {
        return Ok((u.expose_secret().to_string(), p.clone()));
    }
    let file = data_dir.join("broker-credentials.json");
    if let Ok(text) = std::fs::read_to_string(&file) {
        let stored: StoredCredentials = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid", file.display()))?;
        return Ok((stored.username, SecretString::from(stored.password)));
    }
    let stored = StoredCredentials {
        username: "berth".into(),
        password: broker::crypto::random_password(24),
    };
    write_private(&file, &serde_json::to_string_pretty(&stored)?)?;
    Ok((stored.username, SecretString::from(stored.password)))
}

fn write_private(path: &std::path::Path, content: &str) -> anyhow::Result<()> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    file.write_all(content.as_bytes())?;
    Ok(())
}

fn absolute(path: &std::path::Path) -> anyhow::Result<PathBuf> {
    Ok(if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()?.join(path)
    })
}
