//! A private Postgres server in a folder of its own (initdb + pg_ctl from the machine's PostgreSQL): the
//! embedded default's database and `shared` server, and a building block for local engines.
//!
//! The server listens on 127.0.0.1 only, on a port chosen once and remembered; the superuser has a
//! generated password (host connections use scram-sha-256) and the socket lives in the data folder.

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context;
use secrecy::{ExposeSecret, SecretString};
use tokio::process::Command;

pub const SUPERUSER: &str = "postgres";

#[derive(Debug, Clone)]
pub struct PgServer {
    root: PathBuf,
    bin_dir: PathBuf,
    run_as: Option<String>,
    pub port: u16,
    password: SecretString,
}

impl PgServer {
    /// Starts the server kept under `root` (`root/data`), creating it on first use.
    pub async fn ensure_started(root: &Path) -> anyhow::Result<Self> {
        let root = absolute(root)?;
        std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
        let bin_dir = find_bin_dir()?;
        let run_as = os_user_for_postgres()?;
        let data = root.join("data");
        let password_file = root.join("superuser-password");
        if !data.join("PG_VERSION").exists() {
            let password = crate::crypto::random_password(32);
            write_private(&password_file, &password)?;
            init(&bin_dir, &run_as, &root, &data, &password_file).await?;
        }
        let password = std::fs::read_to_string(&password_file)
            .with_context(|| format!("reading {}", password_file.display()))?
            .trim()
            .to_string();
        let port = remembered_port(&root)?;
        let server = Self { root, bin_dir, run_as, port, password: SecretString::from(password) };
        if !server.is_running().await {
            server.start().await?;
        }
        Ok(server)
    }

    /// `postgres://postgres:…@127.0.0.1:PORT/db`.
    pub fn url(&self, database: &str) -> SecretString {
        SecretString::from(format!(
            "postgres://{SUPERUSER}:{}@127.0.0.1:{}/{database}",
            self.password.expose_secret(),
            self.port
        ))
    }

    pub fn data_dir(&self) -> PathBuf {
        self.root.join("data")
    }

    async fn is_running(&self) -> bool {
        let status = self.pg_ctl(&["status", "-D"]).await;
        matches!(status, Ok(s) if s.success())
    }

    async fn start(&self) -> anyhow::Result<()> {
        let data = self.data_dir();
        let log = self.root.join("postgres.log");
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories={}",
            self.port,
            data.display()
        );
        let status = self
            .command("pg_ctl")
            .arg("start")
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(&log)
            .arg("-w")
            .arg("-t")
            .arg("60")
            .arg("-o")
            .arg(options)
            .stdout(std::process::Stdio::null())
            .status()
            .await
            .context("running pg_ctl start")?;
        if !status.success() {
            let tail = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = tail.lines().rev().take(15).collect();
            anyhow::bail!(
                "the embedded Postgres did not start (log {}):\n{}",
                log.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        Ok(())
    }

    /// Stops the server (fast shutdown: open sessions are rolled back).
    pub async fn stop(&self) -> anyhow::Result<()> {
        let status = self
            .command("pg_ctl")
            .arg("stop")
            .arg("-D")
            .arg(self.data_dir())
            .arg("-m")
            .arg("fast")
            .arg("-w")
            .stdout(std::process::Stdio::null())
            .status()
            .await
            .context("running pg_ctl stop")?;
        if !status.success() {
            anyhow::bail!("pg_ctl stop failed");
        }
        Ok(())
    }

    /// Creates `name` unless it exists.
    pub async fn ensure_database(&self, name: &str) -> anyhow::Result<()> {
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect(self.url("postgres").expose_secret())
            .await
            .context("connecting to the embedded Postgres")?;
        let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(name)
            .fetch_one(&mut conn)
            .await?;
        if !exists {
            let sql = format!("CREATE DATABASE {}", crate::names::quote_ident(name));
            sqlx::query(&sql).execute(&mut conn).await?;
        }
        Ok(())
    }

    async fn pg_ctl(&self, args: &[&str]) -> std::io::Result<std::process::ExitStatus> {
        let mut cmd = self.command("pg_ctl");
        cmd.args(args).arg(self.data_dir()).stdout(std::process::Stdio::null());
        cmd.status().await
    }

    fn command(&self, program: &str) -> Command {
        command(&self.bin_dir, &self.run_as, program)
    }
}

fn command(bin_dir: &Path, run_as: &Option<String>, program: &str) -> Command {
    let program = bin_dir.join(program);
    match run_as {
        Some(user) => {
            let mut cmd = Command::new("runuser");
            cmd.arg("-u").arg(user).arg("--").arg(program);
            cmd
        }
        None => Command::new(program),
    }
}

async fn init(
    bin_dir: &Path,
    run_as: &Option<String>,
    root: &Path,
    data: &Path,
    password_file: &Path,
) -> anyhow::Result<()> {
    if let Some(user) = run_as {
        chown(root, user)?;
        chown(password_file, user)?;
    }
    let output = command(bin_dir, run_as, "initdb")
        .arg("-D")
        .arg(data)
        .arg("-U")
        .arg(SUPERUSER)
        .arg("--pwfile")
        .arg(password_file)
        .arg("--auth-host=scram-sha-256")
        .arg("--auth-local=trust")
        .arg("--encoding=UTF8")
        .arg("--locale=C")
        .arg("--data-checksums")
        .output()
        .await
        .context("running initdb")?;
    if !output.status.success() {
        anyhow::bail!("initdb failed: {}", String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(())
}

/// Postgres refuses to run as root; when we are root, the server runs as the `postgres` OS user.
fn os_user_for_postgres() -> anyhow::Result<Option<String>> {
    if !is_root() {
        return Ok(None);
    }
    let user = std::env::var("BERTH_PG_OS_USER").unwrap_or_else(|_| "postgres".into());
    let exists = std::process::Command::new("id")
        .arg("-u")
        .arg(&user)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !exists {
        anyhow::bail!(
            "running as root, and the OS user {user:?} that would run the embedded Postgres does not exist \
             (install PostgreSQL: apt-get install postgresql, or set BERTH_PG_OS_USER)"
        );
    }
    Ok(Some(user))
}

fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn chown(path: &Path, user: &str) -> anyhow::Result<()> {
    let status = std::process::Command::new("chown")
        .arg("-R")
        .arg(user)
        .arg(path)
        .status()
        .context("running chown")?;
    if !status.success() {
        anyhow::bail!("chown {} to {user} failed", path.display());
    }
    Ok(())
}

/// The folder with initdb and pg_ctl: `PG_BIN_DIR`, `pg_config --bindir`, or the newest
/// `/usr/lib/postgresql/*/bin`.
pub fn find_bin_dir() -> anyhow::Result<PathBuf> {
    if let Ok(dir) = std::env::var("PG_BIN_DIR") {
        return Ok(dir.into());
    }
    let mut candidates: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|entries| entries.filter_map(|e| e.ok().map(|e| e.path().join("bin"))).collect())
        .unwrap_or_default();
    candidates.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    if let Some(dir) = candidates.into_iter().rev().find(|d| d.join("initdb").exists()) {
        return Ok(dir);
    }
    if let Ok(out) = std::process::Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("initdb").exists() {
            return Ok(dir);
        }
    }
    anyhow::bail!(
        "no PostgreSQL server binaries found (initdb, pg_ctl): install them with \
         `apt-get install postgresql`, or set PG_BIN_DIR"
    )
}

/// The port in `root/port`, or a free one, remembered there.
fn remembered_port(root: &Path) -> anyhow::Result<u16> {
    let file = root.join("port");
    if let Some(port) = std::fs::read_to_string(&file).ok().and_then(|s| s.trim().parse().ok()) {
        return Ok(port);
    }
    let port = free_port()?;
    std::fs::write(&file, port.to_string())?;
    Ok(port)
}

/// A TCP port on 127.0.0.1 that nothing listens on right now.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn write_private(path: &Path, content: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path).with_context(|| format!("writing {}", path.display()))?;
    file.write_all(content.as_bytes())?;
    Ok(())
}

fn absolute(path: &Path) -> anyhow::Result<PathBuf> {
    Ok(if path.is_absolute() { path.to_path_buf() } else { std::env::current_dir()?.join(path) })
}

/// Waits until `url` accepts connections, for up to `timeout`.
pub async fn wait_ready(url: &SecretString, timeout: Duration) -> anyhow::Result<()> {
    use sqlx::Connection;
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match sqlx::PgConnection::connect(url.expose_secret()).await {
            Ok(conn) => {
                let _ = conn.close().await;
                return Ok(());
            }
            Err(e) if tokio::time::Instant::now() >= deadline => {
                anyhow::bail!("Postgres did not accept connections in time: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_private_server_starts_restarts_and_stops() {
        let root = std::env::temp_dir().join(format!("berth-embedded-{}", uuid::Uuid::new_v4()));
        let server = PgServer::ensure_started(&root).await.unwrap();
        server.ensure_database("berth").await.unwrap();
        server.ensure_database("berth").await.unwrap();
        wait_ready(&server.url("berth"), Duration::from_secs(10)).await.unwrap();

        // Host connections need the generated password.
        let wrong = format!("postgres://{SUPERUSER}:wrong@127.0.0.1:{}/berth", server.port);
        use sqlx::Connection;
        assert!(sqlx::PgConnection::connect(&wrong).await.is_err());

        // A second start finds it running on the same port; after a stop it comes back with the same data.
        let again = PgServer::ensure_started(&root).await.unwrap();
        assert_eq!(again.port, server.port);
        server.stop().await.unwrap();
        let restarted = PgServer::ensure_started(&root).await.unwrap();
        assert_eq!(restarted.port, server.port);
        let mut conn = sqlx::PgConnection::connect(restarted.url("berth").expose_secret()).await.unwrap();
        let one: i32 = sqlx::query_scalar("SELECT 1").fetch_one(&mut conn).await.unwrap();
        assert_eq!(one, 1);
        conn.close().await.unwrap();
        restarted.stop().await.unwrap();
        std::fs::remove_dir_all(&root).unwrap();
    }
}
