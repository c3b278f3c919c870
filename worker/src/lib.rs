//! berth's worker as a library: the durable task queue (claim, lease, heartbeat, reclaim), the task kinds
//! and the providers that carry them out. `main.rs` only reads settings and calls [`run`].

pub mod backup_scheduler;
pub mod binding_expiry;
pub mod context;
pub mod delivery;
pub mod event_retention;
pub mod http;
pub mod pools;
pub mod providers;
pub mod queue;
pub mod reconcile;
pub mod records;
pub mod registry;
pub mod rekey;
pub mod runner;
pub mod snapshots;
pub mod tasks;

pub use context::{Services, TaskContext};
pub use registry::{Registry, Step, TaskError, TaskHandler};
pub use runner::{WorkerConfig, run, run_until_idle};
