//! The `local` engine (`dedicated` plan): a real Postgres server per instance under a temporary servers
//! folder. Provision (idempotent, TLS, tuning, checksums), bind/unbind, update, the reconcile loop bringing
//! a killed server back, expiry, deprovision leaving no process and no files, half-built cleanup.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use berth_worker::{Services, providers::local_postgres, reconcile, tasks};
use broker::{
    db::{bindings, instances, tasks::NewTask},
    model::{Operation, UpdatePayload},
    names,
};
use serde_json::{Map, Value, json};
use sqlx::{
    Connection, PgConnection, PgPool,
    postgres::{PgConnectOptions, PgPoolOptions, PgSslMode},
};

use crate::helpers::*;

async fn new_instance(pool: &PgPool, parameters: Value) -> String {
    insert_instance(pool, SERVICE, PLAN, json!({}), parameters).await
}

async fn new_binding(pool: &PgPool, instance_id: &str, parameters: Value) -> String {
    insert_binding(pool, instance_id, SERVICE, PLAN, parameters).await
}

const SERVICE: &str = "3bdd3b6c-801f-470b-a45f-bc1849fa2124";
const PLAN: &str = "5f0c2d8e-9b41-4c7a-a6e3-2d7f1b8c4e90";
const PREFIX: &str = "bt_";

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
                for pid in local_postgres::processes_in(&entry.path().join("data")) {
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

async fn details(pool: &PgPool, instance: &str) -> Value {
    instances::get(pool, instance)
        .await
        .unwrap()
        .unwrap()
        .details
}

async fn admin_password(pool: &PgPool, instance: &str) -> String {
    let row = instances::get(pool, instance).await.unwrap().unwrap();
    let secrets: Value = cipher()
        .open_json(&row.secrets.expect("secrets stored"))
        .unwrap();
    secrets["admin_password"].as_str().unwrap().to_string()
}

async fn credentials(pool: &PgPool, binding_id: &str) -> Map<String, Value> {
    let row = bindings::get(pool, binding_id).await.unwrap().unwrap();
    cipher()
        .open_json(&row.credentials.expect("credentials stored"))
        .unwrap()
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
        local_postgres::processes_in(&root.join("data")).is_empty(),
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
        json!({ "tuning_profile": "oltp", "extensions": ["citext"], "app_db_name": "shop", "admin_user": "boss",
                "cpu_min": 4, "tags": { "team": "a" } }),
    )
    .await;

    // Provision twice: the second run finds everything and is harmless.
    succeeded(
        &operate(
            &pool,
            &services,
            Operation::Provision,
            &instance,
            None,
            json!({}),
        )
        .await,
    );
    let first = details(&pool, &instance).await;
    succeeded(
        &operate(
            &pool,
            &services,
            Operation::Provision,
            &instance,
            None,
            json!({}),
        )
        .await,
    );
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

    // The admin user connects over TLS only; tuning, checksums and extensions are in place.
    let password = admin_password(&pool, &instance).await;
    let options = admin_options(&details, &password);
    let mut conn = PgConnection::connect_with(&options.clone().ssl_mode(PgSslMode::Require))
        .await
        .unwrap();
    assert!(
        scalar::<bool>(
            &mut conn,
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
        )
        .await
    );
    assert_eq!(
        scalar::<String>(&mut conn, "SHOW max_connections").await,
        "200"
    );
    assert_eq!(
        scalar::<String>(&mut conn, "SHOW shared_buffers").await,
        "256MB"
    );
    assert_eq!(
        scalar::<String>(&mut conn, "SHOW data_checksums").await,
        "on"
    );
    assert_eq!(
        scalar::<String>(&mut conn, "SHOW listen_addresses").await,
        "127.0.0.1"
    );
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

    // A read-write and a read-only binding.
    let rw = new_binding(&pool, &instance, json!({})).await;
    let ro = new_binding(&pool, &instance, json!({ "access": "read-only" })).await;
    succeeded(
        &operate(
            &pool,
            &services,
            Operation::Bind,
            &instance,
            Some(&rw),
            json!({}),
        )
        .await,
    );
    succeeded(
        &operate(
            &pool,
            &services,
            Operation::Bind,
            &instance,
            Some(&ro),
            json!({}),
        )
        .await,
    );
    let rw_creds = credentials(&pool, &rw).await;
    let ro_creds = credentials(&pool, &ro).await;
    for creds in [&rw_creds, &ro_creds] {
        assert!(
            creds["DATABASE_URL"]
                .as_str()
                .unwrap()
                .ends_with("/shop?sslmode=require"),
            "{creds:?}"
        );
        assert_eq!(creds["PGSSLMODE"], "require");
        assert_eq!(creds["PGPORT"], json!(details["port"].to_string()));
        assert_eq!(creds["PGDATABASE"], "shop");
    }
    // pg_hba admits hostssl only, so a session at all is a TLS session.
    let mut app = connect_url(rw_creds["DATABASE_URL"].as_str().unwrap()).await;
    sqlx::raw_sql("CREATE TABLE items (id int PRIMARY KEY); INSERT INTO items VALUES (1)")
        .execute(&mut app)
        .await
        .unwrap();
    let mut reader = connect_url(ro_creds["DATABASE_URL"].as_str().unwrap()).await;
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

    // Unbind drops the role and ends its sessions.
    succeeded(
        &operate(
            &pool,
            &services,
            Operation::Unbind,
            &instance,
            Some(&rw),
            json!({}),
        )
        .await,
    );
    assert!(
        sqlx::query("SELECT 1").execute(&mut app).await.is_err(),
        "the unbound session must be ended"
    );
    assert!(
        PgConnection::connect(rw_creds["DATABASE_URL"].as_str().unwrap())
            .await
            .is_err()
    );
    let mut conn = PgConnection::connect_with(&options.clone().ssl_mode(PgSslMode::Require))
        .await
        .unwrap();
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
    succeeded(
        &operate(
            &pool,
            &services,
            Operation::Update,
            &instance,
            None,
            payload,
        )
        .await,
    );
    let mut conn = PgConnection::connect_with(&options.clone().ssl_mode(PgSslMode::Require))
        .await
        .unwrap();
    assert_eq!(scalar::<String>(&mut conn, "SHOW work_mem").await, "64MB");
    assert_eq!(
        scalar::<String>(&mut conn, "SHOW max_connections").await,
        "40"
    );
    assert!(
        scalar::<bool>(
            &mut conn,
            "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'hstore')"
        )
        .await
    );
    conn.close().await.unwrap();
    drop(reader);

    // Deprovision (twice): no process, no files.
    succeeded(
        &operate(
            &pool,
            &services,
            Operation::Deprovision,
            &instance,
            None,
            json!({}),
        )
        .await,
    );
    no_process_and_no_files(&servers.root(&instance));
    assert!(instances::get(&pool, &instance).await.unwrap().is_none());
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn reconcile_restarts_a_killed_server(_: PgPoolOptions, opts: PgConnectOptions) {
    let pool = pool(&opts, 8).await;
    let servers = Servers::new();
    let services = servers.services();
    let instance = new_instance(&pool, json!({})).await;
    succeeded(
        &operate(
            &pool,
            &services,
            Operation::Provision,
            &instance,
            None,
            json!({}),
        )
        .await,
    );
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

    succeeded(
        &operate(
            &pool,
            &services,
            Operation::Deprovision,
            &instance,
            None,
            json!({}),
        )
        .await,
    );
    no_process_and_no_files(&root);
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn half_built_servers_are_finished_or_removed(_: PgPoolOptions, opts: PgConnectOptions) {
    let pool = pool(&opts, 8).await;
    let servers = Servers::new();
    let services = servers.services();

    // A crash during initdb left a partial data folder: the retried provision starts afresh and finishes.
    let instance = new_instance(&pool, json!({ "tuning_profile": "throwaway" })).await;
    let root = servers.root(&instance);
    std::fs::create_dir_all(root.join("data.partial/base")).unwrap();
    std::fs::write(root.join("data.partial/PG_VERSION"), "15\n").unwrap();
    succeeded(
        &operate(
            &pool,
            &services,
            Operation::Provision,
            &instance,
            None,
            json!({}),
        )
        .await,
    );
    assert!(!root.join("data.partial").exists());
    assert_eq!(
        details(&pool, &instance).await["tuning_profile"],
        "throwaway"
    );
    succeeded(
        &operate(
            &pool,
            &services,
            Operation::Deprovision,
            &instance,
            None,
            json!({}),
        )
        .await,
    );
    no_process_and_no_files(&root);

    // A server initialized and started, but the provision never finished (no admin user, no details):
    // deprovision stops and removes it.
    let instance = new_instance(&pool, json!({})).await;
    let root = servers.root(&instance);
    let server = broker::embedded::PgServer::ensure_started(&root)
        .await
        .unwrap();
    assert!(server.is_running().await);
    succeeded(
        &operate(
            &pool,
            &services,
            Operation::Deprovision,
            &instance,
            None,
            json!({}),
        )
        .await,
    );
    no_process_and_no_files(&root);

    // Nothing at all: deprovision is still fine.
    let instance = new_instance(&pool, json!({})).await;
    succeeded(
        &operate(
            &pool,
            &services,
            Operation::Deprovision,
            &instance,
            None,
            json!({}),
        )
        .await,
    );
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn unknown_postgres_version_fails_with_a_clear_message(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let pool = pool(&opts, 8).await;
    let servers = Servers::new();
    let services = servers.services();
    let instance = new_instance(&pool, json!({ "postgres_version": "99" })).await;
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
    succeeded(
        &operate(
            &pool,
            &services,
            Operation::Deprovision,
            &instance,
            None,
            json!({}),
        )
        .await,
    );
    assert!(!servers.root(&instance).exists());
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn expired_instances_are_deprovisioned_once(_: PgPoolOptions, opts: PgConnectOptions) {
    let pool = pool(&opts, 8).await;
    let servers = Servers::new();
    let services = servers.services();
    let expired = new_instance(&pool, json!({ "expiration_date": "2020-01-01" })).await;
    let later = new_instance(&pool, json!({ "expiration_date": "2999-01-01T00:00:00Z" })).await;
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
    drain(&pool, services.clone(), tasks::registry(), config("w")).await;
    assert!(instances::get(&pool, &expired).await.unwrap().is_none());
    assert!(instances::get(&pool, &later).await.unwrap().is_some());
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn workers_on_other_hosts_leave_the_instance_alone(_: PgPoolOptions, opts: PgConnectOptions) {
    let pool = pool(&opts, 8).await;
    let servers = Servers::new();
    let services = servers.services();
    let instance = new_instance(&pool, json!({})).await;
    instances::merge_details(&pool, &instance, &json!({ "engine_host": "other-host" }))
        .await
        .unwrap();
    let mut new = NewTask::new(Operation::Deprovision.task_kind(), json!({}));
    new.instance_id = Some(instance.clone());
    new.operation = Some(Operation::Deprovision);
    let id = enqueue_with(&pool, new).await;
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
    let instance = new_instance(&pool, json!({})).await;
    succeeded(
        &operate(
            &pool,
            &services,
            Operation::Provision,
            &instance,
            None,
            json!({}),
        )
        .await,
    );
    let binding = new_binding(&pool, &instance, json!({})).await;
    succeeded(
        &operate(
            &pool,
            &services,
            Operation::Bind,
            &instance,
            Some(&binding),
            json!({}),
        )
        .await,
    );
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
    succeeded(
        &operate(
            &pool,
            &services,
            Operation::Deprovision,
            &instance,
            None,
            json!({}),
        )
        .await,
    );
    no_process_and_no_files(&servers.root(&instance));
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn a_new_server_delivers_its_connection(_: PgPoolOptions, opts: PgConnectOptions) {
    use std::os::unix::fs::PermissionsExt;
    let pool = pool(&opts, 8).await;
    let servers = Servers::new();
    let store = crate::s3::seaweed();
    let s3 = crate::s3::client(&store.url, &store.key, &store.secret);
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
    let id = new_instance(&pool, json!({ "tags": { "env": "ci" } })).await;
    succeeded(&operate(&pool, &services, Operation::Provision, &id, None, json!({})).await);

    // The default key, with pg-spot-operator's fields; its connection string works.
    let object = s3
        .get_object()
        .bucket(&bucket)
        .key(format!("berth/{id}/connstr.json"))
        .send()
        .await
        .unwrap();
    let pushed: Value =
        serde_json::from_slice(&object.body.collect().await.unwrap().into_bytes()).unwrap();
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
    succeeded(
        &operate(
            &pool,
            &services,
            Operation::Deprovision,
            &id,
            None,
            json!({}),
        )
        .await,
    );
}

/// An expired binding on a server of its own: the reconcile loop's revocation drops its role and ends its open
/// session, and records when.
#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn an_expired_binding_loses_its_role_and_session(_: PgPoolOptions, opts: PgConnectOptions) {
    let pool = pool(&opts, 8).await;
    let servers = Servers::new();
    let services = servers.services();
    let instance = new_instance(&pool, json!({})).await;
    succeeded(
        &operate(
            &pool,
            &services,
            Operation::Provision,
            &instance,
            None,
            json!({}),
        )
        .await,
    );
    let binding = new_binding(&pool, &instance, json!({ "expires_in": 600 })).await;
    succeeded(
        &operate(
            &pool,
            &services,
            Operation::Bind,
            &instance,
            Some(&binding),
            json!({}),
        )
        .await,
    );
    let url = credentials(&pool, &binding).await["DATABASE_URL"]
        .as_str()
        .unwrap()
        .to_string();
    let mut session = connect_url(&url).await;
    assert_eq!(scalar::<i32>(&mut session, "SELECT 1").await, 1);

    sqlx::query(
        "UPDATE service_bindings SET expires_at = now() - interval '1 second' WHERE id = $1",
    )
    .bind(&binding)
    .execute(&pool)
    .await
    .unwrap();
    reconcile::once(&pool, &services).await;
    drain(&pool, services.clone(), tasks::registry(), config("w")).await;

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

    succeeded(
        &operate(
            &pool,
            &services,
            Operation::Deprovision,
            &instance,
            None,
            json!({}),
        )
        .await,
    );
    no_process_and_no_files(&servers.root(&instance));
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn passwords_never_reach_the_servers_statement_log(_: PgPoolOptions, opts: PgConnectOptions) {
    use secrecy::ExposeSecret;
    let pool = pool(&opts, 8).await;
    let servers = Servers::new();
    let services = servers.services();
    let instance = new_instance(&pool, json!({ "admin_user": "boss" })).await;
    succeeded(
        &operate(
            &pool,
            &services,
            Operation::Provision,
            &instance,
            None,
            json!({}),
        )
        .await,
    );
    let server = broker::embedded::PgServer::open(&servers.root(&instance)).unwrap();
    log_every_statement(&server).await;

    // Provision again (it sets the admin user's password anew), then bind read-write and read-only.
    succeeded(
        &operate(
            &pool,
            &services,
            Operation::Provision,
            &instance,
            None,
            json!({}),
        )
        .await,
    );
    let admin = admin_password(&pool, &instance).await;
    let details = details(&pool, &instance).await;
    PgConnection::connect_with(&admin_options(&details, &admin))
        .await
        .expect("the admin user logs in with its password");
    let mut passwords = vec![admin];
    for access in ["read-write", "read-only"] {
        let binding = new_binding(&pool, &instance, json!({ "access": access })).await;
        succeeded(
            &operate(
                &pool,
                &services,
                Operation::Bind,
                &instance,
                Some(&binding),
                json!({}),
            )
            .await,
        );
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
    succeeded(
        &operate(
            &pool,
            &services,
            Operation::Deprovision,
            &instance,
            None,
            json!({}),
        )
        .await,
    );
}
