//! The `local` engine (`dedicated` plan): a real Postgres server per instance under a temporary servers
//! folder. Provision (idempotent, TLS, tuning, checksums), bind/unbind, update, the reconcile loop bringing
//! a killed server back, expiry, deprovision leaving no process and no files, half-built cleanup.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use berth_worker::{Services, providers::local_processes, reconcile, tasks};
use broker::{
    db::{bindings, instances},
    model::{Operation, UpdatePayload},
    names,
};
use serde_json::{Map, Value, json};
use sqlx::{
    Connection, PgConnection,
    postgres::{PgConnectOptions, PgPoolOptions, PgSslMode},
};

use crate::helpers::*;

const PLAN: &str = "5f0c2d8e-9b41-4c7a-a6e3-2d7f1b8c4e90";

/// A servers folder of its own, removed when dropped.
struct Servers(PathBuf);

impl Servers {
    fn new() -> Self {
        Self::in_dir(
            std::env::temp_dir().join(format!("berth-local-{}", uuid::Uuid::new_v4().simple())),
        )
    }

    fn in_dir(dir: PathBuf) -> Self {
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn services(&self) -> Arc<Services> {
        self.services_with(json!({}))
    }

    fn services_with(&self, extra: Value) -> Arc<Services> {
        let mut settings = json!({
            "plans_dir": plans_dir(),
            "name_prefix": PREFIX,
            "shared_postgres_url": admin_url(),
            "local_engine": true,
            "local_servers_dir": self.0,
            "local_engine_host": "test-host",
        });
        settings
            .as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        Arc::new(Services::new(serde_json::from_value(settings).unwrap(), cipher()).unwrap())
    }

    fn root(&self, instance: &str) -> PathBuf {
        self.0.join(names::instance_server(PREFIX, instance))
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        // A failed test may leave servers running: stop them before removing the folder.
        if let Ok(entries) = std::fs::read_dir(&self.0) {
            for entry in entries.flatten() {
                for pid in local_processes::processes_in(&entry.path().join("data")) {
                    let _ = std::process::Command::new("kill")
                        .arg("-KILL")
                        .arg(pid.to_string())
                        .status();
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn connect_url(url: &str) -> PgConnection {
    PgConnection::connect(url)
        .await
        .unwrap_or_else(|e| panic!("connecting with {url:?}: {e}"))
}

async fn scalar<T>(conn: &mut PgConnection, sql: &str) -> T
where
    T: for<'r> sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + Send + Unpin,
{
    sqlx::query_scalar(sql).fetch_one(conn).await.unwrap()
}

fn admin_options(details: &Value, password: &str) -> PgConnectOptions {
    PgConnectOptions::new()
        .host("127.0.0.1")
        .port(details["port"].as_u64().unwrap() as u16)
        .username(details["admin_user"].as_str().unwrap())
        .password(password)
        .database(details["app_db_name"].as_str().unwrap())
}

fn no_process_and_no_files(root: &Path) {
    assert!(
        local_processes::processes_in(&root.join("data")).is_empty(),
        "a server process is left"
    );
    assert!(!root.exists(), "{} is left", root.display());
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn dedicated_local_lifecycle(_: PgPoolOptions, opts: PgConnectOptions) {
    let pool = pool(&opts, 8).await;
    let servers = Servers::new();
    let services = servers.services();
    let instance = new_instance(
        &pool,
        PLAN,
        json!({ "tuning_profile": "oltp", "extensions": ["citext"], "app_db_name": "shop", "admin_user": "boss",
                "cpu_min": 4, "tags": { "team": "a" } }),
    )
    .await;

    // Provision twice: the second run finds everything and is harmless.
    operate_ok(&pool, &services, Operation::Provision, &instance, None).await;
    let first = details(&pool, &instance).await;
    operate_ok(&pool, &services, Operation::Provision, &instance, None).await;
    let details = self::details(&pool, &instance).await;
    assert_eq!(details["port"], first["port"]);
    assert_eq!(details["engine_host"], "test-host");
    assert_eq!(
        (
            details["app_db_name"].as_str(),
            details["admin_user"].as_str()
        ),
        (Some("shop"), Some("boss"))
    );
    assert!(servers.root(&instance).join("data/server.crt").exists());
    let password = admin_password(&pool, &instance).await;
    let options = admin_options(&details, &password);
    assert_admin_on_tls_only_with_tuning_in_place(&options).await;

    // A read-write and a read-only binding.
    let rw = new_binding(&pool, &instance, PLAN, json!({})).await;
    let ro = new_binding(&pool, &instance, PLAN, json!({ "access": "read-only" })).await;
    operate_ok(&pool, &services, Operation::Bind, &instance, Some(&rw)).await;
    operate_ok(&pool, &services, Operation::Bind, &instance, Some(&ro)).await;
    let rw_creds = credentials(&pool, &rw).await;
    let ro_creds = credentials(&pool, &ro).await;
    let (mut app, reader) = write_and_read_over_tls(&rw_creds, &ro_creds, &details).await;

    // Unbind drops the role and ends its sessions.
    operate_ok(&pool, &services, Operation::Unbind, &instance, Some(&rw)).await;
    assert!(
        sqlx::query("SELECT 1").execute(&mut app).await.is_err(),
        "the unbound session must be ended"
    );
    assert!(PgConnection::connect(&url_of(&rw_creds)).await.is_err());
    let mut conn = connect_tls(&options).await;
    let role = names::binding_role(PREFIX, &rw);
    let sql = format!("SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{role}')");
    assert!(!scalar::<bool>(&mut conn, &sql).await);
    assert_eq!(
        scalar::<i64>(&mut conn, "SELECT count(*) FROM items").await,
        1,
        "the app's table stays"
    );
    conn.close().await.unwrap();

    // Update: a new tuning profile (restart: max_connections changes) and another extension.
    let update = UpdatePayload {
        plan_id: PLAN.into(),
        parameters: json!({ "tuning_profile": "analytics", "extensions": ["hstore"], "app_db_name": "shop",
                            "admin_user": "boss" }),
        context: json!({}),
        maintenance_version: None,
        select_preset: false,
    };
    let payload = serde_json::to_value(&update).unwrap();
    update_ok(&pool, &services, &instance, payload).await;
    let mut conn = connect_tls(&options).await;
    assert_eq!(scalar::<String>(&mut conn, "SHOW work_mem").await, "64MB");
    assert_eq!(
        scalar::<String>(&mut conn, "SHOW max_connections").await,
        "40"
    );
    assert!(scalar::<bool>(&mut conn, HAS_HSTORE).await);
    conn.close().await.unwrap();
    drop(reader);

    // Deprovision (twice): no process, no files.
    operate_ok(&pool, &services, Operation::Deprovision, &instance, None).await;
    no_process_and_no_files(&servers.root(&instance));
    assert!(instances::get(&pool, &instance).await.unwrap().is_none());
}

/// Both bindings name the app database over TLS; the read-write one creates `items` (one row), the read-only one
/// reads it and cannot write. Returns both sessions, still open.
async fn write_and_read_over_tls(
    rw_creds: &Map<String, Value>,
    ro_creds: &Map<String, Value>,
    details: &Value,
) -> (PgConnection, PgConnection) {
    for creds in [rw_creds, ro_creds] {
        assert!(
            url_of(creds).ends_with("/shop?sslmode=require"),
            "{creds:?}"
        );
        assert_eq!(creds["PGSSLMODE"], "require");
        assert_eq!(creds["PGPORT"], json!(details["port"].to_string()));
        assert_eq!(creds["PGDATABASE"], "shop");
    }
    // pg_hba admits hostssl only, so a session at all is a TLS session.
    let mut app = connect_url(&url_of(rw_creds)).await;
    sqlx::raw_sql("CREATE TABLE items (id int PRIMARY KEY); INSERT INTO items VALUES (1)")
        .execute(&mut app)
        .await
        .unwrap();
    let mut reader = connect_url(&url_of(ro_creds)).await;
    assert_eq!(
        scalar::<i64>(&mut reader, "SELECT count(*) FROM items").await,
        1
    );
    assert!(
        sqlx::query("INSERT INTO items VALUES (2)")
            .execute(&mut reader)
            .await
            .is_err()
    );
    (app, reader)
}

const HAS_HSTORE: &str = "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'hstore')";

/// A TLS session as the admin user.
async fn connect_tls(options: &PgConnectOptions) -> PgConnection {
    PgConnection::connect_with(&options.clone().ssl_mode(PgSslMode::Require))
        .await
        .unwrap()
}

/// The admin user connects over TLS only, is no superuser; tuning, checksums and extensions are in place.
async fn assert_admin_on_tls_only_with_tuning_in_place(options: &PgConnectOptions) {
    let mut conn = connect_tls(options).await;
    assert!(
        scalar::<bool>(
            &mut conn,
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
        )
        .await
    );
    for (setting, value) in [
        ("max_connections", "200"),
        ("shared_buffers", "256MB"),
        ("data_checksums", "on"),
        ("listen_addresses", "127.0.0.1"),
    ] {
        assert_eq!(
            scalar::<String>(&mut conn, &format!("SHOW {setting}")).await,
            value
        );
    }
    assert!(
        scalar::<bool>(
            &mut conn,
            "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citext')"
        )
        .await
    );
    assert!(
        !scalar::<bool>(
            &mut conn,
            "SELECT rolsuper FROM pg_roles WHERE rolname = current_user"
        )
        .await
    );
    conn.close().await.unwrap();
    let plain = PgConnection::connect_with(&options.clone().ssl_mode(PgSslMode::Disable)).await;
    assert!(plain.is_err(), "a connection without TLS must be refused");
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn reconcile_restarts_a_killed_server(_: PgPoolOptions, opts: PgConnectOptions) {
    let pool = pool(&opts, 8).await;
    let servers = Servers::new();
    let services = servers.services();
    let instance = new_instance(&pool, PLAN, json!({})).await;
    operate_ok(&pool, &services, Operation::Provision, &instance, None).await;
    let root = servers.root(&instance);
    let pid_of = || -> u32 {
        std::fs::read_to_string(root.join("data/postmaster.pid"))
            .unwrap()
            .lines()
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let killed = pid_of();
    std::process::Command::new("kill")
        .arg("-KILL")
        .arg(killed.to_string())
        .status()
        .unwrap();
    eventually(Duration::from_secs(10), "the postmaster to die", || async {
        (!Path::new(&format!("/proc/{killed}")).exists()).then_some(())
    })
    .await;

    // A reconcile pass (as each worker runs every RECONCILE_INTERVAL_MS) starts it again and records it.
    let port = details(&pool, &instance).await["port"].as_u64().unwrap() as u16;
    eventually(Duration::from_secs(60), "the server to run again", || {
        let (pool, services, instance) = (pool.clone(), services.clone(), instance.clone());
        async move {
            reconcile::once(&pool, &services).await;
            let details = details(&pool, &instance).await;
            (details["restarts"] == 1).then_some(())
        }
    })
    .await;
    assert_ne!(pid_of(), killed);
    let recovered = details(&pool, &instance).await;
    assert!(recovered["last_recovered_at"].is_string(), "{recovered}");
    let password = admin_password(&pool, &instance).await;
    let mut conn = PgConnection::connect_with(
        &admin_options(&recovered, &password)
            .port(port)
            .ssl_mode(PgSslMode::Require),
    )
    .await
    .unwrap();
    assert_eq!(scalar::<i32>(&mut conn, "SELECT 1").await, 1);
    conn.close().await.unwrap();

    // A running server is left alone.
    reconcile::once(&pool, &services).await;
    assert_eq!(details(&pool, &instance).await["restarts"], 1);

    operate_ok(&pool, &services, Operation::Deprovision, &instance, None).await;
    no_process_and_no_files(&root);
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn half_built_servers_are_finished_or_removed(_: PgPoolOptions, opts: PgConnectOptions) {
    let pool = pool(&opts, 8).await;
    let servers = Servers::new();
    let services = servers.services();

    // A crash during initdb left a partial data folder: the retried provision starts afresh and finishes.
    let instance = new_instance(&pool, PLAN, json!({ "tuning_profile": "throwaway" })).await;
    let root = servers.root(&instance);
    std::fs::create_dir_all(root.join("data.partial/base")).unwrap();
    std::fs::write(root.join("data.partial/PG_VERSION"), "15\n").unwrap();
    operate_ok(&pool, &services, Operation::Provision, &instance, None).await;
    assert!(!root.join("data.partial").exists());
    assert_eq!(
        details(&pool, &instance).await["tuning_profile"],
        "throwaway"
    );
    operate_ok(&pool, &services, Operation::Deprovision, &instance, None).await;
    no_process_and_no_files(&root);

    // A server initialized and started, but the provision never finished (no admin user, no details):
    // deprovision stops and removes it.
    let instance = new_instance(&pool, PLAN, json!({})).await;
    let root = servers.root(&instance);
    let server = broker::embedded::PgServer::ensure_started(&root)
        .await
        .unwrap();
    assert!(server.is_running().await);
    operate_ok(&pool, &services, Operation::Deprovision, &instance, None).await;
    no_process_and_no_files(&root);

    // Nothing at all: deprovision is still fine.
    let instance = new_instance(&pool, PLAN, json!({})).await;
    operate_ok(&pool, &services, Operation::Deprovision, &instance, None).await;
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn unknown_postgres_version_fails_with_a_clear_message(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let pool = pool(&opts, 8).await;
    let servers = Servers::new();
    let services = servers.services();
    let instance = new_instance(&pool, PLAN, json!({ "postgres_version": "99" })).await;
    let row = operate(
        &pool,
        &services,
        Operation::Provision,
        &instance,
        None,
        json!({}),
    )
    .await;
    assert_eq!(row.state, "failed");
    assert_eq!(row.attempts, 1, "a missing version is Fatal, not retried");
    let error = row.last_error.unwrap();
    assert!(
        error.contains("postgres_version") && error.contains("99") && error.contains("installed"),
        "{error}"
    );
    operate_ok(&pool, &services, Operation::Deprovision, &instance, None).await;
    assert!(!servers.root(&instance).exists());
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn expired_instances_are_deprovisioned_once(_: PgPoolOptions, opts: PgConnectOptions) {
    let pool = pool(&opts, 8).await;
    let servers = Servers::new();
    let services = servers.services();
    let expired = new_instance(&pool, PLAN, json!({ "expiration_date": "2020-01-01" })).await;
    let later = new_instance(
        &pool,
        PLAN,
        json!({ "expiration_date": "2999-01-01T00:00:00Z" }),
    )
    .await;
    for _ in 0..3 {
        reconcile::once(&pool, &services).await;
    }
    let count = |id: String| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM tasks WHERE instance_id = $1 AND operation = 'deprovision'",
            )
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    assert_eq!(count(expired.clone()).await, 1);
    assert_eq!(count(later.clone()).await, 0);
    drain_all(&pool, &services).await;
    assert!(instances::get(&pool, &expired).await.unwrap().is_none());
    assert!(instances::get(&pool, &later).await.unwrap().is_some());
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn workers_on_other_hosts_leave_the_instance_alone(_: PgPoolOptions, opts: PgConnectOptions) {
    let pool = pool(&opts, 8).await;
    let servers = Servers::new();
    let services = servers.services();
    let instance = new_instance(&pool, PLAN, json!({})).await;
    instances::merge_details(&pool, &instance, &json!({ "engine_host": "other-host" }))
        .await
        .unwrap();
    let deprovision = operation_task(Operation::Deprovision, &instance, None, json!({}));
    let id = enqueue_with(&pool, deprovision).await;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let worker = tokio::spawn(berth_worker::run(
        pool.clone(),
        services.clone(),
        Arc::new(tasks::registry()),
        config("w"),
        shutdown.clone(),
    ));
    let row = eventually(
        Duration::from_secs(20),
        "the task to be handed back",
        || {
            let pool = pool.clone();
            async move {
                let row = task(&pool, id).await;
                row.progress
                    .as_deref()
                    .is_some_and(|p| p.contains("other-host"))
                    .then_some(row)
            }
        },
    )
    .await;
    shutdown.cancel();
    worker.await.unwrap().unwrap();
    assert_eq!(
        row.state, "pending",
        "handed back, not failed: {:?}",
        row.last_error
    );
    assert_ne!(task(&pool, id).await.state, "succeeded");
    assert!(instances::get(&pool, &instance).await.unwrap().is_some());
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn servers_too_deep_for_a_unix_socket_listen_on_tcp_only(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let pool = pool(&opts, 8).await;
    let deep = std::env::temp_dir()
        .join(format!("berth-local-{}", uuid::Uuid::new_v4().simple()))
        .join("a-folder-name-long-enough-that-no-unix-socket-path-fits-under-it");
    let servers = Servers::in_dir(deep);
    let services = servers.services();
    let instance = new_instance(&pool, PLAN, json!({})).await;
    operate_ok(&pool, &services, Operation::Provision, &instance, None).await;
    let binding = new_binding(&pool, &instance, PLAN, json!({})).await;
    operate_ok(&pool, &services, Operation::Bind, &instance, Some(&binding)).await;
    let creds = credentials(&pool, &binding).await;
    let mut app = connect_url(creds["DATABASE_URL"].as_str().unwrap()).await;
    assert_eq!(scalar::<i32>(&mut app, "SELECT 1").await, 1);
    let port = creds["PGPORT"].as_str().unwrap();
    let socket = servers
        .root(&instance)
        .join(format!("data/.s.PGSQL.{port}"));
    assert!(
        !socket.exists(),
        "no Unix socket where its path is too long"
    );
    app.close().await.unwrap();
    operate_ok(&pool, &services, Operation::Deprovision, &instance, None).await;
    no_process_and_no_files(&servers.root(&instance));
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn a_new_server_delivers_its_connection(_: PgPoolOptions, opts: PgConnectOptions) {
    use std::os::unix::fs::PermissionsExt;
    let pool = pool(&opts, 8).await;
    let servers = Servers::new();
    let store = crate::peers::seaweed();
    let s3 = crate::peers::s3_client(&store.url, &store.key, &store.secret);
    let bucket = format!("connstr-{}", uuid::Uuid::new_v4().simple());
    s3.create_bucket().bucket(&bucket).send().await.unwrap();
    let callback = servers.0.join("callback.sh");
    let args_file = servers.0.join("args");
    std::fs::write(
        &callback,
        format!(
            "#!/bin/sh\nprintf '%s\\n' \"$@\" > {}\n",
            args_file.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&callback, std::fs::Permissions::from_mode(0o755)).unwrap();
    let services = servers.services_with(json!({
        "connstr_bucket": bucket, "connstr_bucket_endpoint": store.url,
        "connstr_bucket_access_key": store.key, "connstr_bucket_access_secret": store.secret,
        "setup_finished_callback": callback,
    }));
    let id = new_instance(&pool, PLAN, json!({ "tags": { "env": "ci" } })).await;
    operate_ok(&pool, &services, Operation::Provision, &id, None).await;

    // The default key, with pg-spot-operator's fields; its connection string works.
    let pushed = crate::peers::s3_json(&s3, &bucket, &format!("berth/{id}/connstr.json")).await;
    assert_eq!(pushed["instance_name"], id.as_str());
    assert_eq!(pushed["ip_private"], "127.0.0.1");
    assert_eq!(pushed["ip_public"], "");
    assert_eq!(pushed["admin_user"], "app_admin");
    assert_eq!(pushed["app_db_name"], "app");
    assert_eq!(pushed["admin_password"], admin_password(&pool, &id).await);
    let mut conn = connect_url(pushed["connstr"].as_str().unwrap()).await;
    assert_eq!(
        scalar::<String>(&mut conn, "SELECT current_user::text").await,
        "app_admin"
    );

    // The callback: name, private connection string, "" (no public address), tags.
    let args = std::fs::read_to_string(&args_file).unwrap();
    let args: Vec<&str> = args.lines().collect();
    assert_eq!(
        args,
        [
            id.as_str(),
            pushed["connstr"].as_str().unwrap(),
            "",
            r#"{"env":"ci"}"#
        ]
    );
    assert_eq!(details(&pool, &id).await["delivery"]["errors"], json!([]));
    operate_ok(&pool, &services, Operation::Deprovision, &id, None).await;
}

/// An expired binding on a server of its own: the reconcile loop's revocation drops its role and ends its open
/// session, and records when.
#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn an_expired_binding_loses_its_role_and_session(_: PgPoolOptions, opts: PgConnectOptions) {
    let pool = pool(&opts, 8).await;
    let servers = Servers::new();
    let services = servers.services();
    let instance = new_instance(&pool, PLAN, json!({})).await;
    operate_ok(&pool, &services, Operation::Provision, &instance, None).await;
    let binding = new_binding(&pool, &instance, PLAN, json!({ "expires_in": 600 })).await;
    operate_ok(&pool, &services, Operation::Bind, &instance, Some(&binding)).await;
    let url = credentials(&pool, &binding).await["DATABASE_URL"]
        .as_str()
        .unwrap()
        .to_string();
    let mut session = connect_url(&url).await;
    assert_eq!(scalar::<i32>(&mut session, "SELECT 1").await, 1);

    expire_now(&pool, &binding).await;
    reconcile::once(&pool, &services).await;
    drain_all(&pool, &services).await;

    assert!(
        sqlx::query("SELECT 1").execute(&mut session).await.is_err(),
        "the open session is ended"
    );
    assert!(
        PgConnection::connect(&url).await.is_err(),
        "the expired credentials still log in"
    );
    let details = details(&pool, &instance).await;
    let mut admin = PgConnection::connect_with(&admin_options(
        &details,
        &admin_password(&pool, &instance).await,
    ))
    .await
    .unwrap();
    let role = names::binding_role(PREFIX, &binding);
    let left: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)")
            .bind(&role)
            .fetch_one(&mut admin)
            .await
            .unwrap();
    assert!(!left, "the role {role} is dropped");
    admin.close().await.unwrap();
    assert!(
        bindings::get(&pool, &binding)
            .await
            .unwrap()
            .unwrap()
            .revoked_at
            .is_some()
    );

    operate_ok(&pool, &services, Operation::Deprovision, &instance, None).await;
    no_process_and_no_files(&servers.root(&instance));
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn passwords_never_reach_the_servers_statement_log(_: PgPoolOptions, opts: PgConnectOptions) {
    use secrecy::ExposeSecret;
    let pool = pool(&opts, 8).await;
    let servers = Servers::new();
    let services = servers.services();
    let instance = new_instance(&pool, PLAN, json!({ "admin_user": "boss" })).await;
    operate_ok(&pool, &services, Operation::Provision, &instance, None).await;
    let server = broker::embedded::PgServer::open(&servers.root(&instance)).unwrap();
    log_every_statement(&server).await;

    // Provision again (it sets the admin user's password anew), then bind read-write and read-only.
    operate_ok(&pool, &services, Operation::Provision, &instance, None).await;
    let admin = admin_password(&pool, &instance).await;
    let details = details(&pool, &instance).await;
    PgConnection::connect_with(&admin_options(&details, &admin))
        .await
        .expect("the admin user logs in with its password");
    let mut passwords = vec![admin];
    for access in ["read-write", "read-only"] {
        let binding = new_binding(&pool, &instance, PLAN, json!({ "access": access })).await;
        operate_ok(&pool, &services, Operation::Bind, &instance, Some(&binding)).await;
        let creds = credentials(&pool, &binding).await;
        connect_url(creds["uri"].as_str().unwrap()).await;
        let mut su = connect_url(server.url("postgres").expose_secret()).await;
        let stored: String =
            sqlx::query_scalar("SELECT rolpassword FROM pg_authid WHERE rolname = $1")
                .bind(creds["PGUSER"].as_str().unwrap())
                .fetch_one(&mut su)
                .await
                .unwrap();
        assert!(stored.starts_with("SCRAM-SHA-256$4096:"), "{stored}");
        passwords.push(creds["PGPASSWORD"].as_str().unwrap().to_string());
    }
    let log = server_log(&server);
    assert!(log.contains("statement: ALTER ROLE"), "{log}");
    for password in &passwords {
        assert!(
            !log.contains(password.as_str()),
            "a password is in the server log:\n{log}"
        );
    }
    assert!(log.contains("PASSWORD 'SCRAM-SHA-256$4096:"), "{log}");
    operate_ok(&pool, &services, Operation::Deprovision, &instance, None).await;
}
