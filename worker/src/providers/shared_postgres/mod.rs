//! The `shared` engine: a database and an owner role per instance on one registered Postgres server, a
//! login role per binding. Every step checks what exists first (or uses IF EXISTS), so a retry after a
//! crash finishes the job. Names come from `broker::names` and reach SQL only through `quote_ident` /
//! `quote_literal`.

use std::str::FromStr;

use async_trait::async_trait;
use broker::{
    crypto::random_password,
    db::{bindings::BindingRow, instances::InstanceRow},
    model::UpdatePayload,
    names::{self, quote_ident},
};
use secrecy::{ExposeSecret, SecretString};
use serde_json::json;
use sqlx::{
    PgConnection, PgPool,
    pool::PoolConnection,
    postgres::{PgConnectOptions, PgPoolOptions},
};

use super::{
    Bound, Progress, Provider, Provisioned,
    postgres::{
        Access, BindingRole, RoleGrant, binding_details, binding_grants, classify, close_to_public,
        connect, create_extensions, credentials, database_exists, drop_role, ensure_database,
        ensure_role, exec, lock_out, make_binding_role, members_of, requested_extensions,
        role_exists,
    },
};
use crate::{
    context::TaskContext,
    registry::TaskError,
    snapshots::{
        DatabaseTarget, ServerLogin,
        target::{client_bin_dir, drop_scratch},
    },
};

/// The plan engine this provider serves.
pub const ENGINE: &str = "shared";

pub struct SharedPostgres {
    admin_url: SecretString,
    admin: PgConnectOptions,
    /// Admin connections kept open between tasks: a fresh one costs a SCRAM handshake, which would be a
    /// large part of a provision. Statements run on it leave no session state behind.
    admin_pool: PgPool,
    public_host: String,
    public_port: u16,
}

impl std::fmt::Debug for SharedPostgres {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The connect options hold the admin password: never print them.
        f.debug_struct("SharedPostgres")
            .field("public_host", &self.public_host)
            .field("public_port", &self.public_port)
            .finish_non_exhaustive()
    }
}

const CONNECTING_DATABASE: &str =
    "connecting to the instance's database on the shared Postgres server";

/// The names of one instance's objects on the server.
struct InstanceNames {
    database: String,
    owner: String,
}

impl InstanceNames {
    fn of(ctx: &TaskContext<'_>, instance_id: &str) -> Self {
        let prefix = ctx.services.name_prefix();
        Self {
            database: names::instance_database(prefix, instance_id),
            owner: names::instance_owner_role(prefix, instance_id),
        }
    }
}

impl InstanceNames {
    /// Fatal when the instance's database or owner role is missing (a provision that failed).
    async fn check_present(&self, admin: &mut PgConnection) -> Result<(), TaskError> {
        if !database_exists(admin, &self.database).await?
            || !role_exists(admin, &self.owner).await?
        {
            return Err(TaskError::fatal(format!(
                "the instance's database {} is missing on the shared server (did provisioning fail?); \
                 deprovision the instance and provision it again",
                self.database
            )));
        }
        Ok(())
    }
}

impl SharedPostgres {
    /// `admin_url` is a superuser (or CREATEROLE + CREATEDB) URL of the server; `public_host`/`public_port`
    /// override what goes into credentials when apps reach the server under another name.
    pub fn new(
        admin_url: &SecretString,
        public_host: Option<String>,
        public_port: Option<u16>,
    ) -> anyhow::Result<Self> {
        let admin = PgConnectOptions::from_str(admin_url.expose_secret())
            .map_err(|_| anyhow::anyhow!("SHARED_POSTGRES_URL is not a valid Postgres URL"))?
            .application_name("berth-worker");
        let public_host = public_host.unwrap_or_else(|| admin.get_host().to_string());
        let public_port = public_port.unwrap_or_else(|| admin.get_port());
        let admin_pool = PgPoolOptions::new()
            .max_connections(4)
            .min_connections(0)
            .idle_timeout(std::time::Duration::from_secs(60))
            .acquire_timeout(std::time::Duration::from_secs(15))
            .connect_lazy_with(admin.clone());
        Ok(Self {
            admin_url: admin_url.clone(),
            admin,
            admin_pool,
            public_host,
            public_port,
        })
    }

    async fn connect_admin(&self) -> Result<PoolConnection<sqlx::Postgres>, TaskError> {
        self.admin_pool
            .acquire()
            .await
            .map_err(|e| classify(e, "connecting to the shared Postgres server"))
    }

    fn database_options(&self, database: &str) -> PgConnectOptions {
        self.admin.clone().database(database)
    }

    async fn connect_database(&self, database: &str) -> Result<PgConnection, TaskError> {
        connect(&self.database_options(database), CONNECTING_DATABASE).await
    }
}

#[async_trait]
impl Provider for SharedPostgres {
    async fn provision(
        &self,
        ctx: &TaskContext<'_>,
        instance: &InstanceRow,
    ) -> Result<Progress<Provisioned>, TaskError> {
        let names = InstanceNames::of(ctx, &instance.id);
        let extensions = requested_extensions(&instance.parameters)?;
        let mut admin = self.connect_admin().await?;
        ensure_role(
            &mut admin,
            &names.owner,
            "NOLOGIN",
            "creating the instance's owner role",
        )
        .await?;
        ensure_database(&mut admin, &names.database, &names.owner).await?;
        close_to_public(
            &mut admin,
            &names.database,
            "closing the instance's database to other roles",
        )
        .await?;
        drop(admin);
        if !extensions.is_empty() {
            let mut db = self.connect_database(&names.database).await?;
            create_extensions(&mut db, &extensions).await?;
        }
        Ok(Progress::Done(Provisioned {
            details: json!({
                "database": names.database,
                "owner_role": names.owner,
                "host": self.public_host,
                "port": self.public_port,
            }),
            secrets: None,
        }))
    }

    async fn adopt(
        &self,
        ctx: &TaskContext<'_>,
        instance: &InstanceRow,
        pool_item: &str,
    ) -> Result<Progress<Provisioned>, TaskError> {
        let pooled = InstanceNames::of(ctx, pool_item);
        let names = InstanceNames::of(ctx, &instance.id);
        let extensions = requested_extensions(&instance.parameters)?;
        let mut admin = self.connect_admin().await?;
        // The names show in every credential: the item's become the instance's (a retry finds them renamed).
        // The owner role has no password (NOLOGIN) and the item has no binding roles: no credential to replace.
        if database_exists(&mut admin, &pooled.database).await? {
            exec(
                &mut admin,
                &format!(
                    "ALTER DATABASE {} RENAME TO {}",
                    quote_ident(&pooled.database),
                    quote_ident(&names.database)
                ),
                "renaming the pooled database for the instance",
            )
            .await?;
        }
        if role_exists(&mut admin, &pooled.owner).await? {
            exec(
                &mut admin,
                &format!(
                    "ALTER ROLE {} RENAME TO {}",
                    quote_ident(&pooled.owner),
                    quote_ident(&names.owner)
                ),
                "renaming the pooled owner role for the instance",
            )
            .await?;
        }
        names.check_present(&mut admin).await?;
        drop(admin);
        if !extensions.is_empty() {
            let mut db = self.connect_database(&names.database).await?;
            create_extensions(&mut db, &extensions).await?;
        }
        Ok(Progress::Done(Provisioned {
            details: json!({
                "database": names.database,
                "owner_role": names.owner,
                "host": self.public_host,
                "port": self.public_port,
                "pool_item": pool_item,
            }),
            secrets: None,
        }))
    }

    async fn update(
        &self,
        ctx: &TaskContext<'_>,
        instance: &InstanceRow,
        update: &UpdatePayload,
    ) -> Result<Progress<()>, TaskError> {
        let extensions = requested_extensions(&update.parameters)?;
        if extensions.is_empty() {
            return Ok(Progress::Done(()));
        }
        let names = InstanceNames::of(ctx, &instance.id);
        let mut admin = self.connect_admin().await?;
        if !database_exists(&mut admin, &names.database).await? {
            return Err(TaskError::fatal(format!(
                "the instance's database {} does not exist on the shared server; deprovision and provision it again",
                names.database
            )));
        }
        drop(admin);
        let mut db = self.connect_database(&names.database).await?;
        create_extensions(&mut db, &extensions).await?;
        Ok(Progress::Done(()))
    }

    async fn deprovision(
        &self,
        ctx: &TaskContext<'_>,
        instance: &InstanceRow,
        bindings: &[BindingRow],
    ) -> Result<Progress<()>, TaskError> {
        let names = InstanceNames::of(ctx, &instance.id);
        let prefix = ctx.services.name_prefix();
        let mut admin = self.connect_admin().await?;

        // Every binding role: those with rows, and any member of the owner role (a binding row lost midway).
        let mut roles: Vec<String> = bindings
            .iter()
            .map(|b| names::binding_role(prefix, &b.id))
            .collect();
        for member in members_of(&mut admin, &names.owner).await? {
            if !roles.contains(&member) {
                roles.push(member);
            }
        }
        for role in &roles {
            if role_exists(&mut admin, role).await? {
                lock_out(&mut admin, role).await?;
            }
        }
        exec(
            &mut admin,
            &format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                quote_ident(&names.database)
            ),
            "dropping the instance's database",
        )
        .await?;
        // Scratch databases a restore left behind.
        drop_scratch(&mut admin, prefix, &names.database).await?;
        for role in &roles {
            drop_role(&mut admin, role, "dropping a binding role").await?;
        }
        drop_role(
            &mut admin,
            &names.owner,
            "dropping the instance's owner role",
        )
        .await?;
        // Taken from a warm pool but deleted before the item was renamed: the item's names.
        if let Some(item) = instance.details.get("pool_item").and_then(|v| v.as_str()) {
            let pooled = InstanceNames::of(ctx, item);
            exec(
                &mut admin,
                &format!(
                    "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                    quote_ident(&pooled.database)
                ),
                "dropping the pooled database",
            )
            .await?;
            drop_role(&mut admin, &pooled.owner, "dropping the pooled owner role").await?;
        }
        Ok(Progress::Done(()))
    }

    async fn bind(
        &self,
        ctx: &TaskContext<'_>,
        instance: &InstanceRow,
        binding: &BindingRow,
    ) -> Result<Progress<Bound>, TaskError> {
        let access = Access::of(binding)?;
        let names = InstanceNames::of(ctx, &instance.id);
        let made = BindingRole {
            database: names.database.clone(),
            role: names::binding_role(ctx.services.name_prefix(), &binding.id),
            password: random_password(32),
            access,
        };
        let mut admin = self.connect_admin().await?;
        names.check_present(&mut admin).await?;
        let grant = RoleGrant {
            database: &names.database,
            owner: &names.owner,
            role: &made.role,
            access,
        };
        let database = self.database_options(&names.database);
        make_binding_role(
            &mut admin,
            &database,
            CONNECTING_DATABASE,
            &grant,
            &made.password,
        )
        .await?;
        drop(admin);
        let (host, port) = (&self.public_host, self.public_port);
        Ok(Progress::Done(Bound {
            details: binding_details(host, port, &made),
            credentials: credentials(
                host,
                port,
                &made.database,
                &made.role,
                &made.password,
                false,
            )?,
        }))
    }

    async fn database_target(
        &self,
        ctx: &TaskContext<'_>,
        instance: &InstanceRow,
        bindings: &[BindingRow],
    ) -> Result<Progress<DatabaseTarget>, TaskError> {
        let names = InstanceNames::of(ctx, &instance.id);
        let login = ServerLogin::from_url(&self.admin_url, client_bin_dir()?)
            .map_err(|e| TaskError::Fatal(e.context("SHARED_POSTGRES_URL")))?;
        Ok(Progress::Done(DatabaseTarget {
            login,
            database: names.database,
            owner: names.owner,
            bindings: binding_grants(ctx.services.name_prefix(), bindings)?,
            extensions: requested_extensions(&instance.parameters)?,
        }))
    }

    async fn unbind(
        &self,
        ctx: &TaskContext<'_>,
        instance: &InstanceRow,
        binding: &BindingRow,
    ) -> Result<Progress<()>, TaskError> {
        let names = InstanceNames::of(ctx, &instance.id);
        let role = names::binding_role(ctx.services.name_prefix(), &binding.id);
        let mut admin = self.connect_admin().await?;
        if !role_exists(&mut admin, &role).await? {
            return Ok(Progress::Done(()));
        }
        lock_out(&mut admin, &role).await?;
        if database_exists(&mut admin, &names.database).await? {
            let owner_exists = role_exists(&mut admin, &names.owner).await?;
            let mut db = self.connect_database(&names.database).await?;
            if owner_exists {
                exec(
                    &mut db,
                    &format!(
                        "REASSIGN OWNED BY {} TO {}",
                        quote_ident(&role),
                        quote_ident(&names.owner)
                    ),
                    "handing the binding role's objects to the owner role",
                )
                .await?;
            }
            exec(
                &mut db,
                &format!("DROP OWNED BY {}", quote_ident(&role)),
                "revoking the binding role's privileges",
            )
            .await?;
        }
        drop_role(&mut admin, &role, "dropping the binding role").await?;
        Ok(Progress::Done(()))
    }
}
