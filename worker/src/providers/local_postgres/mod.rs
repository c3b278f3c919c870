//! The `local` engine of the `dedicated` plan: a PostgreSQL server per instance on the worker's machine,
//! under `<servers dir>/<prefix>srv_<hash of the instance id>` (built on `broker::embedded::PgServer`):
//! initdb with data checksums, a port on 127.0.0.1 chosen once, TLS with a generated self-signed
//! certificate, pg_hba allowing only scram over hostssl, the admin role and the app database, the tuning
//! profile, extensions. Bindings are login roles as on the `shared` plan.
//!
//! An instance belongs to the host that provisioned it (details `engine_host`): workers on other hosts hand
//! its tasks back (a `Wait`, so no attempt is spent) and leave it out of their reconcile loop. Every step
//! checks what exists first, so a retry after a crash finishes the job.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;
use async_trait::async_trait;
use broker::{
    crypto::random_password,
    db::{bindings::BindingRow, instances, instances::InstanceRow},
    embedded::{self, PgServer},
    model::UpdatePayload,
    names::{self, quote_ident},
};
use secrecy::ExposeSecret;
use serde_json::{Value, json};
use sqlx::{
    PgPool,
    postgres::{PgConnectOptions, PgSslMode},
};
use tracing::{info, warn};

use super::{
    Bound, LOCAL_LOCKS, Progress, Provider, Provisioned,
    local_processes::{ensure_servers_dir, stop_server},
    lock_idle_instance, lock_instance,
    postgres::{
        AppDatabase, ServerAccess, ServerParams, add_extensions, app_db_name, bind_role,
        binding_grants, connect, exec, pooled_renames, revoke_binding_role, roles::ensure_login,
        scram, set_up, tuning,
    },
};
use crate::{
    context::{Services, TaskContext},
    registry::TaskError,
    snapshots::{DatabaseTarget, ServerLogin, target::Host},
};

/// The plan engine this provider serves.
pub const ENGINE: &str = "local";

const HOST: &str = "127.0.0.1";

pub struct LocalPostgres {
    servers_dir: PathBuf,
    host: String,
}

impl std::fmt::Debug for LocalPostgres {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalPostgres")
            .field("servers_dir", &self.servers_dir)
            .field("host", &self.host)
            .finish()
    }
}

/// A step of the engine that failed on this machine (initdb, pg_ctl, files): worth another try.
fn local(err: anyhow::Error) -> TaskError {
    TaskError::Retryable(err)
}

impl LocalPostgres {
    /// `servers_dir` must be absolute; `host` names this machine (see `Settings::local_host`).
    pub fn new(servers_dir: PathBuf, host: String) -> anyhow::Result<Self> {
        ensure_servers_dir(&servers_dir)?;
        Ok(Self { servers_dir, host })
    }

    /// The folder of an instance's server.
    pub fn server_root(&self, prefix: &str, instance_id: &str) -> PathBuf {
        self.servers_dir
            .join(names::instance_server(prefix, instance_id))
    }

    /// The folder of `instance`'s server: the one its details record (a server taken from a warm pool keeps
    /// the folder it was made in, named after the pool item), else the one named after its id.
    fn root_of(&self, prefix: &str, instance: &InstanceRow) -> PathBuf {
        match instance.details.get("server_dir").and_then(Value::as_str) {
            Some(dir) => PathBuf::from(dir),
            None => self.server_root(prefix, &instance.id),
        }
    }

    /// A `Wait` when the instance's server lives on another host: its workers do the job.
    fn elsewhere<T>(&self, instance: &InstanceRow) -> Option<Progress<T>> {
        let owner = instance
            .details
            .get("engine_host")
            .and_then(Value::as_str)?;
        (owner != self.host).then(|| Progress::Wait {
            after: Duration::from_secs(5),
            progress: format!("waiting for a worker on host {owner}, where the server lives"),
        })
    }

    /// The instance's server, which must exist.
    fn open(&self, ctx: &TaskContext<'_>, instance: &InstanceRow) -> Result<PgServer, TaskError> {
        let root = self.root_of(ctx.services.name_prefix(), instance);
        if !root.join("data/PG_VERSION").exists() {
            return Err(TaskError::fatal(format!(
                "the instance's server is missing from {} on host {} (did provisioning fail?); deprovision the \
                 instance and provision it again",
                root.display(),
                self.host
            )));
        }
        PgServer::open(&root).map_err(local)
    }
}

/// Superuser connect options for `database` on the server, over TLS.
/// Over the Unix socket in the data folder (pg_hba: `local all postgres trust`; the folder is the server
/// OS user's, mode 0700), which saves the TLS handshake and scram exchange; over TLS when the socket path
/// is too long for a Unix socket.
fn superuser(server: &PgServer, database: &str) -> PgConnectOptions {
    let options = PgConnectOptions::new()
        .port(server.port)
        .username(embedded::SUPERUSER)
        .password(server.superuser_password().expose_secret())
        .database(database)
        .application_name("berth-worker");
    match server.socket_dir() {
        Some(dir) => options.socket(dir),
        None => options.host(HOST).ssl_mode(PgSslMode::Require),
    }
}

/// A self-signed certificate for 127.0.0.1/localhost (openssl CLI, EC P-256), once.
async fn ensure_tls(server: &PgServer) -> anyhow::Result<()> {
    let data = server.data_dir();
    if data.join("server.crt").exists() && data.join("server.key").exists() {
        return Ok(());
    }
    let (key, crt) = (
        server.root().join("tls.key.tmp"),
        server.root().join("tls.crt.tmp"),
    );
    let output = tokio::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&crt)
        .args(["-days", "3650", "-subj", "/CN=127.0.0.1"])
        .args(["-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"])
        .output()
        .await
        .context("running openssl to make the server's TLS certificate (is openssl installed?)")?;
    if !output.status.success() {
        anyhow::bail!(
            "openssl req failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    server.write_data_file("server.key", &std::fs::read(&key)?)?;
    server.write_data_file("server.crt", &std::fs::read(&crt)?)?;
    let _ = std::fs::remove_file(key);
    let _ = std::fs::remove_file(crt);
    Ok(())
}

const HBA: &str = "# Written by berth (local engine). Apps connect over TLS with scram passwords only.\n\
# TYPE   DATABASE  USER      ADDRESS       METHOD\n\
local    all       postgres                trust\n\
hostssl  all       all       127.0.0.1/32  scram-sha-256\n\
hostssl  all       all       ::1/128       scram-sha-256\n";

/// Writes pg_hba.conf and berth.conf (included from postgresql.conf); says what applying them takes.
fn write_config(server: &PgServer, profile: &str) -> anyhow::Result<tuning::Change> {
    let data = server.data_dir();
    let conf = tuning::render(profile, server.port, server.socket_dir().as_deref());
    let old = std::fs::read_to_string(data.join("berth.conf")).unwrap_or_default();
    server.write_data_file("berth.conf", conf.as_bytes())?;
    let main =
        std::fs::read_to_string(data.join("postgresql.conf")).context("reading postgresql.conf")?;
    let include = "include = 'berth.conf'";
    if !main.lines().any(|l| l.trim() == include) {
        server.write_data_file("postgresql.conf", format!("{main}\n{include}\n").as_bytes())?;
    }
    let hba = std::fs::read_to_string(data.join("pg_hba.conf")).unwrap_or_default();
    if hba != HBA {
        server.write_data_file("pg_hba.conf", HBA.as_bytes())?;
    }
    let change = tuning::change(&old, &conf);
    Ok(if hba != HBA && change == tuning::Change::None {
        tuning::Change::Reload
    } else {
        change
    })
}

/// Starts the server, or applies a changed configuration to the running one.
async fn run_with(server: &PgServer, change: tuning::Change) -> anyhow::Result<()> {
    if !postmaster_alive(server) {
        return server.start().await;
    }
    match change {
        tuning::Change::None => Ok(()),
        tuning::Change::Reload => server.reload().await,
        tuning::Change::Restart => server.restart().await,
    }
}

/// Whether the server's postmaster runs: the pid in postmaster.pid is alive and works in the data folder.
fn postmaster_alive(server: &PgServer) -> bool {
    server.postmaster_pid().is_some_and(|pid| {
        std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd == server.data_dir())
    })
}

impl LocalPostgres {
    /// Claims the instance for this host before anything exists, so a retry elsewhere waits for us.
    async fn claim(&self, ctx: &TaskContext<'_>, instance: &InstanceRow) -> Result<(), TaskError> {
        instances::merge_details(ctx.pool, &instance.id, &json!({ "engine_host": self.host }))
            .await
            .context("recording the instance's host")?;
        Ok(())
    }

    /// What provisioning made: where the server lives and listens, and the admin user's password.
    fn provisioned(
        &self,
        server: &PgServer,
        params: &ServerParams,
        app: &AppDatabase<'_>,
        version: &str,
    ) -> Provisioned {
        Provisioned {
            details: json!({
                "engine_host": self.host,
                "server_dir": server.root().display().to_string(),
                "host": HOST,
                "port": server.port,
                "postgres_version": version,
                "app_db_name": params.app_db_name,
                "admin_user": params.admin_user,
                "owner_role": app.owner,
                "tuning_profile": params.tuning_profile,
                "tls": true,
                "ready_at": chrono::Utc::now(),
                "restarts": 0,
            }),
            secrets: Some(json!({ "admin_password": app.admin_password })),
        }
    }
}

/// The server's data folder made by initdb with the asked PostgreSQL version (once).
async fn initialize(root: &Path, params: &ServerParams) -> Result<PgServer, TaskError> {
    let bin_dir = match &params.postgres_version {
        Some(version) => embedded::bin_dir_for_version(version)
            .map_err(|e| TaskError::Fatal(e.context("parameter `postgres_version`")))?,
        None => {
            embedded::find_bin_dir().map_err(|e| TaskError::Fatal(e.context("the local engine")))?
        }
    };
    PgServer::ensure_initialized(root, Some(bin_dir))
        .await
        .context("creating the server (initdb)")
        .map_err(local)
}

/// TLS certificate, configuration for `profile`, and the server running with it.
async fn configure_and_start(server: &PgServer, profile: &str) -> Result<(), TaskError> {
    ensure_tls(server)
        .await
        .context("making the server's TLS certificate")
        .map_err(local)?;
    let change = write_config(server, profile).context("writing the server's configuration")?;
    run_with(server, change)
        .await
        .context("starting the server")
        .map_err(local)
}

#[async_trait]
impl Provider for LocalPostgres {
    async fn provision(
        &self,
        ctx: &TaskContext<'_>,
        instance: &InstanceRow,
    ) -> Result<Progress<Provisioned>, TaskError> {
        if let Some(wait) = self.elsewhere(instance) {
            return Ok(wait);
        }
        let params = ServerParams::of(&instance.parameters)?;
        self.claim(ctx, instance).await?;
        let root = self.root_of(ctx.services.name_prefix(), instance);
        let t0 = std::time::Instant::now();
        let server = initialize(&root, &params).await?;
        let initdb_ms = t0.elapsed().as_millis();
        configure_and_start(&server, &params.tuning_profile).await?;
        let started_ms = t0.elapsed().as_millis();
        let app = AppDatabase {
            database: &params.app_db_name,
            owner: &names::instance_owner_role(ctx.services.name_prefix(), &instance.id),
            admin_user: &params.admin_user,
            admin_password: &random_password(32),
            extensions: &params.extensions,
        };
        let version = server.version().map_err(local)?;
        set_up(
            &|database: &str| superuser(&server, database),
            &app,
            version.parse().unwrap_or(0),
        )
        .await?;
        info!(
            instance_id = %instance.id,
            port = server.port,
            initdb_ms,
            tls_config_start_ms = started_ms - initdb_ms,
            roles_database_extensions_ms = t0.elapsed().as_millis() - started_ms,
            "dedicated server ready"
        );
        Ok(Progress::Done(
            self.provisioned(&server, &params, &app, &version),
        ))
    }

    async fn adopt(
        &self,
        ctx: &TaskContext<'_>,
        instance: &InstanceRow,
        pool_item: &str,
    ) -> Result<Progress<Provisioned>, TaskError> {
        if let Some(wait) = self.elsewhere(instance) {
            return Ok(wait);
        }
        let params = ServerParams::of(&instance.parameters)?;
        let t0 = std::time::Instant::now();
        let mut server = self.open(ctx, instance)?;
        if !postmaster_alive(&server) {
            server
                .start()
                .await
                .context("starting the pooled server")
                .map_err(local)?;
        }
        let prefix = ctx.services.name_prefix();
        let owner = names::instance_owner_role(prefix, &instance.id);
        let renames = pooled_renames(
            instance,
            prefix,
            pool_item,
            &params.app_db_name,
            &params.admin_user,
        );
        let opened_ms = t0.elapsed().as_millis();
        let admin_password = random_password(32);
        let superuser_password = server.next_superuser_password().map_err(local)?;
        {
            let mut conn = connect(
                &superuser(&server, "postgres"),
                "connecting to the pooled server",
            )
            .await?;
            // One transaction: one commit to wait for, and a crash leaves all of it or none for the retry.
            exec(&mut conn, "BEGIN", "starting the pooled server's changes").await?;
            for (kind, from, to) in &renames {
                kind.apply(&mut conn, from, to).await?;
            }
            // Every password the item was made with is replaced: the admin user's and the superuser's.
            ensure_login(&mut conn, &params.admin_user, "CREATEDB", &admin_password).await?;
            exec(
                &mut conn,
                &format!(
                    "ALTER ROLE {} WITH {}",
                    quote_ident(embedded::SUPERUSER),
                    scram::password_clause(superuser_password.expose_secret())?
                ),
                "setting the superuser's new password",
            )
            .await?;
            exec(
                &mut conn,
                "COMMIT",
                "committing the pooled server's changes",
            )
            .await?;
        }
        server
            .commit_superuser_password()
            .context("storing the superuser's new password")
            .map_err(local)?;
        let renamed_ms = t0.elapsed().as_millis();
        add_extensions(
            &|database: &str| superuser(&server, database),
            &params.app_db_name,
            &params.extensions,
        )
        .await?;
        info!(
            instance_id = %instance.id,
            pool_item,
            opened_ms,
            renames_passwords_ms = renamed_ms - opened_ms,
            extensions_ms = t0.elapsed().as_millis() - renamed_ms,
            "pooled server adopted"
        );
        let app = AppDatabase {
            database: &params.app_db_name,
            owner: &owner,
            admin_user: &params.admin_user,
            admin_password: &admin_password,
            extensions: &params.extensions,
        };
        let version = server.version().map_err(local)?;
        let mut made = self.provisioned(&server, &params, &app, &version);
        made.details["pool_item"] = json!(pool_item);
        Ok(Progress::Done(made))
    }

    async fn update(
        &self,
        ctx: &TaskContext<'_>,
        instance: &InstanceRow,
        update: &UpdatePayload,
    ) -> Result<Progress<()>, TaskError> {
        if update.plan_id != instance.plan_id {
            return Err(TaskError::fatal(
                "an instance cannot move between the dedicated plan and another: provision a new instance",
            ));
        }
        if let Some(wait) = self.elsewhere(instance) {
            return Ok(wait);
        }
        let params = ServerParams::of(&update.parameters)?;
        let server = self.open(ctx, instance)?;
        let change = write_config(&server, &params.tuning_profile)
            .context("writing the server's configuration")?;
        run_with(&server, change)
            .await
            .context("applying the server's configuration")
            .map_err(local)?;
        add_extensions(
            &|database: &str| superuser(&server, database),
            app_db_name(instance),
            &params.extensions,
        )
        .await?;
        instances::merge_details(
            ctx.pool,
            &instance.id,
            &json!({ "tuning_profile": params.tuning_profile }),
        )
        .await
        .context("recording the applied tuning profile")?;
        Ok(Progress::Done(()))
    }

    async fn deprovision(
        &self,
        ctx: &TaskContext<'_>,
        instance: &InstanceRow,
        _bindings: &[BindingRow],
    ) -> Result<Progress<()>, TaskError> {
        if let Some(wait) = self.elsewhere(instance) {
            return Ok(wait);
        }
        let root = self.root_of(ctx.services.name_prefix(), instance);
        // Held until the folder is gone, so the reconcile loop cannot start the server again meanwhile.
        let mut tx = ctx
            .pool
            .begin()
            .await
            .context("locking the instance against the reconcile loop")?;
        lock_instance(&mut tx, LOCAL_LOCKS, &instance.id)
            .await
            .context("locking the instance against the reconcile loop")?;
        if root.exists() {
            stop_server(&root)
                .await
                .context("stopping the server")
                .map_err(local)?;
            std::fs::remove_dir_all(&root)
                .with_context(|| format!("removing {}", root.display()))
                .map_err(local)?;
        }
        tx.commit().await.context("releasing the instance lock")?;
        Ok(Progress::Done(()))
    }

    async fn bind(
        &self,
        ctx: &TaskContext<'_>,
        instance: &InstanceRow,
        binding: &BindingRow,
    ) -> Result<Progress<Bound>, TaskError> {
        if let Some(wait) = self.elsewhere(instance) {
            return Ok(wait);
        }
        let server = self.open(ctx, instance)?;
        let su = |database: &str| superuser(&server, database);
        let access = ServerAccess {
            superuser: &su,
            host: HOST,
            port: server.port,
        };
        bind_role(&access, ctx.services.name_prefix(), instance, binding)
            .await
            .map(Progress::Done)
    }

    async fn database_target(
        &self,
        ctx: &TaskContext<'_>,
        instance: &InstanceRow,
        bindings: &[BindingRow],
    ) -> Result<Progress<DatabaseTarget>, TaskError> {
        if let Some(wait) = self.elsewhere(instance) {
            return Ok(wait);
        }
        let server = self.open(ctx, instance)?;
        let database = app_db_name(instance).to_string();
        let (host, ssl_require) = match server.socket_dir() {
            Some(dir) => (Host::Socket(dir), false),
            None => (Host::Tcp(HOST.to_string()), true),
        };
        let login = ServerLogin {
            host,
            port: server.port,
            user: embedded::SUPERUSER.to_string(),
            password: Some(server.superuser_password().clone()),
            ssl_require,
            bin_dir: server.bin_dir().to_path_buf(),
        };
        let prefix = ctx.services.name_prefix();
        Ok(Progress::Done(DatabaseTarget {
            login,
            database,
            owner: names::instance_owner_role(prefix, &instance.id),
            bindings: binding_grants(prefix, bindings)?,
            extensions: ServerParams::of(&instance.parameters)?.extensions,
        }))
    }

    async fn unbind(
        &self,
        ctx: &TaskContext<'_>,
        instance: &InstanceRow,
        binding: &BindingRow,
    ) -> Result<Progress<()>, TaskError> {
        if let Some(wait) = self.elsewhere(instance) {
            return Ok(wait);
        }
        let root = self.root_of(ctx.services.name_prefix(), instance);
        if !root.join("data/PG_VERSION").exists() {
            return Ok(Progress::Done(()));
        }
        let server = PgServer::open(&root).map_err(local)?;
        if !server.is_running().await {
            server
                .start()
                .await
                .context("starting the server")
                .map_err(local)?;
        }
        revoke_binding_role(
            &|database: &str| superuser(&server, database),
            ctx.services.name_prefix(),
            instance,
            binding,
        )
        .await
        .map(Progress::Done)
    }

    async fn reconcile(&self, pool: &PgPool, services: &Services) -> anyhow::Result<()> {
        let plan_ids = services.plan_ids_of_engine(ENGINE);
        if plan_ids.is_empty() {
            return Ok(());
        }
        let ready = instances::list_ready_on_host(pool, &plan_ids, &self.host)
            .await
            .context("listing the local instances")?;
        for instance in ready {
            let root = self.root_of(services.name_prefix(), &instance);
            if !root.join("data/PG_VERSION").exists() {
                warn!(instance_id = %instance.id, dir = %root.display(), "the instance's server folder is missing");
                continue;
            }
            let server = match PgServer::open(&root) {
                Ok(server) => server,
                Err(e) => {
                    warn!(instance_id = %instance.id, error = %format!("{e:#}"), "cannot open the instance's server");
                    continue;
                }
            };
            if postmaster_alive(&server) {
                continue;
            }
            if let Err(e) = self.recover(pool, &instance, &server).await {
                warn!(instance_id = %instance.id, error = %format!("{e:#}"), "restarting a stopped server failed; will try again");
            }
        }
        Ok(())
    }
}

impl LocalPostgres {
    /// Restarts a stopped server under the instance's advisory lock, unless an operation took the instance
    /// meanwhile (or another worker holds the lock), and records it in the instance's details.
    async fn recover(
        &self,
        pool: &PgPool,
        instance: &InstanceRow,
        server: &PgServer,
    ) -> anyhow::Result<()> {
        let mut tx = pool.begin().await?;
        let Some(current) = lock_idle_instance(&mut tx, LOCAL_LOCKS, &instance.id).await? else {
            return Ok(());
        };
        if postmaster_alive(server) {
            return Ok(());
        }
        warn!(instance_id = %instance.id, port = server.port, "the instance's server is not running; starting it");
        // Backends orphaned by a killed postmaster hold its shared memory: end them first.
        stop_server(server.root()).await?;
        server.start().await?;
        let restarts = current
            .details
            .get("restarts")
            .and_then(Value::as_i64)
            .unwrap_or(0)
            + 1;
        instances::merge_details(
            &mut *tx,
            &instance.id,
            &json!({ "last_recovered_at": chrono::Utc::now(), "restarts": restarts }),
        )
        .await?;
        tx.commit().await?;
        info!(instance_id = %instance.id, restarts, "the instance's server runs again");
        Ok(())
    }
}
