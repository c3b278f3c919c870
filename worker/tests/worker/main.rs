//! The worker's integration tests: real Postgres, a fresh database per test (`#[sqlx::test]`).

mod backup_scheduler;
mod binding_expiry;
mod crash;
mod ec2;
mod ha_ec2;
mod helpers;
mod layout;
mod local_postgres;
mod peers;
mod pools;
mod queue;
mod rekey;
mod s3;
mod shared_postgres;
mod task_errors;
mod webhook;
