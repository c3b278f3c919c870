//! `pool.remove`: takes a warm-pool item apart with its plan's provider (the deprovision of an instance that
//! has no bindings), then deletes its row. Used for recycling, draining and what a failed fill left.

use anyhow::Context as _;
use async_trait::async_trait;
use broker::{db::pools, model::kinds};

use super::{pool_fill::ItemPayload, ready};
use crate::{
    context::TaskContext,
    pools::item_as_instance,
    registry::{Step, TaskError, TaskHandler},
};

pub struct PoolRemove;

#[async_trait]
impl TaskHandler for PoolRemove {
    fn kind(&self) -> &'static str {
        kinds::POOL_REMOVE
    }

    async fn run(&self, ctx: &TaskContext<'_>) -> Result<Step, TaskError> {
        let payload: ItemPayload = ctx.payload()?;
        let Some(item) = pools::get(ctx.pool, &payload.item)
            .await
            .context("reading the pool item")?
        else {
            return Ok(Step::Done);
        };
        let provider = ctx.services.provider_for_plan(&item.plan_id)?;
        let instance = item_as_instance(ctx.services, &item);
        if let Err(wait) = ready(provider.deprovision(ctx, &instance, &[]).await?) {
            return Ok(wait);
        }
        pools::delete(ctx.pool, &item.id)
            .await
            .context("deleting the pool item's row")?;
        Ok(Step::Done)
    }
}
