//! `berth-api`: the OSB API server. With no `DATABASE_URL` it runs the embedded default (see embedded.rs).
//!
//!   berth-api [SETTINGS]              serve (the default; `berth-api --help` lists the settings)
//!   berth-api gen-key PATH            write a new secrets key to PATH (refuses to overwrite)

mod args;
mod embedded;

use std::{net::SocketAddr, path::Path, process::ExitCode, sync::Arc, time::Duration};

use anyhow::Context;
use broker::{
    catalog::Catalog,
    config::{SettingSources, Settings},
    crypto::Cipher,
};
use clap::Parser;
use secrecy::SecretString;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> ExitCode {
    let (command, sources) = args::Cli::parse().into_parts();
    let result = match command {
        args::Command::Serve => serve(sources).await,
        args::Command::GenKey { path } => gen_key(&path),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("berth-api: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn gen_key(path: &Path) -> anyhow::Result<()> {
    broker::crypto::generate_key_file(path)?;
    println!(
        "wrote a new key to {path}; set BERTH_KEY_FILE={path}",
        path = path.display()
    );
    Ok(())
}

async fn serve(sources: SettingSources) -> anyhow::Result<()> {
    let mut settings = sources.load()?;
    broker::telemetry::init(settings.log_format);
    sources.warn_about_unknown_variables();
    broker::telemetry::spawn_metrics_upkeep();
    // Bad TLS files stop the API before it starts a Postgres or touches the database.
    berth_api::tls::check(&settings)?;
    let embedded = if settings.database_url.is_none() {
        Some(embedded::Embedded::start(&mut settings, &sources).await?)
    } else {
        None
    };
    let result = serve_with(&settings, embedded.as_ref()).await;
    if let Some(embedded) = embedded {
        embedded.stop().await;
    }
    result
}

async fn serve_with(
    settings: &Settings,
    embedded: Option<&embedded::Embedded>,
) -> anyhow::Result<()> {
    let database_url = settings
        .database_url
        .as_ref()
        .context("DATABASE_URL is not set")?;
    let (username, password) = broker_credentials(settings)?;
    let cipher = Cipher::from_key_files(&settings.key_paths()).with_context(|| {
        format!(
            "no usable secrets key (create one with `berth-api gen-key {}` and set BERTH_KEY_FILE)",
            settings.key_path().display()
        )
    })?;
    if let Some(warning) = broker::crypto::key_file_permission_warning(&settings.key_path()) {
        eprintln!("berth-api: {warning}");
    }
    let engines = settings.available_engines();
    // The catalog files, plus what only the settings know (which credentials S3 bindings get).
    let catalog = Catalog::load_for(settings)?;
    let pool_targets = broker::pools::PoolTargets::from_settings(settings, &catalog)?;
    let db = broker::db::connect(database_url, settings.database_pool_size).await?;
    broker::MIGRATOR
        .run(&db)
        .await
        .context("running the broker's migrations")?;
    broker::db::key_checks::verify_master_keys(&db, &settings.key_paths()).await?;

    let provisions = berth_api::provision_batch::ProvisionBatcher::start(
        db.clone(),
        berth_api::PROVISION_WRITERS,
    );
    let task_waits = berth_api::task_waits::TaskWaits::start(db.clone());
    let mut state = berth_api::AppState {
        db,
        catalog: Arc::new(catalog),
        cipher,
        auth: Arc::new(
            berth_api::BrokerAuth::new(username, password).with_throttle(
                settings.auth_failure_limit,
                Duration::from_secs(settings.auth_failure_window_secs),
            ),
        ),
        max_body_bytes: settings.max_body_bytes,
        provisions,
        requests: Default::default(),
        webhook_targets: Arc::new(broker::webhook_target::TargetPolicy::from_settings(
            settings,
        )?),
        task_waits,
        sync_wait: Duration::from_secs(settings.sync_wait_secs),
        dashboard: Default::default(),
        pool_targets: Arc::new(pool_targets),
    };
    let addr: SocketAddr = format!("{}:{}", settings.bind_address, settings.port)
        .parse()
        .with_context(|| {
            format!(
                "BIND_ADDRESS {:?} is not an IP address",
                settings.bind_address
            )
        })?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("listening on {addr}"))?;
    let local = listener.local_addr()?;
    state.dashboard = Arc::new(dashboard_links(settings, embedded.is_some(), local)?);
    let limits = berth_api::server::ConnectionLimits {
        header_read_timeout: Duration::from_secs(settings.http_header_read_timeout_secs),
        max_connections: berth_api::server::connection_cap(
            settings.http_max_connections,
            settings.database_pool_size,
        ),
    };
    tracing::info!(%local, engines = ?engines.iter().map(|e| e.as_str()).collect::<Vec<_>>(), max_connections = limits.max_connections, "berth-api listening");

    let shutdown = CancellationToken::new();
    let tls = berth_api::tls::start(settings, local, shutdown.clone())?;
    tokio::spawn(stop_on_signal(shutdown.clone()));
    if let Some(embedded) = embedded {
        embedded.spawn_worker(shutdown.clone())?;
        embedded.supervise_postgres(shutdown.clone());
        embedded.print_banner(local, tls.is_some());
    }
    let router = berth_api::router(state);
    berth_api::server::serve_with_tls(listener, router, limits, tls, shutdown.clone())
        .await
        .context("serving HTTP")?;
    if let Some(embedded) = embedded {
        embedded.stop_worker(Duration::from_secs(25)).await;
    }
    Ok(())
}

/// How dashboard links are made: `BROKER_PUBLIC_URL` when set (checked here), else the embedded default's own
/// address (it listens on this machine only), else the address each request came to.
fn dashboard_links(
    settings: &Settings,
    embedded: bool,
    local: SocketAddr,
) -> anyhow::Result<berth_api::dashboard::DashboardLinks> {
    let https = settings.tls_cert_file.is_some();
    let public_url = match &settings.broker_public_url {
        Some(url) => {
            let parsed = url::Url::parse(url)
                .with_context(|| format!("BROKER_PUBLIC_URL {url:?} is not a URL"))?;
            anyhow::ensure!(
                matches!(parsed.scheme(), "http" | "https") && parsed.host().is_some(),
                "BROKER_PUBLIC_URL {url:?} must be an http(s) URL with a host"
            );
            Some(url.clone())
        }
        None if embedded => Some(format!(
            "{}://{local}",
            if https { "https" } else { "http" }
        )),
        None => None,
    };
    Ok(berth_api::dashboard::DashboardLinks {
        public_url,
        ttl: Duration::from_secs(settings.dashboard_link_ttl_secs),
        https,
    })
}

/// `BROKER_USERNAME`/`BROKER_PASSWORD`: required outside the embedded default (which fills them in).
fn broker_credentials(settings: &Settings) -> anyhow::Result<(SecretString, SecretString)> {
    match (&settings.broker_username, &settings.broker_password) {
        (Some(u), Some(p)) => Ok((u.clone(), p.clone())),
        _ => anyhow::bail!("BROKER_USERNAME and BROKER_PASSWORD must both be set"),
    }
}

async fn stop_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
    tracing::info!("shutting down");
    shutdown.cancel();
}
