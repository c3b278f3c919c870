//! The `ec2` engine of the dedicated plans (`dedicated-spot`, and `dedicated` with `DEDICATED_ENGINE=ec2`): a
//! PostgreSQL server per instance on an EC2 VM chosen by price (`broker::ec2`), its data on an encrypted EBS
//! volume that outlives VMs, set up by cloud-init.
//!
//! Provisioning is a state machine over the instance's details (`details.ec2`; a warm-pool item's while
//! `pool.fill` makes one, see `crate::records`), one step per task run, so a
//! retry after a crash goes on where the first try stopped and a booting VM is a `Wait`, not a held worker
//! slot: candidates → zone → security group → data volume → (Elastic IP) → VM → running → volume attached →
//! (address associated) → Postgres answers (unless `EC2_READINESS_PROBE=off`). Every resource carries the tag
//! `berth:instance=<id>` and is looked up by it before it is made; RunInstances also gets a ClientToken
//! derived from the task id, which AWS itself deduplicates.
//!
//! The reconcile loop replaces VMs that vanished (spot interruptions, terminations): see [`recovery`]. A warm-pool
//! item taken by a provision is made the instance's by [`adopt`] (docs/pools.md).

mod adopt;
mod cloud_init;
mod provision;

use provision::{Run, provisioned};
mod recovery;

use std::time::Duration;

use anyhow::Context as _;
use async_trait::async_trait;
use aws_sdk_ec2::Client;
use broker::{
    config::Settings,
    crypto::random_password,
    db::{bindings::BindingRow, instances, instances::InstanceRow},
    ec2::{Candidate, Requirements},
    model::UpdatePayload,
    names,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sqlx::{
    PgPool,
    postgres::{PgConnectOptions, PgSslMode},
};

use super::{
    Bound, Progress, Provider, Provisioned,
    ec2_common::{self, Ec2Account, offers, vm},
    postgres::{
        DEFAULT_ADMIN, DEFAULT_APP_DB, ServerAccess, add_extensions, app_db_name, bind_role,
        connect, exec, requested_extensions, revoke_binding_role, tuning,
    },
};
use crate::{
    context::{Services, TaskContext},
    records::Record,
    registry::TaskError,
};

pub use cloud_init::{Rendered, UserData, render as render_user_data};
pub use recovery::Cycle;

/// The plan engine this provider serves.
pub const ENGINE: &str = "ec2";
const PORT: u16 = 5432;
/// How long Postgres may take to answer after the VM runs (cloud-init installs it) before the provision fails.
const READY_LIMIT_SECS: i64 = 20 * 60;
const DEFAULT_VERSION: &str = "17";

/// What berth knows about an instance's EC2 resources (`details.ec2`), written as each step completes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct State {
    pub region: Option<String>,
    pub zone: Option<String>,
    pub candidates: Vec<Candidate>,
    /// The candidate the next launch tries (moves on when a type has no capacity).
    pub candidate_index: usize,
    pub security_group_id: Option<String>,
    pub volume_id: Option<String>,
    pub allocation_id: Option<String>,
    pub static_ip: Option<String>,
    pub vm_id: Option<String>,
    pub instance_type: Option<String>,
    pub launched_at: Option<i64>,
    pub ip_private: Option<String>,
    pub ip_public: Option<String>,
    /// Types whose VM vanished within five minutes: last in the candidate list from then on.
    pub short_lived_types: Vec<String>,
    /// VMs launched by recoveries so far (part of their ClientToken).
    pub generation: u32,
    /// A replacement VM is on its way (the reconcile loop drives it).
    pub recovering: bool,
}

impl State {
    pub fn of(details: &Value) -> Self {
        details
            .get("ec2")
            .and_then(|v| serde_json::from_value(v.clone()).ok())
            .unwrap_or_default()
    }

    /// Records the state where the step's progress is kept (the instance, or the pool item being filled).
    async fn save(&self, pool: &PgPool, record: &Record) -> Result<(), TaskError> {
        record
            .merge_details(pool, &json!({ "ec2": self }))
            .await
            .context("recording the EC2 state")?;
        Ok(())
    }

    /// Where apps connect: the Elastic IP, else the public address when asked for, else the private one.
    pub fn host(&self) -> Option<&str> {
        self.static_ip
            .as_deref()
            .or(self.ip_public.as_deref())
            .or(self.ip_private.as_deref())
    }
}

/// The secrets the VM is set up with, kept (sealed) before the first launch so a retry renders the same ones.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Secrets {
    admin_password: String,
    superuser_password: String,
    /// While a pool item is adopted: the superuser password it was made with, until the new one is set (a retry
    /// after a crash between setting and storing connects with either). Gone once the instance is provisioned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pooled_superuser_password: Option<String>,
}

impl Secrets {
    fn generate() -> Self {
        Self {
            admin_password: random_password(32),
            superuser_password: random_password(32),
            pooled_superuser_password: None,
        }
    }
}

/// The parameters the engine acts on.
#[derive(Debug, Clone)]
struct Params {
    requirements: Requirements,
    region: Option<String>,
    postgres_version: String,
    tuning_profile: String,
    app_db_name: String,
    admin_user: String,
    extensions: Vec<String>,
    public_ip: bool,
    static_ip: bool,
    ssh_keys: Vec<String>,
    tags: Vec<(String, String)>,
}

impl Params {
    /// `default_version`: the plan's (see [`default_version`]), for a provision that names none.
    fn of(parameters: &Value, spot: bool, default_version: &str) -> Result<Self, TaskError> {
        let text = |key: &str, default: &str| {
            parameters
                .get(key)
                .and_then(Value::as_str)
                .unwrap_or(default)
                .to_string()
        };
        let flag = |key: &str| {
            parameters
                .get(key)
                .and_then(Value::as_bool)
                .unwrap_or(false)
        };
        let requirements =
            Requirements::from_parameters(parameters, spot).map_err(TaskError::fatal)?;
        if requirements.local_storage {
            return Err(TaskError::fatal(
                "storage_type `local` is not offered by the ec2 engine yet: its data would not survive an eviction; \
                 use `network` (an EBS volume)",
            ));
        }
        let tags = ec2_common::extra_tags(parameters)?;
        Ok(Self {
            requirements,
            region: parameters
                .get("region")
                .and_then(Value::as_str)
                .map(str::to_string),
            postgres_version: text("postgres_version", default_version),
            tuning_profile: text("tuning_profile", "default"),
            app_db_name: text("app_db_name", DEFAULT_APP_DB),
            admin_user: text("admin_user", DEFAULT_ADMIN),
            extensions: requested_extensions(parameters)?,
            public_ip: flag("public_ip"),
            static_ip: flag("static_ip"),
            ssh_keys: ec2_common::ssh_keys(parameters),
            tags,
        })
    }
}

pub struct Ec2Postgres {
    account: Ec2Account,
}

impl std::fmt::Debug for Ec2Postgres {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ec2Postgres")
            .field("region", &self.account.default_region)
            .finish_non_exhaustive()
    }
}

impl Ec2Postgres {
    pub fn new(settings: &Settings) -> anyhow::Result<Self> {
        Ok(Self {
            account: Ec2Account::new(settings, ENGINE)?,
        })
    }

    /// An EC2 client for `region` (one per region, kept).
    pub fn client(&self, region: &str) -> Client {
        self.account.client(region)
    }

    fn region_of(&self, params_region: Option<&str>, state: &State) -> String {
        state
            .region
            .clone()
            .or(params_region.map(str::to_string))
            .unwrap_or_else(|| self.account.default_region.clone())
    }

    /// Refreshes the cached offers of `region` when stale (the reconcile loop keeps the default region warm for
    /// the API's price check).
    pub async fn refresh_offers(&self, pool: &PgPool, region: &str) -> Result<usize, TaskError> {
        Ok(offers::fresh(
            pool,
            &self.client(region),
            region,
            self.account.offers_ttl_secs,
            &self.account.on_demand,
        )
        .await?
        .len())
    }

    /// One reconcile pass over the ec2 instances, without the offers refresh: what it looked at and how many
    /// DescribeInstances calls it made (the benchmark prints both).
    pub async fn reconcile_cycle(
        &self,
        pool: &PgPool,
        services: &Services,
    ) -> anyhow::Result<Cycle> {
        recovery::reconcile(self, pool, services).await
    }

    /// The state of one VM (`running`, `terminated`, ...) by a DescribeInstances of its own, `None` when EC2 does
    /// not know it: what a per-instance check would cost (the benchmark's anchor).
    pub async fn vm_state(&self, region: &str, vm_id: &str) -> Result<Option<String>, TaskError> {
        Ok(vm::vm(&self.client(region), vm_id).await?.map(|v| v.state))
    }
}

/// The PostgreSQL version a provision of `plan_id` that names none gets: the default of the plan's
/// `postgres_version` parameter where its plan file sets one (what a warm pool's items, made with no parameters,
/// run), else the engine's.
fn default_version(services: &Services, plan_id: &str) -> String {
    ec2_common::plan_default(services, plan_id, "postgres_version")
        .unwrap_or_else(|| DEFAULT_VERSION.to_string())
}

fn is_spot(services: &Services, plan_id: &str) -> bool {
    services
        .catalog
        .plan_by_id(plan_id)
        .is_some_and(|p| p.has_feature("spot"))
}

/// The security group's name (unique per VPC).
fn group_name(prefix: &str, instance_id: &str) -> String {
    format!(
        "{}pg-{}",
        prefix.replace('_', "-"),
        names::short_hash(instance_id)
    )
}

fn resource_tags(
    prefix: &str,
    instance_id: &str,
    extra: &[(String, String)],
) -> Vec<(String, String)> {
    let mut tags = vec![
        (vm::TAG.to_string(), instance_id.to_string()),
        (
            "Name".to_string(),
            format!(
                "{}pg-{}",
                prefix.replace('_', "-"),
                names::short_hash(instance_id)
            ),
        ),
    ];
    tags.extend(extra.iter().filter(|(k, _)| k != "Name").cloned());
    tags
}

/// Superuser connect options for `database` on the VM, over TLS.
fn superuser(host: &str, password: &str, database: &str) -> PgConnectOptions {
    PgConnectOptions::new()
        .host(host)
        .port(PORT)
        .username(cloud_init::SUPERUSER)
        .password(password)
        .database(database)
        .ssl_mode(PgSslMode::Require)
        .application_name("berth-worker")
}

async fn secrets(ctx: &TaskContext<'_>, instance: &InstanceRow) -> Result<Secrets, TaskError> {
    if let Some(sealed) = &instance.secrets {
        return ctx
            .services
            .cipher
            .open_json(sealed)
            .map_err(|e| TaskError::Fatal(e.context("opening the secrets")));
    }
    let made = Secrets::generate();
    Record::of(ctx, &instance.id)
        .set_secrets(ctx.pool, &ctx.services.cipher.seal_json(&made))
        .await
        .context("keeping the generated passwords")?;
    Ok(made)
}

/// Where the instance's server is reached and its (sealed) passwords.
async fn server_of(
    ctx: &TaskContext<'_>,
    instance: &InstanceRow,
) -> Result<(String, Secrets), TaskError> {
    let secrets = secrets(ctx, instance).await?;
    let host = State::of(&instance.details)
        .host()
        .unwrap_or_default()
        .to_string();
    Ok((host, secrets))
}

/// The cloud-init user-data that sets the instance's server up on the data volume `volume_id`.
fn user_data(
    prefix: &str,
    instance: &InstanceRow,
    params: &Params,
    secrets: &Secrets,
    volume_id: &str,
    tuning_profile: &str,
) -> anyhow::Result<Rendered> {
    let owner = names::instance_owner_role(prefix, &instance.id);
    let server_name = group_name(prefix, &instance.id);
    render_user_data(&UserData {
        instance_id: &instance.id,
        server_name: &server_name,
        postgres_version: &params.postgres_version,
        volume_id,
        tuning_profile,
        app_db_name: &params.app_db_name,
        admin_user: &params.admin_user,
        admin_password: &secrets.admin_password,
        owner_role: &owner,
        superuser_password: &secrets.superuser_password,
        extensions: &params.extensions,
        ssh_keys: &params.ssh_keys,
    })
}

#[async_trait]
impl Provider for Ec2Postgres {
    async fn provision(
        &self,
        ctx: &TaskContext<'_>,
        instance: &InstanceRow,
    ) -> Result<Progress<Provisioned>, TaskError> {
        let spot = is_spot(ctx.services, &instance.plan_id);
        let params = Params::of(
            &instance.parameters,
            spot,
            &default_version(ctx.services, &instance.plan_id),
        )?;
        let secrets = secrets(ctx, instance).await?;
        let prefix = ctx.services.name_prefix();
        let mut state = State::of(&instance.details);
        let region = self.region_of(params.region.as_deref(), &state);
        let client = self.client(&region);
        if state.region.is_none() {
            state.region = Some(region.clone());
        }
        let tags = resource_tags(prefix, &instance.id, &params.tags);
        let run = Run {
            ctx,
            instance,
            record: Record::of(ctx, &instance.id),
            params: &params,
            client: &client,
            tags: &tags,
        };
        // Each step records what it made in `state` (saved) and is skipped once that is there.
        self.choose_candidates(&run, &region, &mut state).await?;
        self.ensure_security_group(&run, &mut state).await?;
        let volume = self.ensure_volume(&run, &mut state).await?;
        self.ensure_static_ip(&run, &mut state).await?;
        let running = match self
            .running(&run, spot, &secrets, &volume, &mut state)
            .await?
        {
            Progress::Done(vm) => vm,
            Progress::Wait { after, progress } => return Ok(Progress::Wait { after, progress }),
        };
        // Volume and address on the VM; addresses recorded.
        recovery::settle(&client, &mut state, &running, &volume).await?;
        state.save(ctx.pool, &run.record).await?;
        let host = state.host().unwrap_or_default().to_string();
        if let Some(wait) = self.postgres_waited_for(&host, &secrets, &state).await? {
            return Ok(wait);
        }
        Ok(Progress::Done(provisioned(&run, state, host, &secrets)))
    }

    async fn adopt(
        &self,
        ctx: &TaskContext<'_>,
        instance: &InstanceRow,
        pool_item: &str,
    ) -> Result<Progress<Provisioned>, TaskError> {
        self.adopt_vm(ctx, instance, pool_item).await
    }

    async fn update(
        &self,
        ctx: &TaskContext<'_>,
        instance: &InstanceRow,
        update: &UpdatePayload,
    ) -> Result<Progress<()>, TaskError> {
        if update.plan_id != instance.plan_id {
            return Err(TaskError::fatal(
                "an instance cannot move between a dedicated plan and another: provision a new instance",
            ));
        }
        let extensions = requested_extensions(&update.parameters)?;
        let profile = update
            .parameters
            .get("tuning_profile")
            .and_then(Value::as_str);
        if extensions.is_empty() && profile.is_none() {
            return Ok(Progress::Done(()));
        }
        let (host, secrets) = server_of(ctx, instance).await?;
        if let Some(profile) = profile {
            let mut su = connect(
                &superuser(&host, &secrets.superuser_password, "postgres"),
                "connecting to the server",
            )
            .await?;
            // Settings that need a restart take effect at the next one (a replacement VM restarts it too).
            for (key, value) in tuning::settings(profile) {
                exec(
                    &mut su,
                    &format!("ALTER SYSTEM SET {key} = '{value}'"),
                    "applying the tuning profile",
                )
                .await?;
            }
            exec(
                &mut su,
                "SELECT pg_reload_conf()",
                "reloading the configuration",
            )
            .await?;
            instances::merge_details(
                ctx.pool,
                &instance.id,
                &json!({ "tuning_profile": profile }),
            )
            .await
            .context("recording the tuning profile")?;
        }
        add_extensions(
            &|database: &str| superuser(&host, &secrets.superuser_password, database),
            app_db_name(instance),
            &extensions,
        )
        .await?;
        Ok(Progress::Done(()))
    }

    async fn deprovision(
        &self,
        ctx: &TaskContext<'_>,
        instance: &InstanceRow,
        _bindings: &[BindingRow],
    ) -> Result<Progress<()>, TaskError> {
        super::wait_for_reconcile(ctx.pool, super::EC2_LOCKS, &instance.id)
            .await
            .context("waiting for the reconcile loop to leave the instance")?;
        let state = State::of(&instance.details);
        let params_region = instance.parameters.get("region").and_then(Value::as_str);
        let client = self.client(&self.region_of(params_region, &state));
        let prefix = ctx.services.name_prefix();
        super::ec2_common::teardown::tear_down_instance(
            &client,
            instance,
            |key| group_name(prefix, key),
            Duration::from_secs(5),
            "VM",
        )
        .await
    }

    async fn bind(
        &self,
        ctx: &TaskContext<'_>,
        instance: &InstanceRow,
        binding: &BindingRow,
    ) -> Result<Progress<Bound>, TaskError> {
        let (host, secrets) = server_of(ctx, instance).await?;
        let su = |database: &str| superuser(&host, &secrets.superuser_password, database);
        let access = ServerAccess {
            superuser: &su,
            host: &host,
            port: PORT,
        };
        bind_role(&access, ctx.services.name_prefix(), instance, binding)
            .await
            .map(Progress::Done)
    }

    async fn unbind(
        &self,
        ctx: &TaskContext<'_>,
        instance: &InstanceRow,
        binding: &BindingRow,
    ) -> Result<Progress<()>, TaskError> {
        let (host, secrets) = server_of(ctx, instance).await?;
        revoke_binding_role(
            &|database: &str| superuser(&host, &secrets.superuser_password, database),
            ctx.services.name_prefix(),
            instance,
            binding,
        )
        .await
        .map(Progress::Done)
    }

    async fn reconcile(&self, pool: &PgPool, services: &Services) -> anyhow::Result<()> {
        if services.plan_ids_of_engine(ENGINE).is_empty() {
            return Ok(());
        }
        if let Err(e) = self
            .refresh_offers(pool, &self.account.default_region)
            .await
        {
            tracing::warn!(error = %e, "refreshing EC2 offers failed");
        }
        recovery::reconcile(self, pool, services).await.map(|_| ())
    }
}
