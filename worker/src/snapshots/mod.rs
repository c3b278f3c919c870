//! Presets and backups: one pipeline (dump → compress → seal → store) and the steps that put a snapshot back
//! into an instance's database.

pub mod apply;
pub mod deletion;
pub mod pipeline;
pub mod reseal;
pub mod sealed;
pub mod steps;
pub mod store;
pub mod target;

pub use pipeline::{Snapshots, Taken};
pub use target::{BindingGrant, DatabaseTarget, ServerLogin};
