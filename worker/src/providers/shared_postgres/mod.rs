//! The `shared` engine: a database and an owner role per instance on one registered Postgres server, a
//! login role per binding. Every step checks what exists first (or uses IF EXISTS), so a retry after a
//! crash finishes the job. Names come from `broker::names` and reach SQL only through `quote_ident` /
//! `quote_literal`.

mod errors;

use std::{future::Future, pin::Pin, str::FromStr};

use async_trait::async_trait;
use broker::{
    crypto::random_password,
    db::{bindings::BindingRow, instances::InstanceRow},
    model::UpdatePayload,
    names::{self, quote_ident, quote_literal},
};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Map, Value, json};
use sqlx::{
    Connection, PgConnection, PgPool,
    pool::PoolConnection,
    postgres::{PgConnectOptions, PgPoolOptions},
};

pub use errors::classify;

use super::{Bound, Progress, Provider, Provisioned, scram};
use crate::{
    context::TaskContext,
    registry::TaskError,
    snapshots::{
        BindingGrant, DatabaseTarget, ServerLogin,
        target::{client_bin_dir, drop_scratch},
    },
};

/// The plan engine this provider serves.
pub const ENGINE: &str = "shared";

/// Extensions an instance may ask for; the plan's JSON schema lists the same ones.
pub const ALLOWED_EXTENSIONS: &[&str] = &[
    "btree_gin",
    "btree_gist",
    "citext",
    "cube",
    "earthdistance",
    "fuzzystrmatch",
    "hstore",
    "intarray",
    "isn",
    "lo",
    "ltree",
    "pg_trgm",
    "pgcrypto",
    "seg",
    "tablefunc",
    "tsm_system_rows",
    "unaccent",
    "uuid-ossp",
];

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

/// Access a binding asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    ReadWrite,
    ReadOnly,
}

impl Access {
    pub(crate) fn of(binding: &BindingRow) -> Result<Self, TaskError> {
        match binding.parameters.get("access") {
            None | Some(Value::Null) => Ok(Self::ReadWrite),
            Some(Value::String(s)) if s == "read-write" => Ok(Self::ReadWrite),
            Some(Value::String(s)) if s == "read-only" => Ok(Self::ReadOnly),
            Some(other) => Err(TaskError::fatal(format!(
                "binding parameter `access` must be \"read-write\" or \"read-only\", not {other}"
            ))),
        }
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::ReadWrite => "read-write",
            Self::ReadOnly => "read-only",
        }
    }
}

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

    async fn connect_database(&self, database: &str) -> Result<PgConnection, TaskError> {
        let options = self.admin.clone().database(database);
        connect(
            &options,
            "connecting to the instance's database on the shared Postgres server",
        )
        .await
    }

    fn database_url(
        &self,
        user: &str,
        password: &str,
        database: &str,
    ) -> Result<String, TaskError> {
        let mut url = url::Url::parse("postgres://localhost/")
            .map_err(|e| TaskError::fatal(format!("building the connection URL: {e}")))?;
        let bad = |what: &str| {
            TaskError::fatal(format!(
                "building the connection URL: the {what} is not valid in a URL"
            ))
        };
        url.set_host(Some(&self.public_host))
            .map_err(|_| bad("host"))?;
        url.set_port(Some(self.public_port))
            .map_err(|()| bad("port"))?;
        url.set_username(user).map_err(|()| bad("user name"))?;
        url.set_password(Some(password))
            .map_err(|()| bad("password"))?;
        url.set_path(database);
        Ok(url.into())
    }
}

/// Boxed, `Send` futures for the SQL helpers: sqlx's executor bounds are higher-ranked, and proving `Send`
/// for them inside `#[async_trait]` bodies trips a compiler limitation; boxing checks each helper on its own.
pub(crate) type Sql<'a, T> = Pin<Box<dyn Future<Output = Result<T, TaskError>> + Send + 'a>>;

/// Runs one statement (or several, `;`-separated). `what` describes it for errors; the statement itself never
/// reaches a message or a log (it may name a role's password verifier). Not prepared, so not cached.
pub(crate) fn exec<'a>(conn: &'a mut PgConnection, sql: &'a str, what: &'a str) -> Sql<'a, ()> {
    Box::pin(async move {
        sqlx::Executor::execute(&mut *conn, sqlx::raw_sql(sql))
            .await
            .map_err(|e| classify(e, what))?;
        Ok(())
    })
}

/// Like [`exec`], but an error with one of the SQLSTATEs in `tolerated` counts as done; `false` then.
pub(crate) fn exec_tolerating<'a>(
    conn: &'a mut PgConnection,
    sql: &'a str,
    tolerated: &'a [&'a str],
    what: &'a str,
) -> Sql<'a, bool> {
    Box::pin(async move {
        match sqlx::Executor::execute(&mut *conn, sqlx::raw_sql(sql)).await {
            Ok(_) => Ok(true),
            Err(e) if errors::code(&e).is_some_and(|c| tolerated.contains(&c.as_str())) => {
                Ok(false)
            }
            Err(e) => Err(classify(e, what)),
        }
    })
}

pub(crate) fn exists<'a>(
    conn: &'a mut PgConnection,
    sql: &'static str,
    name: &'a str,
    what: &'a str,
) -> Sql<'a, bool> {
    Box::pin(async move {
        sqlx::query_scalar::<_, bool>(sql)
            .bind(name)
            .fetch_one(&mut *conn)
            .await
            .map_err(|e| classify(e, what))
    })
}

pub(crate) fn role_exists<'a>(conn: &'a mut PgConnection, role: &'a str) -> Sql<'a, bool> {
    exists(
        conn,
        "SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)",
        role,
        "looking up a role",
    )
}

pub(crate) fn database_exists<'a>(conn: &'a mut PgConnection, database: &'a str) -> Sql<'a, bool> {
    exists(
        conn,
        "SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)",
        database,
        "looking up a database",
    )
}

/// Roles that are members of `owner` (read-write binding roles).
pub(crate) fn members_of<'a>(conn: &'a mut PgConnection, owner: &'a str) -> Sql<'a, Vec<String>> {
    Box::pin(async move {
        sqlx::query_scalar::<_, String>(
            "SELECT m.rolname::text FROM pg_auth_members a
             JOIN pg_roles o ON o.oid = a.roleid
             JOIN pg_roles m ON m.oid = a.member
             WHERE o.rolname = $1",
        )
        .bind(owner)
        .fetch_all(&mut *conn)
        .await
        .map_err(|e| classify(e, "listing the binding roles of the instance"))
    })
}

pub(crate) fn connect<'a>(options: &'a PgConnectOptions, what: &'a str) -> Sql<'a, PgConnection> {
    Box::pin(async move {
        PgConnection::connect_with(options)
            .await
            .map_err(|e| classify(e, what))
    })
}

/// Creates the role unless it exists; a concurrent creation counts as success.
pub(crate) async fn ensure_role(
    conn: &mut PgConnection,
    role: &str,
    options: &str,
    what: &str,
) -> Result<(), TaskError> {
    if role_exists(conn, role).await? {
        return Ok(());
    }
    let sql = format!("CREATE ROLE {} {options}", quote_ident(role));
    exec_tolerating(conn, &sql, &["42710", "23505"], what).await?;
    Ok(())
}

/// Creates the database unless it exists. CREATE DATABASE cannot run in a transaction and may race a
/// concurrent one: "already exists" is success.
pub(crate) async fn ensure_database(
    conn: &mut PgConnection,
    database: &str,
    owner: &str,
) -> Result<(), TaskError> {
    if database_exists(conn, database).await? {
        return Ok(());
    }
    let sql = format!(
        "CREATE DATABASE {} OWNER {}",
        quote_ident(database),
        quote_ident(owner)
    );
    exec_tolerating(
        conn,
        &sql,
        &["42P04", "23505"],
        "creating the instance's database",
    )
    .await?;
    Ok(())
}

/// The `extensions` parameter, re-checked against the allow-list (the schema checked it already).
pub(crate) fn requested_extensions(parameters: &Value) -> Result<Vec<String>, TaskError> {
    let Some(list) = parameters.get("extensions") else {
        return Ok(Vec::new());
    };
    let Some(list) = list.as_array() else {
        return Err(TaskError::fatal(
            "parameter `extensions` must be a list of extension names",
        ));
    };
    let mut out = Vec::new();
    for item in list {
        match item.as_str() {
            Some(name) if ALLOWED_EXTENSIONS.contains(&name) => {
                if !out.iter().any(|e| e == name) {
                    out.push(name.to_string());
                }
            }
            _ => {
                return Err(TaskError::fatal(format!(
                    "extension {item} is not offered on this plan; choose from: {}",
                    ALLOWED_EXTENSIONS.join(", ")
                )));
            }
        }
    }
    Ok(out)
}

pub(crate) async fn create_extensions(
    conn: &mut PgConnection,
    extensions: &[String],
) -> Result<(), TaskError> {
    for extension in extensions {
        let sql = format!("CREATE EXTENSION IF NOT EXISTS {}", quote_ident(extension));
        let what = format!("creating extension {extension:?}");
        // Created concurrently by another run: fine.
        exec_tolerating(conn, &sql, &["23505", "42710"], &what).await?;
    }
    Ok(())
}

/// What a read-only binding role gets in its database: SELECT on what is there and on what the owner makes
/// later. Arguments are quoted identifiers.
pub(crate) fn read_only_grants(role_q: &str, owner_q: &str) -> String {
    format!(
        "GRANT USAGE ON SCHEMA public TO {role_q};
         GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role_q};
         GRANT SELECT ON ALL SEQUENCES IN SCHEMA public TO {role_q};
         ALTER DEFAULT PRIVILEGES FOR ROLE {owner_q} IN SCHEMA public GRANT SELECT ON TABLES TO {role_q};
         ALTER DEFAULT PRIVILEGES FOR ROLE {owner_q} IN SCHEMA public GRANT SELECT ON SEQUENCES TO {role_q};"
    )
}

/// Stops a role's logins and ends its sessions.
pub(crate) async fn lock_out(conn: &mut PgConnection, role: &str) -> Result<(), TaskError> {
    exec(
        conn,
        &format!("ALTER ROLE {} NOLOGIN", quote_ident(role)),
        "disabling a binding role's login",
    )
    .await?;
    let terminate = format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = {} AND pid <> pg_backend_pid()",
        quote_literal(role)
    );
    exec(conn, &terminate, "ending a binding role's sessions").await
}

/// Drops a role after revoking what it holds in the admin database and on shared objects (databases).
pub(crate) async fn drop_role(
    conn: &mut PgConnection,
    role: &str,
    what: &str,
) -> Result<(), TaskError> {
    if !role_exists(conn, role).await? {
        return Ok(());
    }
    exec(conn, &format!("DROP OWNED BY {}", quote_ident(role)), what).await?;
    exec(
        conn,
        &format!("DROP ROLE IF EXISTS {}", quote_ident(role)),
        what,
    )
    .await
}

/// The binding roles of `bindings` and whether each is read-only (for grants after a restore).
pub(crate) fn binding_grants(
    prefix: &str,
    bindings: &[BindingRow],
) -> Result<Vec<BindingGrant>, TaskError> {
    bindings
        .iter()
        .map(|b| {
            Ok(BindingGrant {
                role: names::binding_role(prefix, &b.id),
                read_only: Access::of(b)? == ReadOnly,
            })
        })
        .collect()
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
        exec(
            &mut admin,
            &format!(
                "REVOKE ALL ON DATABASE {} FROM PUBLIC",
                quote_ident(&names.database)
            ),
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
        let role = names::binding_role(ctx.services.name_prefix(), &binding.id);
        let (role_q, owner_q, db_q) = (
            quote_ident(&role),
            quote_ident(&names.owner),
            quote_ident(&names.database),
        );
        let password = random_password(32);

        let mut admin = self.connect_admin().await?;
        if !database_exists(&mut admin, &names.database).await?
            || !role_exists(&mut admin, &names.owner).await?
        {
            return Err(TaskError::fatal(format!(
                "the instance's database {} is missing on the shared server (did provisioning fail?); \
                 deprovision the instance and provision it again",
                names.database
            )));
        }
        // A retry finds the role from the first try: give it the new password so the stored credentials match.
        let login = format!("LOGIN {}", scram::password_clause(&password)?);
        if role_exists(&mut admin, &role).await? {
            exec(
                &mut admin,
                &format!("ALTER ROLE {role_q} WITH {login}"),
                "setting the binding role's password",
            )
            .await?;
        } else {
            let create = format!("CREATE ROLE {role_q} {login}");
            let created = exec_tolerating(
                &mut admin,
                &create,
                &["42710", "23505"],
                "creating the binding role",
            )
            .await?;
            if !created {
                exec(
                    &mut admin,
                    &format!("ALTER ROLE {role_q} WITH {login}"),
                    "setting the binding role's password",
                )
                .await?;
            }
        }
        match access {
            ReadWrite => {
                exec(
                    &mut admin,
                    &format!("GRANT {owner_q} TO {role_q}"),
                    "making the binding role a member of the owner role",
                )
                .await?;
                // Objects the app creates belong to the owner role, so every binding sees and can change them.
                exec(
                    &mut admin,
                    &format!(
                        "ALTER ROLE {role_q} SET role = {}",
                        quote_literal(&names.owner)
                    ),
                    "making the binding act as the owner role",
                )
                .await?;
            }
            ReadOnly => {
                exec(
                    &mut admin,
                    &format!("ALTER ROLE {role_q} SET default_transaction_read_only = on"),
                    "making the binding role read-only",
                )
                .await?;
            }
        }
        exec(
            &mut admin,
            &format!("GRANT CONNECT ON DATABASE {db_q} TO {role_q}"),
            "letting the binding role connect",
        )
        .await?;
        drop(admin);

        if access == ReadOnly {
            let mut db = self.connect_database(&names.database).await?;
            let grants = read_only_grants(&role_q, &owner_q);
            exec(
                &mut db,
                &grants,
                "granting the read-only binding role SELECT on the database's tables",
            )
            .await?;
        }

        let url = self.database_url(&role, &password, &names.database)?;
        let mut credentials = Map::new();
        credentials.insert("DATABASE_URL".into(), Value::String(url.clone()));
        credentials.insert("uri".into(), Value::String(url));
        credentials.insert("PGHOST".into(), Value::String(self.public_host.clone()));
        credentials.insert("PGPORT".into(), Value::String(self.public_port.to_string()));
        credentials.insert("PGDATABASE".into(), Value::String(names.database.clone()));
        credentials.insert("PGUSER".into(), Value::String(role.clone()));
        credentials.insert("PGPASSWORD".into(), Value::String(password));
        Ok(Progress::Done(Bound {
            details: json!({
                "endpoints": [{ "host": self.public_host, "ports": [self.public_port.to_string()] }],
                "role": role,
                "database": names.database,
                "access": access.as_str(),
            }),
            credentials,
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

use Access::{ReadOnly, ReadWrite};
