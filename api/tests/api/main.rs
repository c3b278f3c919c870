//! In-process tests of the OSB API: the real router, a fresh database per test, `oneshot` requests. The worker
//! is simulated by changing task and row state directly in SQL.

mod abandoned;
mod actions;
mod auth_throttle;
mod bad_writes;
mod binding_expiry;
mod bindings;
mod catalog;
mod cluster;
mod dashboard;
mod database_restart;
mod deprovision;
mod events;
mod fetch;
mod helpers;
mod last_operation;
mod metrics;
mod middleware;
mod openapi;
mod price_check;
mod provision;
mod snapshot_deletes;
mod spec_edges;
mod synchronous;
mod update;
