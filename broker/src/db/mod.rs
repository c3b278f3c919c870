//! Database access: small functions next to the table they serve.

pub mod bindings;
pub mod ec2_offers;
pub mod instances;
pub mod key_checks;
pub mod metrics;
pub mod presets;
pub mod snapshots;
pub mod backup_schedules;
pub mod tasks;
pub mod webhooks;

use std::time::Duration;

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
    let pool = PgPoolOptions::new()
        .max_connections(max_connections)
        // No ping before every checkout: it is a round trip per request. A connection broken by a server
        // restart fails its next query instead, and sqlx drops it.
        .test_before_acquire(false)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options.application_name("berth"))
        .await
        .map_err(|e| anyhow::anyhow!("connecting to the broker's database: {e}"))?;
    Ok(pool)
}

/// True when `err` is a unique-constraint violation (another request inserted the same row first).
pub fn is_unique_violation(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(db) if db.is_unique_violation())
}
