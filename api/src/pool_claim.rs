//! Warm pools on the API side (docs/pools.md): a provision of a plan with a pool takes a ready item in the
//! transaction that records the instance, so the item is the instance's exactly when the instance exists. The
//! item's details and sealed secrets become the instance's, marked `pool_item`; the provision task then finishes
//! it (new names, new passwords) instead of building the instance from nothing. A provision naming a preset
//! takes a clone of the version it asks for (the newest ready one when it names none) from the plan's pools of
//! that preset's clones.

use axum::response::Response;
use broker::{
    catalog::Engine,
    db::{
        instances::{self, NewInstance},
        pools, presets, snapshots,
    },
    model::Operation,
    snapshots::PresetRef,
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

/// Which pooled item a provision can take.
pub(crate) enum Wanted {
    /// None: its parameters need the ordinary path (or the plan keeps no pool for them).
    Nothing,
    /// An item made with the plan's defaults.
    Defaults,
    /// A clone of this preset version.
    CloneOf(PresetVersion),
}

/// A ready preset version, as a provision names it and the instance's details record it.
pub(crate) struct PresetVersion {
    snapshot_id: uuid::Uuid,
    namespace: String,
    name: String,
    version: Option<i32>,
}

/// What `parameters` (checked already) allow a provision of `plan_id` to take from its pools.
pub(crate) async fn wanted(
    state: &AppState,
    plan_id: &str,
    engine: Engine,
    parameters: &Value,
) -> ApiResult<Wanted> {
    let Ok(Some(preset)) = PresetRef::of(parameters) else {
        let defaults =
            state.pool_targets.target(plan_id) > 0 && broker::pools::can_serve(engine, parameters);
        return Ok(if defaults {
            Wanted::Defaults
        } else {
            Wanted::Nothing
        });
    };
    if !state.pool_targets.has_preset_pool(plan_id)
        || !broker::pools::can_serve_preset(engine, parameters)
    {
        return Ok(Wanted::Nothing);
    }
    let Some(row) = presets::get(&state.db, &preset.namespace, &preset.name).await? else {
        return Ok(Wanted::Nothing);
    };
    let Some(version) = snapshots::ready_version(&state.db, row.id, preset.version).await? else {
        return Ok(Wanted::Nothing);
    };
    Ok(Wanted::CloneOf(PresetVersion {
        snapshot_id: version.id,
        namespace: row.namespace,
        name: row.name,
        version: version.version,
    }))
}

/// Tries the pools of `new`'s plan for the item `wanted` names.
pub(crate) async fn take(
    state: &AppState,
    new: &NewInstance<'_>,
    origin: &Origin,
    wanted: Wanted,
) -> ApiResult<Taken> {
    let clone = match &wanted {
        Wanted::Nothing => None,
        Wanted::Defaults => Some(None),
        Wanted::CloneOf(version) => Some(Some(version)),
    };
    if let Some(clone) = clone {
        let mut tx = state.db.begin().await?;
        let snapshot = clone.map(|c| c.snapshot_id);
        if let Some(item) = pools::claim(&mut *tx, new.plan_id, snapshot).await? {
            // Dropping the transaction without a commit puts the item back.
            if !instances::insert(&mut *tx, new).await? {
                return Ok(Taken::Exists);
            }
            let mut details = match item.details {
                Value::Object(map) => map,
                _ => Default::default(),
            };
            details.insert("pool_item".into(), json!(item.id));
            if let Some(version) = clone {
                // The version the clone holds, recorded as an ordinary preset provision records it; the
                // provision task sees it and does not put the preset in again.
                details.insert(
                    "preset".into(),
                    json!({
                        "namespace": version.namespace, "name": version.name,
                        "version": version.version, "snapshot_id": version.snapshot_id,
                    }),
                );
            }
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
