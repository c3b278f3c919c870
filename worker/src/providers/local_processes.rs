//! Server processes on the worker's machine (the `local` engine's servers, the `ha_local` engine's etcd and
//! Patroni): kept under one folder, started detached (`setsid -f`, their own session, reparented away from the
//! worker) so they outlive it, as the `postgres` OS user when the worker is root. Found again through /proc:
//! Patroni by its config file argument, etcd by its data folder argument, Postgres by its working directory (a
//! postmaster and its backends chdir to their data folder). Stopping escalates from SIGTERM to SIGKILL and
//! waits until nothing is left.

use std::{ffi::OsStr, path::Path, process::Stdio, time::Duration};

use anyhow::Context as _;
use broker::embedded::PgServer;
use tokio::process::Command;
use tracing::warn;

/// Checks and creates the folder where engines that run processes on the worker's machine keep them.
pub fn ensure_servers_dir(dir: &Path) -> anyhow::Result<()> {
    anyhow::ensure!(
        dir.is_absolute(),
        "LOCAL_SERVERS_DIR must be absolute (got {})",
        dir.display()
    );
    std::fs::create_dir_all(dir)
        .with_context(|| format!("creating the local servers folder {}", dir.display()))
}

/// Starts `program args…` detached, appending its output to `log`.
pub async fn spawn_detached(
    run_as: Option<&str>,
    program: &str,
    args: &[&OsStr],
    log: &Path,
) -> anyhow::Result<()> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    let mut cmd = match run_as {
        Some(user) => {
            let mut cmd = Command::new("runuser");
            cmd.args(["-u", user, "--", "setsid", "-f", program]);
            cmd
        }
        None => {
            let mut cmd = Command::new("setsid");
            cmd.args(["-f", program]);
            cmd
        }
    };
    let status = cmd
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(out.try_clone()?))
        .stderr(Stdio::from(out))
        .status()
        .await
        .with_context(|| format!("starting {program}"))?;
    anyhow::ensure!(status.success(), "starting {program} failed ({status})");
    Ok(())
}

/// Every pid in /proc.
fn all_pids() -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
        .collect()
}

/// For each of `args`, the pids of processes with it as one of their arguments (not the program itself), from
/// one pass over /proc (what [`pids_with_arg`] finds for each).
pub fn pids_with_args(args: &[&Path]) -> Vec<Vec<u32>> {
    let wanted: Vec<&[u8]> = args
        .iter()
        .map(|a| a.as_os_str().as_encoded_bytes())
        .collect();
    let mut found = vec![Vec::new(); args.len()];
    for pid in all_pids() {
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let matching: Vec<usize> = cmdline
            .split(|b| *b == 0)
            .skip(1)
            .filter_map(|a| wanted.iter().position(|w| *w == a))
            .collect();
        if matching.is_empty() || !is_started(pid) {
            continue;
        }
        for i in matching {
            found[i].push(pid);
        }
    }
    found
}

/// Not a process being started: those go through runuser and setsid with the same arguments.
fn is_started(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .is_ok_and(|comm| !matches!(comm.trim(), "runuser" | "setsid"))
}

/// Pids of processes with `arg` as one of their arguments (not the program itself).
pub fn pids_with_arg(arg: &Path) -> Vec<u32> {
    let arg = arg.as_os_str().as_encoded_bytes();
    all_pids()
        .into_iter()
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|cmdline| cmdline.split(|b| *b == 0).skip(1).any(|a| a == arg))
        })
        .filter(|pid| is_started(*pid))
        .collect()
}

/// Pids of processes whose working directory is `dir` or below it (a postmaster and its backends work in
/// their data folder).
pub fn processes_in(dir: &Path) -> Vec<u32> {
    all_pids()
        .into_iter()
        .filter(|pid| {
            std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd.starts_with(dir))
        })
        .collect()
}

/// Sends `signal` (`TERM`, `KILL`, …) to `pids`; ones already gone are fine.
pub async fn signal(pids: &[u32], signal: &str) {
    if pids.is_empty() {
        return;
    }
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .args(pids.iter().map(u32::to_string))
        .stderr(Stdio::null())
        .status()
        .await;
}

/// Asks what `find` finds to stop (SIGTERM), waits up to `grace`, then kills what is left and waits until
/// nothing is.
pub async fn stop(find: impl Fn() -> Vec<u32>, grace: Duration) -> anyhow::Result<()> {
    signal(&find(), "TERM").await;
    let deadline = tokio::time::Instant::now() + grace;
    while tokio::time::Instant::now() < deadline {
        if find().is_empty() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    kill(find, Duration::from_secs(10)).await
}

/// SIGKILL to what `find` finds until nothing is left (`limit` at most).
pub async fn kill(find: impl Fn() -> Vec<u32>, limit: Duration) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let left = find();
        if left.is_empty() {
            return Ok(());
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "processes {left:?} did not stop"
        );
        signal(&left, "KILL").await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Stops the server whose folder is `root` and whatever else runs in `root/data` (fast shutdown, then SIGKILL
/// for anything left, such as backends orphaned by a killed postmaster) and waits until nothing does.
pub async fn stop_server(root: &Path) -> anyhow::Result<()> {
    let data = root.join("data");
    if let Ok(server) = PgServer::open(root)
        && server.is_running().await
        && let Err(e) = server.stop().await
    {
        warn!(error = %format!("{e:#}"), "pg_ctl stop failed; killing the server's processes");
    }
    kill(|| processes_in(&data), Duration::from_secs(30))
        .await
        .with_context(|| format!("stopping what runs in {}", data.display()))
}
