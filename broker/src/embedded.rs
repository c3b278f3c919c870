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
        let server = Self::ensure_initialized(root, None).await?;
        server.wait_for_dead_postmaster().await;
        if !server.is_running().await {
            server.start().await?;
        }
        Ok(server)
    }

    /// Creates the server under `root` unless it exists, without starting it: `initdb` (data checksums, a
    /// generated superuser password kept in `root/superuser-password`) into `root/data.partial`, renamed to
    /// `root/data` once complete, so a crash midway leaves nothing a retry would mistake for a server.
    /// `bin_dir` picks the PostgreSQL binaries (default [`find_bin_dir`]).
    pub async fn ensure_initialized(root: &Path, bin_dir: Option<PathBuf>) -> anyhow::Result<Self> {
        let root = absolute(root)?;
        std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
        let bin_dir = match bin_dir {
            Some(dir) => dir,
            None => find_bin_dir()?,
        };
        let run_as = os_user_for_postgres()?;
        let data = root.join("data");
        if !data.join("PG_VERSION").exists() {
            let partial = root.join("data.partial");
            if partial.exists() {
                std::fs::remove_dir_all(&partial)
                    .with_context(|| format!("removing the unfinished {}", partial.display()))?;
            }
            let password_file = root.join("superuser-password");
            if !password_file.exists() {
                write_private(&password_file, &crate::crypto::random_password(32))?;
            }
            init(&bin_dir, &run_as, &root, &partial, &password_file).await?;
            std::fs::rename(&partial, &data)
                .with_context(|| format!("moving {} into place", partial.display()))?;
        }
        Self::open_with(root, bin_dir, run_as)
    }

    /// The server already initialized under `root` (running or not), with the binaries of its major version.
    pub fn open(root: &Path) -> anyhow::Result<Self> {
        let root = absolute(root)?;
        let version = std::fs::read_to_string(root.join("data/PG_VERSION"))
            .with_context(|| format!("{} holds no initialized Postgres server", root.display()))?;
        let bin_dir = bin_dir_for_version(version.trim())?;
        Self::open_with(root, bin_dir, os_user_for_postgres()?)
    }

    fn open_with(root: PathBuf, bin_dir: PathBuf, run_as: Option<String>) -> anyhow::Result<Self> {
        let password_file = root.join("superuser-password");
        let password = std::fs::read_to_string(&password_file)
            .with_context(|| format!("reading {}", password_file.display()))?
            .trim()
            .to_string();
        let port = remembered_port(&root)?;
        Ok(Self {
            root,
            bin_dir,
            run_as,
            port,
            password: SecretString::from(password),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The folder of the server's PostgreSQL programs.
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    pub fn superuser_password(&self) -> &SecretString {
        &self.password
    }

    /// A new superuser password, step one: made once and kept in `root/superuser-password.next` until
    /// [`Self::commit_superuser_password`], so a retry after a crash sets the same one. The caller sets it on the
    /// server in between (over the Unix socket, where the superuser needs no password).
    pub fn next_superuser_password(&self) -> anyhow::Result<SecretString> {
        let next = self.root.join("superuser-password.next");
        if !next.exists() {
            write_private(&next, &crate::crypto::random_password(32))?;
        }
        let password = std::fs::read_to_string(&next)
            .with_context(|| format!("reading {}", next.display()))?;
        Ok(SecretString::from(password.trim().to_string()))
    }

    /// Step two: the password from [`Self::next_superuser_password`], now set on the server, replaces the old one.
    pub fn commit_superuser_password(&mut self) -> anyhow::Result<()> {
        let next = self.root.join("superuser-password.next");
        if !next.exists() {
            return Ok(());
        }
        let password = self.next_superuser_password()?;
        std::fs::rename(&next, self.root.join("superuser-password"))
            .with_context(|| format!("moving {} into place", next.display()))?;
        self.password = password;
        Ok(())
    }

    /// The major version in `data/PG_VERSION`.
    pub fn version(&self) -> anyhow::Result<String> {
        Ok(std::fs::read_to_string(self.data_dir().join("PG_VERSION"))?
            .trim()
            .to_string())
    }

    /// The postmaster's pid from `data/postmaster.pid`, if the file is there (the process may be gone).
    pub fn postmaster_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.data_dir().join("postmaster.pid"))
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }

    /// Whether the postmaster named in postmaster.pid is alive (cheap: no process started). `false` when the
    /// file is gone, as after a stop, or names a dead process, as after a crash.
    pub fn postmaster_alive(&self) -> bool {
        self.postmaster_pid()
            .is_some_and(|pid| process_state(pid).is_some_and(|state| state != 'Z'))
    }

    /// Waits (up to 10 s) until a killed postmaster named in postmaster.pid is reaped: while it lingers as a
    /// zombie, `pg_ctl status` calls it running and a new postmaster refuses the data folder.
    async fn wait_for_dead_postmaster(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while let Some(pid) = self.postmaster_pid()
            && process_state(pid) == Some('Z')
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Writes `content` to `data/<name>` (mode 0600), owned by the OS user that runs the server.
    pub fn write_data_file(&self, name: &str, content: &[u8]) -> anyhow::Result<()> {
        let path = self.data_dir().join(name);
        write_private_bytes(&path, content)?;
        if let Some(user) = &self.run_as {
            chown(&path, user)?;
        }
        Ok(())
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

    /// Whether a postmaster runs on the data folder (`pg_ctl status`).
    pub async fn is_running(&self) -> bool {
        let status = self.pg_ctl(&["status", "-D"]).await;
        matches!(status, Ok(s) if s.success())
    }

    /// Starts the server and waits until it accepts connections. `pg_ctl start -w` checks every 100 ms; we
    /// also watch postmaster.pid every 5 ms and return as soon as the new postmaster says `ready`.
    pub async fn start(&self) -> anyhow::Result<()> {
        let data = self.data_dir();
        let log = self.root.join("postgres.log");
        let socket_dir = self
            .socket_dir()
            .map(|d| d.display().to_string())
            .unwrap_or_default();
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories='{socket_dir}'",
            self.port
        );
        self.wait_for_dead_postmaster().await;
        // A postmaster.pid left by a killed server says `ready` too: only a new pid counts.
        let stale = self.postmaster_pid();
        let mut pg_ctl = self
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
            .spawn()
            .context("running pg_ctl start")?;
        let status = loop {
            tokio::select! {
                status = pg_ctl.wait() => break status.context("running pg_ctl start")?,
                () = tokio::time::sleep(Duration::from_millis(5)) => {
                    if self.ready_postmaster().is_some_and(|pid| Some(pid) != stale) {
                        // pg_ctl sees the same within 100 ms and exits; tokio reaps it.
                        return Ok(());
                    }
                }
            }
        };
        if !status.success() {
            let tail = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = tail.lines().rev().take(15).collect();
            anyhow::bail!(
                "Postgres did not start (log {}):\n{}",
                log.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        Ok(())
    }

    /// The folder of the server's Unix socket: the data folder, unless the socket's path would be too long
    /// for a Unix socket (about 107 bytes), in which case the server has none and listens on TCP only.
    pub fn socket_dir(&self) -> Option<PathBuf> {
        let data = self.data_dir();
        let socket = data.join(format!(".s.PGSQL.{}", self.port));
        (socket.as_os_str().len() < 100).then_some(data)
    }

    /// The postmaster's pid when postmaster.pid says it accepts connections (line 8, `ready`) and it is alive.
    fn ready_postmaster(&self) -> Option<u32> {
        let text = std::fs::read_to_string(self.data_dir().join("postmaster.pid")).ok()?;
        let lines: Vec<&str> = text.lines().collect();
        let pid: u32 = lines.first()?.trim().parse().ok()?;
        let ready = lines.get(7).is_some_and(|l| l.trim() == "ready");
        (ready && Path::new(&format!("/proc/{pid}")).exists()).then_some(pid)
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

    /// Re-reads the configuration files (`pg_ctl reload`).
    pub async fn reload(&self) -> anyhow::Result<()> {
        let status = self
            .pg_ctl(&["reload", "-D"])
            .await
            .context("running pg_ctl reload")?;
        if !status.success() {
            anyhow::bail!("pg_ctl reload failed");
        }
        Ok(())
    }

    /// Stops the server if it runs, then starts it (for settings that need a restart).
    pub async fn restart(&self) -> anyhow::Result<()> {
        if self.is_running().await {
            self.stop().await?;
        }
        self.start().await
    }

    /// Creates `name` unless it exists.
    pub async fn ensure_database(&self, name: &str) -> anyhow::Result<()> {
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect(self.url("postgres").expose_secret())
            .await
            .context("connecting to the embedded Postgres")?;
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
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
        cmd.args(args)
            .arg(self.data_dir())
            .stdout(std::process::Stdio::null());
        cmd.status().await
    }

    fn command(&self, program: &str) -> Command {
        command(&self.bin_dir, &self.run_as, program)
    }
}

/// The state letter of process `pid` (`R`, `S`, `Z` for a zombie, ...), or `None` when there is no such process.
fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(") ")?.1.chars().next()
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
        anyhow::bail!(
            "initdb failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// Postgres refuses to run as root; when we are root, the server runs as the `postgres` OS user.
pub fn os_user_for_postgres() -> anyhow::Result<Option<String>> {
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

/// `chown -R user path`.
pub fn chown(path: &Path, user: &str) -> anyhow::Result<()> {
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
        .map(|entries| {
            entries
                .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
                .collect()
        })
        .unwrap_or_default();
    candidates.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    if let Some(dir) = candidates
        .into_iter()
        .rev()
        .find(|d| d.join("initdb").exists())
    {
        return Ok(dir);
    }
    if let Ok(out) = std::process::Command::new("pg_config")
        .arg("--bindir")
        .output()
    {
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

/// Major versions of PostgreSQL installed under `/usr/lib/postgresql` (with `initdb`), oldest first.
pub fn installed_versions() -> Vec<String> {
    let mut versions: Vec<u32> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter(|e| e.path().join("bin/initdb").exists())
                .filter_map(|e| e.file_name().to_str().and_then(|v| v.parse().ok()))
                .collect()
        })
        .unwrap_or_default();
    versions.sort_unstable();
    let mut out: Vec<String> = versions.into_iter().map(|v| v.to_string()).collect();
    if out.is_empty()
        && let Ok(dir) = find_bin_dir()
        && let Some(v) = major_version_of(&dir)
    {
        out.push(v);
    }
    out
}

/// The binaries of major version `version`: `/usr/lib/postgresql/<version>/bin`, or `PG_BIN_DIR` /
/// `pg_config --bindir` when their `initdb` is that version.
pub fn bin_dir_for_version(version: &str) -> anyhow::Result<PathBuf> {
    let dir = PathBuf::from(format!("/usr/lib/postgresql/{version}/bin"));
    if dir.join("initdb").exists() && std::env::var_os("PG_BIN_DIR").is_none() {
        return Ok(dir);
    }
    if let Ok(found) = find_bin_dir()
        && major_version_of(&found).as_deref() == Some(version)
    {
        return Ok(found);
    }
    if dir.join("initdb").exists() {
        return Ok(dir);
    }
    anyhow::bail!(
        "PostgreSQL {version} is not installed on this machine (installed: {})",
        installed_versions().join(", ")
    )
}

/// The major version of the `initdb` in `bin_dir` (`initdb (PostgreSQL) 15.4` → `15`).
fn major_version_of(bin_dir: &Path) -> Option<String> {
    let out = std::process::Command::new(bin_dir.join("initdb"))
        .arg("--version")
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let version = text.split_whitespace().last()?;
    Some(version.split('.').next()?.to_string())
}

/// The port in `root/port`, or a free one, remembered there.
fn remembered_port(root: &Path) -> anyhow::Result<u16> {
    let file = root.join("port");
    if let Some(port) = std::fs::read_to_string(&file)
        .ok()
        .and_then(|s| s.trim().parse().ok())
    {
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
    write_private_bytes(path, content.as_bytes())
}

fn write_private_bytes(path: &Path, content: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    file.write_all(content)?;
    Ok(())
}

fn absolute(path: &Path) -> anyhow::Result<PathBuf> {
    Ok(if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()?.join(path)
    })
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
        wait_ready(&server.url("berth"), Duration::from_secs(10))
            .await
            .unwrap();

        // Host connections need the generated password.
        let wrong = format!(
            "postgres://{SUPERUSER}:wrong@127.0.0.1:{}/berth",
            server.port
        );
        use sqlx::Connection;
        assert!(sqlx::PgConnection::connect(&wrong).await.is_err());

        // A second start finds it running on the same port; after a stop it comes back with the same data.
        let again = PgServer::ensure_started(&root).await.unwrap();
        assert_eq!(again.port, server.port);
        server.stop().await.unwrap();
        let restarted = PgServer::ensure_started(&root).await.unwrap();
        assert_eq!(restarted.port, server.port);
        let mut conn = sqlx::PgConnection::connect(restarted.url("berth").expose_secret())
            .await
            .unwrap();
        let one: i32 = sqlx::query_scalar("SELECT 1")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        assert_eq!(one, 1);
        conn.close().await.unwrap();
        restarted.stop().await.unwrap();
        std::fs::remove_dir_all(&root).unwrap();
    }
}
