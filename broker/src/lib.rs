//! berth's shared library: everything both `berth-api` and `berth-worker` need.

#[macro_use]
mod text_enum;

pub mod catalog;
pub mod config;
pub mod crypto;
pub mod dashboard_link;
pub mod db;
pub mod ec2;
pub mod embedded;
pub mod identity;
pub mod model;
pub mod names;
pub mod pools;
pub mod request_context;
pub mod snapshots;
pub mod telemetry;
pub mod webhook_target;

/// The broker's schema, embedded so every binary and test migrates the same way. Runs take sqlx's advisory
/// lock, so processes starting together apply each migration once. `ignore_missing`: a database already
/// migrated by a newer release (during a rolling upgrade, or after a rollback) does not stop this binary from
/// starting; migrations are written so the previous release's binaries work on the new schema
/// (docs/upgrading.md).
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate::Migrator {
    ignore_missing: true,
    ..sqlx::migrate!("../migrations")
};
