//! Warm pools on the API side (docs/pools.md): a provision of a plan with a pool takes a ready item in the
//! transaction that records the instance, so the item is the instance's exactly when the instance exists. The
//! item's details and sealed secrets become the instance's, marked `pool_item`; the provision task then finishes
//! it (new names, new passwords) instead of building the instance from nothing.

use axum::response::Response;
use broker::{
    db::{
        instances::{self, NewInstance},
        pools,
    },
    model::Operation,
};
use serde_json::{Value, json};

use crate::{
    AppState,
    error::ApiResult,
    routes::{Origin, exclusive},
};

/// What a provision got from its plan's pool.
pub(crate) enum Taken {
    /// An item: the instance and its task are committed; the answer is the 202.
    Item(Response),
    /// No item it could use (counted as a miss): the ordinary path follows.
    Nothing,
    /// The instance id exists already: the ordinary path answers the repeated request.
    Exists,
}

/// Tries the pool of `new`'s plan; `servable`: whether an item made with the plan's defaults can serve the
/// request's parameters.
pub(crate) async fn take(
    state: &AppState,
    new: &NewInstance<'_>,
    origin: &Origin,
    servable: bool,
) -> ApiResult<Taken> {
    if servable {
        let mut tx = state.db.begin().await?;
        if let Some(item) = pools::claim(&mut *tx, new.plan_id).await? {
            // Dropping the transaction without a commit puts the item back.
            if !instances::insert(&mut *tx, new).await? {
                return Ok(Taken::Exists);
            }
            let mut details = match item.details {
                Value::Object(map) => map,
                _ => Default::default(),
            };
            details.insert("pool_item".into(), json!(item.id));
            instances::set_details(
                &mut *tx,
                new.id,
                &Value::Object(details),
                item.secrets.as_deref(),
            )
            .await?;
            pools::count(&mut *tx, new.plan_id, true).await?;
            let task = origin
                .clone()
                .task(Operation::Provision, new.id, None, json!({}));
            return Ok(Taken::Item(exclusive::start(tx, task).await?));
        }
    }
    if instances::get(&state.db, new.id).await?.is_some() {
        return Ok(Taken::Exists);
    }
    pools::count(&state.db, new.plan_id, false).await?;
    Ok(Taken::Nothing)
}
