//! Deleting snapshots for good: the store objects queued in `snapshot_objects_to_delete` (by `berth-worker rekey`
//! for the objects its re-sealed copies replaced, and by the API's delete routes for deleted presets and backups),
//! and the template databases deleted preset versions left on the servers they were cloned on.

use std::collections::HashSet;

use anyhow::Context as _;
use broker::{db::instances, names::quote_ident};
use sqlx::PgPool;
use uuid::Uuid;

use super::{Snapshots, target::template_names};
use crate::{
    context::TaskContext,
    providers::{
        Progress,
        postgres::{database_exists, exec},
    },
    registry::TaskError,
};

/// Deletes every queued object from the store, then its queue row; a run cut short leaves the rest queued for the
/// next run. An object a snapshot row points at again (its key reused) is never deleted.
pub async fn delete_queued_objects(pool: &PgPool, snapshots: &Snapshots) -> anyhow::Result<usize> {
    let queued: Vec<String> =
        sqlx::query_scalar("SELECT object_key FROM snapshot_objects_to_delete ORDER BY queued_at")
            .fetch_all(pool)
            .await
            .context("reading the snapshot objects queued for deletion")?;
    for object_key in &queued {
        let live: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM snapshots WHERE object_key = $1)")
                .bind(object_key)
                .fetch_one(pool)
                .await?;
        if !live {
            snapshots
                .store
                .delete(object_key)
                .await
                .with_context(|| format!("deleting the snapshot object {object_key}"))?;
        }
        sqlx::query("DELETE FROM snapshot_objects_to_delete WHERE object_key = $1")
            .bind(object_key)
            .execute(pool)
            .await?;
    }
    Ok(queued.len())
}

/// How many instances each page of the template sweep reads.
const PAGE: i64 = 200;

/// Drops the template databases of `snapshot_ids` (preset versions) on every server a provisioned postgres instance of
/// this worker's engines lives on: a template is built on the server of an instance selected or provisioned from
/// the version. A server that cannot be reached is skipped with a warning (its template is named by the deleted
/// snapshot's id, so nothing uses it again); returns how many templates were dropped.
pub async fn drop_templates(
    ctx: &TaskContext<'_>,
    snapshot_ids: &[Uuid],
) -> Result<usize, TaskError> {
    if snapshot_ids.is_empty() {
        return Ok(0);
    }
    let services = ctx.services;
    let plan_ids: Vec<String> = services
        .catalog
        .services()
        .iter()
        .flat_map(|s| &s.plans)
        .filter(|p| {
            services
                .catalog
                .plan_by_id(&p.id)
                .is_some_and(|p| p.has_database())
        })
        .filter(|p| services.provider_for_plan(&p.id).is_ok())
        .map(|p| p.id.clone())
        .collect();
    let prefix = services.name_prefix();
    let mut seen_servers = HashSet::new();
    let mut dropped = 0;
    let mut after = String::new();
    loop {
        let page = instances::provisioned_ids_page(ctx.pool, &plan_ids, &after, PAGE)
            .await
            .context("listing the instances whose servers may hold templates")?;
        let Some(last) = page.last() else {
            return Ok(dropped);
        };
        after = last.clone();
        for id in &page {
            let Some(instance) = instances::get(ctx.pool, id)
                .await
                .context("reading an instance")?
            else {
                continue;
            };
            let target = match super::steps::target_of(ctx, &instance).await {
                Ok(Progress::Done(target)) => target,
                Ok(Progress::Wait { .. }) => continue,
                Err(e) => {
                    tracing::warn!(instance_id = %instance.id, "cannot reach the instance's server to drop preset templates: {e}");
                    continue;
                }
            };
            let server = format!("{:?}:{}", target.login.host, target.login.port);
            if !seen_servers.insert(server.clone()) {
                continue;
            }
            let mut admin = match target
                .login
                .connect("postgres", "connecting to drop preset templates")
                .await
            {
                Ok(admin) => admin,
                Err(e) => {
                    tracing::warn!(%server, "cannot reach the server to drop preset templates: {e}");
                    continue;
                }
            };
            for id in snapshot_ids {
                let (template, building) = template_names(prefix, *id);
                for name in [template, building] {
                    let existed = database_exists(&mut admin, &name).await?;
                    if existed {
                        // A published template is marked IS_TEMPLATE, which Postgres refuses to drop.
                        let quoted = quote_ident(&name);
                        // Two statements: DROP DATABASE refuses to run in a multi-statement query.
                        let what = "dropping a preset template";
                        exec(
                            &mut admin,
                            &format!("ALTER DATABASE {quoted} WITH IS_TEMPLATE false"),
                            what,
                        )
                        .await?;
                        exec(
                            &mut admin,
                            &format!("DROP DATABASE IF EXISTS {quoted} WITH (FORCE)"),
                            what,
                        )
                        .await?;
                        dropped += 1;
                    }
                }
            }
        }
    }
}
