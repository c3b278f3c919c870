//! berth-worker: reads settings, connects, and runs the claim loop until SIGTERM or SIGINT.
//!
//!   berth-worker [SETTINGS]           run (the default; `berth-worker --help` lists the settings)
//!   berth-worker rekey [--batch-size N] [--skip-snapshots]
//!                                     re-seal every secret and snapshot with the primary keys

mod args;

use std::sync::Arc;

use anyhow::Context as _;
use berth_worker::{Services, WorkerConfig, tasks};
use broker::{
    config::{SettingSources, Settings},
    crypto::Cipher,
};
use clap::Parser;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let (command, sources) = args::Cli::parse().into_parts();
    match command {
        args::Command::Run => run(sources).await,
        args::Command::Rekey {
            batch_size,
            skip_snapshots,
        } => rekey(sources, batch_size, skip_snapshots).await,
    }
}

/// Re-seals every stored secret and snapshot with the primary keys, then retires keys nothing uses.
async fn rekey(
    sources: SettingSources,
    batch_size: i64,
    skip_snapshots: bool,
) -> anyhow::Result<()> {
    let settings = sources.load()?;
    broker::telemetry::init(settings.log_format);
    sources.warn_about_unknown_variables();
    let options = berth_worker::rekey::RekeyOptions {
        batch_size,
        skip_snapshots,
    };
    let report = berth_worker::rekey::run(settings, options).await?;
    anyhow::ensure!(
        report.complete(),
        "rekey is not complete: see the summary above"
    );
    Ok(())
}

/// Checks the keys and the catalog, migrates, and claims tasks until a signal.
async fn run(sources: SettingSources) -> anyhow::Result<()> {
    let settings = sources.load()?;
    broker::telemetry::init(settings.log_format);
    sources.warn_about_unknown_variables();
    broker::telemetry::spawn_metrics_upkeep();
    let url = settings
        .database_url
        .clone()
        .context("DATABASE_URL is not set: the worker needs the broker's database")?;
    // The key and the catalog first: a bad file stops the worker before it touches the database.
    let key_paths = settings.key_paths();
    let cipher = Cipher::from_key_files(&key_paths)?;
    for warning in key_paths
        .iter()
        .filter_map(|p| broker::crypto::key_file_permission_warning(p))
    {
        eprintln!("berth-worker: {warning}");
    }
    let config = WorkerConfig::from_settings(&settings);
    let database_pool_size = settings.database_pool_size;
    let services = Arc::new(Services::new(settings, cipher)?);
    let pool = broker::db::connect(&url, database_pool_size).await?;
    // Idempotent and serialized by sqlx's advisory lock, so a worker started before the API is safe.
    broker::MIGRATOR
        .run(&pool)
        .await
        .context("running the broker's migrations")?;
    broker::db::key_checks::verify_master_keys(&pool, &key_paths).await?;
    verify_snapshot_key(&pool, &services.settings).await?;

    let shutdown = CancellationToken::new();
    tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            wait_for_signal().await;
            tracing::info!("shutdown requested");
            shutdown.cancel();
        }
    });
    if std::env::var_os(STOP_WHEN_STDIN_CLOSES).is_some() {
        stop_when_stdin_closes(shutdown.clone());
    }
    let registry = tasks::registry();
    berth_worker::http::zero_counters(&registry.kinds().collect::<Vec<_>>());
    if let Some(addr) = services.settings.worker_http_addr.as_deref() {
        berth_worker::http::start(
            addr,
            pool.clone(),
            config.liveness.clone(),
            config.poll_interval,
            shutdown.clone(),
        )
        .await?;
    }
    berth_worker::run(pool, services, Arc::new(registry), config, shutdown).await
}

/// The snapshot keys are checked like the master keys once this worker has one (the default file is made on
/// first use, not here); without one, it must not be the odd one out either.
async fn verify_snapshot_key(pool: &sqlx::PgPool, settings: &Settings) -> anyhow::Result<()> {
    use broker::db::key_checks;
    let (path, _) = settings.snapshot_key_path();
    if !path.exists() {
        return key_checks::refuse_a_missing_key(
            pool,
            key_checks::SNAPSHOT_KEY,
            &path,
            "SNAPSHOT_KEY_FILE",
        )
        .await;
    }
    let list = berth_worker::rekey::snapshot_key_list(settings)?;
    key_checks::verify_snapshot_keys(pool, &list).await
}

/// Set by the embedded default's API, which holds the worker's stdin: when the API is gone, however it ended (a
/// kill -9 included), stdin reads end of file and the worker stops as on SIGTERM instead of living on alone.
const STOP_WHEN_STDIN_CLOSES: &str = "BERTH_STOP_WHEN_STDIN_CLOSES";

fn stop_when_stdin_closes(shutdown: CancellationToken) {
    // A thread of its own, not Tokio's blocking pool: the runtime would wait for a read that never ends on exit.
    std::thread::spawn(move || {
        use std::io::Read;
        let mut buf = [0u8; 64];
        let mut stdin = std::io::stdin();
        while matches!(stdin.read(&mut buf), Ok(n) if n > 0) {}
        tracing::info!("stdin closed (the embedded API is gone): shutting down");
        shutdown.cancel();
    });
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
