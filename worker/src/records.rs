//! Where a provider's steps record their progress (details merged as each step completes, and secrets made
//! before anything uses them): the instance's row, or, while `pool.fill` makes a warm-pool item, the item's
//! (an item has no instance row; docs/pools.md). The task being run says which, so an engine's state machine
//! saves the same way for both.

use broker::{
    db::{instances, pools},
    model::kinds,
};
use serde_json::Value;
use sqlx::PgPool;

use crate::context::TaskContext;

/// The row a step's progress lands on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Instance(String),
    PoolItem(String),
}

impl Record {
    /// The row of `id` for the task `ctx` runs: a pool item's while it is filled, else the instance's.
    pub fn of(ctx: &TaskContext<'_>, id: &str) -> Self {
        if ctx.task.kind == kinds::POOL_FILL {
            Self::PoolItem(id.to_string())
        } else {
            Self::Instance(id.to_string())
        }
    }

    /// The instance's or the item's id (the key of its names and its cloud resources' tags).
    pub fn id(&self) -> &str {
        match self {
            Self::Instance(id) | Self::PoolItem(id) => id,
        }
    }

    /// Merges `patch` into the details (top-level keys).
    pub async fn merge_details(&self, pool: &PgPool, patch: &Value) -> sqlx::Result<()> {
        match self {
            Self::Instance(id) => instances::merge_details(pool, id, patch).await,
            Self::PoolItem(id) => pools::merge_filling_details(pool, id, patch).await,
        }
    }

    /// Replaces the sealed secrets.
    pub async fn set_secrets(&self, pool: &PgPool, sealed: &[u8]) -> sqlx::Result<()> {
        match self {
            Self::Instance(id) => instances::set_secrets(pool, id, sealed).await,
            Self::PoolItem(id) => pools::set_filling_secrets(pool, id, sealed).await,
        }
    }
}
