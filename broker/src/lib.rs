//! berth's shared library: everything both `berth-api` and `berth-worker` need.

#[macro_use]
mod text_enum;

pub mod catalog;
pub mod config;
pub mod crypto;
pub mod db;
pub mod ec2;
pub mod embedded;
pub mod model;
pub mod names;
pub mod snapshots;
pub mod telemetry;
pub mod webhook_target;

/// The broker's schema, embedded so every binary and test migrates the same way.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");
