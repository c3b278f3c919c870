//! A warm-pool VM made the instance's (docs/pools.md). Its resources get the instance's tags (`berth:instance`
//! and `Name` with the instance's id, the `tags` parameter): one CreateTags over all of them, so the reconcile
//! loop's recovery and the teardown find them as any instance's. Then, over TLS as berth's superuser, the app
//! database, the admin user and the owner role get the instance's names, and the admin user and the superuser
//! new passwords; the new ones are kept (sealed, in the instance's secrets, beside the superuser's pooled one)
//! before Postgres gets them, so a retry after a crash sets the same ones and connects with either.
//!
//! An item whose VM went while it was pooled (a spot interruption the reconcile loop had not seen yet) is not
//! adopted: its resources are torn down and the provision takes the ordinary path, with new passwords.

use anyhow::Context as _;
use broker::{
    db::{instances, instances::InstanceRow},
    names::quote_ident,
};
use serde_json::json;
use tracing::{info, warn};

use super::{
    Ec2Postgres, Params, Secrets, State, cloud_init, default_version, group_name, is_spot,
    provision::{Run, provisioned},
    resource_tags, superuser,
};
use crate::{
    context::TaskContext,
    providers::{
        Progress, Provisioned,
        ec2_common::{pooled, teardown, vm},
        postgres::{add_extensions, connect, exec, pooled_renames, roles::ensure_login, scram},
    },
    records::Record,
    registry::TaskError,
};

/// Details key: the item's VM was gone at the take, so the provision went the ordinary way.
const FELL_BACK: &str = "pool_fell_back";

impl Ec2Postgres {
    pub(super) async fn adopt_vm(
        &self,
        ctx: &TaskContext<'_>,
        instance: &InstanceRow,
        pool_item: &str,
    ) -> Result<Progress<Provisioned>, TaskError> {
        if instance.details.get(FELL_BACK).is_some() {
            return self.provision_fresh(ctx, instance).await;
        }
        let t0 = std::time::Instant::now();
        let params = Params::of(
            &instance.parameters,
            is_spot(ctx.services, &instance.plan_id),
            &default_version(ctx.services, &instance.plan_id),
        )?;
        let prefix = ctx.services.name_prefix();
        let state = State::of(&instance.details);
        let client = self.client(&self.region_of(None, &state));
        let running = match &state.vm_id {
            Some(id) => vm::vm(&client, id)
                .await?
                .filter(|found| found.state == "running"),
            None => None,
        };
        if running.is_none() {
            return self.fall_back(ctx, instance, pool_item, &state).await;
        }
        let tags = resource_tags(prefix, &instance.id, &params.tags);
        let known: Vec<String> = [
            &state.vm_id,
            &state.volume_id,
            &state.security_group_id,
            &state.allocation_id,
        ]
        .into_iter()
        .flatten()
        .cloned()
        .collect();
        let tagged = vm::retag(&client, pool_item, &known, &tags).await?;
        let tagged_ms = t0.elapsed().as_millis();

        let secrets = next_secrets(ctx, instance).await?;
        let host = state.host().unwrap_or_default().to_string();
        let renames = pooled_renames(
            instance,
            prefix,
            pool_item,
            &params.app_db_name,
            &params.admin_user,
        );
        {
            let mut conn = match connect_either(&host, &secrets).await {
                Ok(conn) => conn,
                // Without the readiness probe an item is offered once its VM runs: the server may still be
                // installing.
                Err(_) if !self.account.readiness_probe => {
                    return Ok(Progress::wait_secs(
                        10,
                        format!("waiting for PostgreSQL on the pooled VM ({host})"),
                    ));
                }
                Err(e) => return Err(e),
            };
            for (kind, from, to) in &renames {
                kind.apply(&mut conn, from, to).await?;
            }
            ensure_login(
                &mut conn,
                &params.admin_user,
                "CREATEDB",
                &secrets.admin_password,
            )
            .await?;
            exec(
                &mut conn,
                &format!(
                    "ALTER ROLE {} WITH {}",
                    quote_ident(cloud_init::SUPERUSER),
                    scram::password_clause(&secrets.superuser_password)?
                ),
                "setting the superuser's new password",
            )
            .await?;
        }
        let renamed_ms = t0.elapsed().as_millis();
        add_extensions(
            &|database: &str| superuser(&host, &secrets.superuser_password, database),
            &params.app_db_name,
            &params.extensions,
        )
        .await?;
        info!(
            instance_id = %instance.id,
            pool_item,
            resources_tagged = tagged.len(),
            tags_ms = tagged_ms,
            renames_passwords_ms = renamed_ms - tagged_ms,
            extensions_ms = t0.elapsed().as_millis() - renamed_ms,
            "pooled VM adopted"
        );
        let run = Run {
            ctx,
            instance,
            record: Record::Instance(instance.id.clone()),
            params: &params,
            client: &client,
            tags: &tags,
        };
        let kept = Secrets {
            pooled_superuser_password: None,
            ..secrets
        };
        let mut made = provisioned(&run, state, host, &kept);
        made.details["pool_item"] = json!(pool_item);
        Ok(Progress::Done(made))
    }

    /// The item's VM is gone: everything tagged with the item's id (or, after a re-tag, the instance's) goes,
    /// then the instance gets new passwords and an empty EC2 state, and the ordinary provision makes it.
    async fn fall_back(
        &self,
        ctx: &TaskContext<'_>,
        instance: &InstanceRow,
        pool_item: &str,
        state: &State,
    ) -> Result<Progress<Provisioned>, TaskError> {
        warn!(instance_id = %instance.id, pool_item, vm = ?state.vm_id, "the pooled VM is gone; provisioning the ordinary way");
        let client = self.client(&self.region_of(None, state));
        let prefix = ctx.services.name_prefix();
        // The instance's details name the item: its resources and its group go too.
        let torn_down = teardown::tear_down_instance(
            &client,
            instance,
            |key| group_name(prefix, key),
            std::time::Duration::from_secs(5),
            "pooled VM",
        )
        .await?;
        if let Progress::Wait { after, progress } = torn_down {
            return Ok(Progress::Wait { after, progress });
        }
        let fresh = ctx.services.cipher.seal_json(&Secrets::generate());
        let reset = json!({ "ec2": State::default(), FELL_BACK: true });
        let fresh_instance = pooled::start_over(ctx, instance, fresh, reset).await?;
        self.provision_fresh(ctx, &fresh_instance).await
    }

    async fn provision_fresh(
        &self,
        ctx: &TaskContext<'_>,
        instance: &InstanceRow,
    ) -> Result<Progress<Provisioned>, TaskError> {
        use crate::providers::Provider as _;
        self.provision(ctx, instance).await
    }
}

/// The instance's passwords for the adopted VM: made and kept (with the item's superuser password beside them)
/// on the first try, read back on a retry.
async fn next_secrets(ctx: &TaskContext<'_>, instance: &InstanceRow) -> Result<Secrets, TaskError> {
    let sealed = instance
        .secrets
        .as_ref()
        .ok_or_else(|| TaskError::fatal("the pool item has no stored secrets"))?;
    let current: Secrets = ctx
        .services
        .cipher
        .open_json(sealed)
        .map_err(|e| TaskError::Fatal(e.context("opening the pool item's secrets")))?;
    if current.pooled_superuser_password.is_some() {
        return Ok(current);
    }
    let next = Secrets {
        pooled_superuser_password: Some(current.superuser_password),
        ..Secrets::generate()
    };
    instances::set_secrets(
        ctx.pool,
        &instance.id,
        &ctx.services.cipher.seal_json(&next),
    )
    .await
    .context("keeping the instance's new passwords")?;
    Ok(next)
}

/// berth's superuser on the VM with the new password or, before it is set (the first try, or a crash before
/// the ALTER ROLE), the item's.
async fn connect_either(host: &str, secrets: &Secrets) -> Result<sqlx::PgConnection, TaskError> {
    let what = "connecting to the pooled VM's server";
    match connect(
        &superuser(host, &secrets.superuser_password, "postgres"),
        what,
    )
    .await
    {
        Ok(conn) => Ok(conn),
        Err(first) => match &secrets.pooled_superuser_password {
            Some(pooled) => connect(&superuser(host, pooled, "postgres"), what)
                .await
                .map_err(|_| first),
            None => Err(first),
        },
    }
}
