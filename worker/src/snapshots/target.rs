//! The database a snapshot is taken of or put into, and the steps that replace it safely: a restore goes into
//! a scratch database first, and only a complete, checked one is swapped in by rename. Until the swap the
//! instance's database is exactly as it was, whatever fails.

use std::{path::PathBuf, str::FromStr};

use broker::names::{self, quote_ident, quote_literal};
use secrecy::{ExposeSecret, SecretString};
use sqlx::{
    PgConnection,
    postgres::{PgConnectOptions, PgSslMode},
};

use crate::{
    providers::postgres::{
        close_to_public, connect, create_extensions, database_exists, exec, exec_tolerating,
        read_only_grants,
    },
    registry::TaskError,
};

/// Where a server listens.
#[derive(Debug, Clone)]
pub enum Host {
    Tcp(String),
    /// A Unix socket folder.
    Socket(PathBuf),
}

/// A superuser login to a Postgres server, for sqlx and for `pg_dump`/`pg_restore` (through the environment,
/// never the command line, where `ps` would show the password).
#[derive(Clone)]
pub struct ServerLogin {
    pub host: Host,
    pub port: u16,
    pub user: String,
    pub password: Option<SecretString>,
    pub ssl_require: bool,
    /// Folder of the client programs, at least as new as the server.
    pub bin_dir: PathBuf,
}

impl std::fmt::Debug for ServerLogin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerLogin")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

impl ServerLogin {
    /// From a `postgres://user:password@host:port/db?sslmode=...` URL.
    pub fn from_url(url: &SecretString, bin_dir: PathBuf) -> anyhow::Result<Self> {
        let parsed = url::Url::parse(url.expose_secret())
            .map_err(|_| anyhow::anyhow!("not a Postgres URL"))?;
        let decode = |s: &str| {
            url::form_urlencoded::parse(format!("x={s}").as_bytes())
                .next()
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default()
        };
        let options = PgConnectOptions::from_str(url.expose_secret())?;
        let ssl_require = parsed.query_pairs().any(|(k, v)| {
            k == "sslmode" && matches!(v.as_ref(), "require" | "verify-ca" | "verify-full")
        });
        Ok(Self {
            host: Host::Tcp(options.get_host().to_string()),
            port: options.get_port(),
            user: options.get_username().to_string(),
            password: parsed.password().map(|p| SecretString::from(decode(p))),
            ssl_require,
            bin_dir,
        })
    }

    pub fn options(&self, database: &str) -> PgConnectOptions {
        let mut options = PgConnectOptions::new()
            .port(self.port)
            .username(&self.user)
            .database(database)
            .application_name("berth-worker");
        if let Some(password) = &self.password {
            options = options.password(password.expose_secret());
        }
        match &self.host {
            Host::Socket(dir) => options.socket(dir),
            Host::Tcp(host) if self.ssl_require => options.host(host).ssl_mode(PgSslMode::Require),
            Host::Tcp(host) => options.host(host),
        }
    }

    /// libpq's environment for `database`.
    pub fn env(&self, database: &str) -> Vec<(&'static str, String)> {
        let host = match &self.host {
            Host::Tcp(host) => host.clone(),
            Host::Socket(dir) => dir.display().to_string(),
        };
        let mut env = vec![
            ("PGHOST", host),
            ("PGPORT", self.port.to_string()),
            ("PGUSER", self.user.clone()),
            ("PGDATABASE", database.to_string()),
            ("PGAPPNAME", "berth-worker".to_string()),
            (
                "PGSSLMODE",
                if self.ssl_require {
                    "require"
                } else {
                    "prefer"
                }
                .to_string(),
            ),
            ("PGCONNECT_TIMEOUT", "15".to_string()),
        ];
        if let Some(password) = &self.password {
            env.push(("PGPASSWORD", password.expose_secret().to_string()));
        }
        env
    }

    pub fn program(&self, name: &str) -> PathBuf {
        self.bin_dir.join(name)
    }

    pub async fn connect(&self, database: &str, what: &str) -> Result<PgConnection, TaskError> {
        connect(&self.options(database), what).await
    }
}

/// A binding role to give its access back after the database is replaced.
#[derive(Debug, Clone)]
pub struct BindingGrant {
    pub role: String,
    pub read_only: bool,
}

/// An instance's database: what snapshots read and restores replace.
#[derive(Debug, Clone)]
pub struct DatabaseTarget {
    pub login: ServerLogin,
    pub database: String,
    /// The role that owns the database and everything in it.
    pub owner: String,
    pub bindings: Vec<BindingGrant>,
    /// Extensions the instance asked for (created again after a restore).
    pub extensions: Vec<String>,
}

/// Names of the scratch databases of one target, derived so a retry (or a deprovision) finds them.
pub struct ScratchNames {
    pub incoming: String,
    pub outgoing: String,
}

impl ScratchNames {
    pub fn of(prefix: &str, database: &str) -> Self {
        let hash = names::short_hash(database);
        Self {
            incoming: format!("{prefix}rs_{hash}"),
            outgoing: format!("{prefix}old_{hash}"),
        }
    }
}

/// The template database a preset version is cached in on a server, and its name while it is being built.
pub fn template_names(prefix: &str, snapshot: uuid::Uuid) -> (String, String) {
    let id = snapshot.simple();
    (format!("{prefix}tpl_{id}"), format!("{prefix}tplb_{id}"))
}

/// The role that owns what a preset template holds until a clone hands it to the instance's owner.
pub fn preset_role(prefix: &str) -> String {
    format!("{prefix}preset_owner")
}

/// Drops the scratch databases a failed or interrupted restore left behind.
pub async fn drop_scratch(
    admin: &mut PgConnection,
    prefix: &str,
    database: &str,
) -> Result<(), TaskError> {
    let scratch = ScratchNames::of(prefix, database);
    for db in [&scratch.incoming, &scratch.outgoing] {
        exec(
            admin,
            &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", quote_ident(db)),
            "dropping a scratch database",
        )
        .await?;
    }
    Ok(())
}

/// Makes an empty `incoming` database owned by the target's owner, closed to everyone else.
pub async fn create_incoming(
    admin: &mut PgConnection,
    target: &DatabaseTarget,
    incoming: &str,
) -> Result<(), TaskError> {
    exec(
        admin,
        &format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            quote_ident(incoming)
        ),
        "dropping a scratch database",
    )
    .await?;
    exec(
        admin,
        &format!(
            "CREATE DATABASE {} OWNER {} TEMPLATE template0",
            quote_ident(incoming),
            quote_ident(&target.owner)
        ),
        "creating the scratch database for the restore",
    )
    .await?;
    close_to_public(admin, incoming, "closing the scratch database").await
}

/// Swaps `incoming` in for the target database, then gives the bindings their access again. A crash midway
/// is finished by the next run: if the target is gone, the incoming database is renamed into its place.
pub async fn swap_in(
    admin: &mut PgConnection,
    prefix: &str,
    target: &DatabaseTarget,
) -> Result<(), TaskError> {
    let scratch = ScratchNames::of(prefix, &target.database);
    let (db, incoming, outgoing) = (
        quote_ident(&target.database),
        quote_ident(&scratch.incoming),
        quote_ident(&scratch.outgoing),
    );
    if database_exists(admin, &target.database).await? {
        exec(
            admin,
            &format!("DROP DATABASE IF EXISTS {outgoing} WITH (FORCE)"),
            "dropping a scratch database",
        )
        .await?;
        // No new sessions, then end the ones there are: a rename needs the database to itself.
        exec(
            admin,
            &format!("ALTER DATABASE {db} WITH ALLOW_CONNECTIONS false"),
            "closing the database for the swap",
        )
        .await?;
        let renamed = rename_when_idle(admin, &target.database, &scratch.outgoing).await;
        if let Err(e) = renamed {
            let _ = exec(
                admin,
                &format!("ALTER DATABASE {db} WITH ALLOW_CONNECTIONS true"),
                "reopening",
            )
            .await;
            return Err(e);
        }
    }
    exec(
        admin,
        &format!("ALTER DATABASE {incoming} RENAME TO {db}"),
        "renaming the restored database into place",
    )
    .await?;
    grant_access(admin, target).await?;
    drop_in_background(target.login.clone(), scratch.outgoing);
    Ok(())
}

/// Drops the replaced database after the swap has answered: a DROP DATABASE waits for a checkpoint (a second or
/// more), which the instance need not wait for. Should this worker die first, the name is the instance's
/// `outgoing` scratch name, which the next swap and the deprovision drop.
fn drop_in_background(login: ServerLogin, database: String) {
    tokio::spawn(async move {
        let sql = format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            quote_ident(&database)
        );
        let dropped = match login
            .connect("postgres", "connecting to drop a replaced database")
            .await
        {
            Ok(mut conn) => exec(&mut conn, &sql, "dropping the replaced database").await,
            Err(e) => Err(e),
        };
        if let Err(e) = dropped {
            tracing::warn!(database, error = %e, "dropping a replaced database failed; the next restore or the deprovision drops it");
        }
    });
}

async fn rename_when_idle(admin: &mut PgConnection, from: &str, to: &str) -> Result<(), TaskError> {
    let sql = format!(
        "ALTER DATABASE {} RENAME TO {}",
        quote_ident(from),
        quote_ident(to)
    );
    let terminate = format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = {} AND pid <> pg_backend_pid()",
        quote_literal(from)
    );
    for _ in 0..50 {
        exec(admin, &terminate, "ending the database's sessions").await?;
        // 55006: still in use by a session that was ending.
        if exec_tolerating(
            admin,
            &sql,
            &["55006"],
            "renaming the replaced database away",
        )
        .await?
        {
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    Err(TaskError::retryable(
        "the database stayed in use; the swap will be tried again",
    ))
}

/// Database-level access the target had: closed to PUBLIC, CONNECT for each binding, SELECT for read-only
/// ones, and the instance's extensions.
async fn grant_access(admin: &mut PgConnection, target: &DatabaseTarget) -> Result<(), TaskError> {
    let db = quote_ident(&target.database);
    close_to_public(
        admin,
        &target.database,
        "closing the database to other roles",
    )
    .await?;
    // A binding still being made has no role yet (42704): its bind grants what it needs.
    for binding in &target.bindings {
        exec_tolerating(
            admin,
            &format!(
                "GRANT CONNECT ON DATABASE {db} TO {}",
                quote_ident(&binding.role)
            ),
            &["42704"],
            "letting a binding role connect again",
        )
        .await?;
    }
    let read_only: Vec<&BindingGrant> = target.bindings.iter().filter(|b| b.read_only).collect();
    if read_only.is_empty() && target.extensions.is_empty() {
        return Ok(());
    }
    let mut conn = target
        .login
        .connect(&target.database, "connecting to the restored database")
        .await?;
    create_extensions(&mut conn, &target.extensions).await?;
    let owner = quote_ident(&target.owner);
    for binding in read_only {
        let role = quote_ident(&binding.role);
        let grants = read_only_grants(&role, &owner);
        exec_tolerating(
            &mut conn,
            &grants,
            &["42704"],
            "granting a read-only binding SELECT again",
        )
        .await?;
    }
    Ok(())
}

/// The newest PostgreSQL client programs on this machine.
pub fn client_bin_dir() -> Result<PathBuf, TaskError> {
    broker::embedded::find_bin_dir()
        .map_err(|e| TaskError::Fatal(e.context("finding pg_dump and pg_restore")))
}
