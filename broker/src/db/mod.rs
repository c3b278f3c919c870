//! Database access: small functions next to the table they serve.

pub mod backup_schedules;
pub mod bindings;
pub mod dashboard;
pub mod ec2_offers;
pub mod events;
pub mod instances;
pub mod key_checks;
pub mod metrics;
pub mod pools;
pub mod presets;
pub mod snapshots;
pub mod tasks;
pub mod webhooks;

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use secrecy::{ExposeSecret, SecretString};
use sqlx::{
    PgPool,
    postgres::{PgConnectOptions, PgPoolOptions},
};

/// Opens a pool to the broker's database.
pub async fn connect(url: &SecretString, max_connections: u32) -> anyhow::Result<PgPool> {
    let options: PgConnectOptions = url
        .expose_secret()
        .parse()
        .map_err(|_| anyhow::anyhow!("DATABASE_URL is not a valid Postgres URL"))?;
    let pool = pool_options(max_connections)
        .connect_with(options.application_name("berth"))
        .await
        .map_err(|e| anyhow::anyhow!("connecting to the broker's database: {e}"))?;
    Ok(pool)
}

/// The broker pool's settings. No ping before every checkout: it is a round trip per request. A connection
/// broken by a server restart fails its next query instead, and sqlx drops it; so that the pool's other idle
/// connections (as broken) do not each fail a request too, every checkout pings for a while after such a failure
/// (see [`note_connection_failure`]).
pub fn pool_options(max_connections: u32) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .test_before_acquire(false)
        .before_acquire(|conn, _| {
            Box::pin(async move {
                if !recently_failed() {
                    return Ok(true);
                }
                // A connection that does not answer is closed, and the checkout takes another (or a new one).
                Ok(sqlx::Connection::ping(conn).await.is_ok())
            })
        })
        .acquire_timeout(Duration::from_secs(10))
}

/// When a query last found the broker's database unreachable, in ms since the Unix epoch (0: never).
static LAST_CONNECTION_FAILURE_MS: AtomicU64 = AtomicU64::new(0);
/// How long after such a failure checkouts ping their connection.
const PING_AFTER_FAILURE: Duration = Duration::from_secs(30);

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Records that a query failed for want of a working connection (a restart, a network cut): for the next
/// [`PING_AFTER_FAILURE`], checkouts from pools made by [`pool_options`] ping first and drop dead connections.
pub fn note_connection_failure() {
    LAST_CONNECTION_FAILURE_MS.store(now_ms(), Ordering::Relaxed);
}

fn recently_failed() -> bool {
    let last = LAST_CONNECTION_FAILURE_MS.load(Ordering::Relaxed);
    last != 0 && now_ms().saturating_sub(last) < PING_AFTER_FAILURE.as_millis() as u64
}

/// True when `err` is a unique-constraint violation (another request inserted the same row first).
pub fn is_unique_violation(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(db) if db.is_unique_violation())
}
