//! The `shared` engine against the test server: provision, bind (read-write, read-only), unbind,
//! deprovision, each idempotent.

use std::sync::Arc;

use berth_worker::{Services, tasks};
use broker::{
    db::{
        bindings, instances,
        tasks::{NewTask, TaskRow},
    },
    model::{Operation, TaskId, UpdatePayload},
    names,
};
use serde_json::{Map, Value, json};
use sqlx::{
    Connection, PgConnection, PgPool,
    postgres::{PgConnectOptions, PgPoolOptions},
};

use crate::{helpers::*, webhook};

async fn new_instance(pool: &PgPool, parameters: Value) -> String {
    insert_instance(pool, SERVICE, PLAN, json!({}), parameters).await
}

async fn new_binding(pool: &PgPool, instance_id: &str, parameters: Value) -> String {
    insert_binding(pool, instance_id, SERVICE, PLAN, parameters).await
}

const SERVICE: &str = "3bdd3b6c-801f-470b-a45f-bc1849fa2124";
const PLAN: &str = "707a3e6f-f8db-4339-88da-1533837a9810";
const PREFIX: &str = "bt_";

/// Enqueues the operation's task, drains the queue, returns the finished task.
async fn operate(
    pool: &PgPool,
    services: &Arc<Services>,
    op: Operation,
    instance_id: &str,
    binding_id: Option<&str>,
    payload: Value,
) -> TaskRow {
    operate_with_webhook(pool, services, op, instance_id, binding_id, payload, None).await
}

async fn operate_with_webhook(
    pool: &PgPool,
    services: &Arc<Services>,
    op: Operation,
    instance_id: &str,
    binding_id: Option<&str>,
    payload: Value,
    webhook: Option<String>,
) -> TaskRow {
    let mut new = NewTask::new(op.task_kind(), payload);
    new.webhook = webhook.map(|url| (url, cipher().seal(webhook::SECRET)));
    new.instance_id = Some(instance_id.to_string());
    new.binding_id = binding_id.map(str::to_string);
    new.operation = Some(op);
    new.max_attempts = 3;
    let id = enqueue_with(pool, new).await;
    drain(pool, services.clone(), tasks::registry(), config("w")).await;
    task(pool, id).await
}

async fn admin() -> PgConnection {
    PgConnection::connect(&admin_url()).await.unwrap()
}

async fn role_exists(role: &str) -> bool {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)")
        .bind(role)
        .fetch_one(&mut admin().await)
        .await
        .unwrap()
}

async fn database_exists(database: &str) -> bool {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
        .bind(database)
        .fetch_one(&mut admin().await)
        .await
        .unwrap()
}

async fn credentials(pool: &PgPool, binding_id: &str) -> Map<String, Value> {
    let row = bindings::get(pool, binding_id).await.unwrap().unwrap();
    cipher()
        .open_json(&row.credentials.expect("credentials stored"))
        .unwrap()
}

fn url_of(creds: &Map<String, Value>) -> String {
    creds["DATABASE_URL"].as_str().unwrap().to_string()
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn shared_lifecycle(_: PgPoolOptions, opts: PgConnectOptions) {
    let pool = pool(&opts, 8).await;
    let services = services();
    let instance = new_instance(&pool, json!({ "extensions": ["citext"] })).await;
    let database = names::instance_database(PREFIX, &instance);
    let owner = names::instance_owner_role(PREFIX, &instance);

    // Provision (twice: the second run finds everything and is harmless).
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
    assert!(database_exists(&database).await && role_exists(&owner).await);
    let details = instances::get(&pool, &instance)
        .await
        .unwrap()
        .unwrap()
        .details;
    assert_eq!(details["database"], json!(database));
    assert_eq!(details["owner_role"], json!(owner));
    let mut options: PgConnectOptions = admin_url().parse().unwrap();
    options = options.database(&database);
    let mut as_admin = PgConnection::connect_with(&options).await.unwrap();
    let extensions: Vec<String> = sqlx::query_scalar("SELECT extname::text FROM pg_extension")
        .fetch_all(&mut as_admin)
        .await
        .unwrap();
    assert!(extensions.contains(&"citext".to_string()), "{extensions:?}");

    // Update: a newly requested extension is created and the parameters recorded.
    let update = UpdatePayload {
        plan_id: PLAN.into(),
        parameters: json!({ "extensions": ["hstore"] }),
        context: json!({ "space": "new" }),
        maintenance_version: Some("1.0.0".into()),
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
    let has_hstore: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'hstore')")
            .fetch_one(&mut as_admin)
            .await
            .unwrap();
    assert!(has_hstore);
    as_admin.close().await.unwrap();
    let row = instances::get(&pool, &instance).await.unwrap().unwrap();
    assert_eq!(row.parameters, json!({ "extensions": ["hstore"] }));

    // A read-write binding: connect, create a table, insert.
    let writer = new_binding(&pool, &instance, json!({})).await;
    let receiver = webhook::Receiver::default();
    let hook = format!("http://{}/hook", webhook::start(receiver.clone()).await);
    let bind = operate_with_webhook(
        &pool,
        &services,
        Operation::Bind,
        &instance,
        Some(&writer),
        json!({}),
        Some(hook),
    )
    .await;
    succeeded(&bind);
    let creds = credentials(&pool, &writer).await;
    // Credentials appear nowhere but in the sealed column: not in the task, not in the webhook body.
    let password = creds["PGPASSWORD"].as_str().unwrap().to_string();
    let bind_row = format!("{:?} {:?} {}", bind.progress, bind.last_error, bind.payload);
    assert!(!bind_row.contains(&password));
    let received = receiver.received.lock().unwrap().clone();
    assert_eq!(received.len(), 1, "the bind's webhook was delivered");
    let body = String::from_utf8(received[0].1.clone()).unwrap();
    assert!(
        body.contains("\"succeeded\"")
            && !body.contains(&password)
            && !body.contains("postgres://"),
        "{body}"
    );
    for key in [
        "DATABASE_URL",
        "uri",
        "PGHOST",
        "PGPORT",
        "PGDATABASE",
        "PGUSER",
        "PGPASSWORD",
    ] {
        assert!(
            creds.get(key).and_then(Value::as_str).is_some(),
            "credentials lack {key}"
        );
    }
    assert_eq!(creds["PGDATABASE"], json!(database));
    let details = bindings::get(&pool, &writer)
        .await
        .unwrap()
        .unwrap()
        .details;
    assert!(details["endpoints"][0]["host"].is_string());
    assert!(
        !details
            .to_string()
            .contains(creds["PGPASSWORD"].as_str().unwrap())
    );
    let mut app = PgConnection::connect(&url_of(&creds))
        .await
        .expect("the read-write binding connects");
    sqlx::raw_sql("CREATE TABLE notes (id serial PRIMARY KEY, body text); INSERT INTO notes (body) VALUES ('hi')")
        .execute(&mut app)
        .await
        .unwrap();
    let table_owner: String =
        sqlx::query_scalar("SELECT tableowner::text FROM pg_tables WHERE tablename = 'notes'")
            .fetch_one(&mut app)
            .await
            .unwrap();
    assert_eq!(table_owner, owner, "objects belong to the owner role");
    app.close().await.unwrap();

    // Binding again (a retry) is harmless and leaves working credentials.
    succeeded(
        &operate(
            &pool,
            &services,
            Operation::Bind,
            &instance,
            Some(&writer),
            json!({}),
        )
        .await,
    );
    let creds = credentials(&pool, &writer).await;
    PgConnection::connect(&url_of(&creds))
        .await
        .expect("credentials of the retried bind work")
        .close()
        .await
        .unwrap();

    // A read-only binding sees the table but cannot write.
    let reader = new_binding(&pool, &instance, json!({ "access": "read-only" })).await;
    succeeded(
        &operate(
            &pool,
            &services,
            Operation::Bind,
            &instance,
            Some(&reader),
            json!({}),
        )
        .await,
    );
    let reader_creds = credentials(&pool, &reader).await;
    let mut ro = PgConnection::connect(&url_of(&reader_creds))
        .await
        .expect("the read-only binding connects");
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM notes")
        .fetch_one(&mut ro)
        .await
        .unwrap();
    assert_eq!(count, 1);
    assert!(
        sqlx::query("INSERT INTO notes (body) VALUES ('no')")
            .execute(&mut ro)
            .await
            .is_err()
    );
    assert!(
        sqlx::raw_sql("CREATE TABLE mine (x int)")
            .execute(&mut ro)
            .await
            .is_err()
    );
    ro.close().await.unwrap();

    // A second read-write binding sees and changes the same table; tables it creates are readable by the reader.
    let second = new_binding(&pool, &instance, json!({ "access": "read-write" })).await;
    succeeded(
        &operate(
            &pool,
            &services,
            Operation::Bind,
            &instance,
            Some(&second),
            json!({}),
        )
        .await,
    );
    let mut app2 = PgConnection::connect(&url_of(&credentials(&pool, &second).await))
        .await
        .unwrap();
    sqlx::raw_sql("INSERT INTO notes (body) VALUES ('there'); CREATE TABLE later (x int); INSERT INTO later VALUES (1)")
        .execute(&mut app2)
        .await
        .unwrap();
    app2.close().await.unwrap();
    let mut ro = PgConnection::connect(&url_of(&reader_creds)).await.unwrap();
    let later: i64 = sqlx::query_scalar("SELECT count(*) FROM later")
        .fetch_one(&mut ro)
        .await
        .unwrap();
    assert_eq!(later, 1, "default privileges give the reader new tables");

    // Unbind the reader (with a session open): the role is gone and can no longer log in.
    let reader_role = names::binding_role(PREFIX, &reader);
    succeeded(
        &operate(
            &pool,
            &services,
            Operation::Unbind,
            &instance,
            Some(&reader),
            json!({}),
        )
        .await,
    );
    assert!(!role_exists(&reader_role).await);
    assert!(bindings::get(&pool, &reader).await.unwrap().is_none());
    assert!(
        sqlx::query("SELECT 1").execute(&mut ro).await.is_err(),
        "the open session was ended"
    );
    assert!(
        PgConnection::connect(&url_of(&reader_creds)).await.is_err(),
        "an unbound role cannot log in"
    );
    // Unbinding again finds nothing to do.
    let reader_again = new_binding(&pool, &instance, json!({ "access": "read-only" })).await;
    bindings::delete(&pool, &reader_again).await.unwrap();
    succeeded(
        &operate(
            &pool,
            &services,
            Operation::Unbind,
            &instance,
            Some(&reader_again),
            json!({}),
        )
        .await,
    );

    // Deprovision: database and every role gone, rows gone (bindings cascade).
    let writer_role = names::binding_role(PREFIX, &writer);
    let second_role = names::binding_role(PREFIX, &second);
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
    assert!(!database_exists(&database).await);
    for role in [&owner, &writer_role, &second_role] {
        assert!(!role_exists(role).await, "{role} still exists");
    }
    assert!(instances::get(&pool, &instance).await.unwrap().is_none());
    assert!(bindings::get(&pool, &writer).await.unwrap().is_none());
    // And again: nothing left to do.
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
async fn deprovision_cleans_up_a_half_built_instance(_: PgPoolOptions, opts: PgConnectOptions) {
    let pool = pool(&opts, 8).await;
    let services = services();
    let instance = new_instance(&pool, json!({})).await;
    let owner = names::instance_owner_role(PREFIX, &instance);
    // A provision that died after its first step.
    sqlx::raw_sql(&format!(
        "CREATE ROLE {} NOLOGIN",
        names::quote_ident(&owner)
    ))
    .execute(&mut admin().await)
    .await
    .unwrap();
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
    assert!(!role_exists(&owner).await);
    assert!(instances::get(&pool, &instance).await.unwrap().is_none());
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn bad_requests_fail_with_a_message(_: PgPoolOptions, opts: PgConnectOptions) {
    let pool = pool(&opts, 8).await;
    let services = services();
    // Not on the allow-list (the API's schema check would refuse it; the worker checks again).
    let instance = new_instance(&pool, json!({ "extensions": ["plpython3u"] })).await;
    let row = operate(
        &pool,
        &services,
        Operation::Provision,
        &instance,
        None,
        json!({}),
    )
    .await;
    assert_eq!((row.state.as_str(), row.attempts), ("failed", 1));
    assert!(row.last_error.unwrap().contains("not offered"));
    // Binding an instance whose database was never made.
    let binding = new_binding(&pool, &instance, json!({})).await;
    let row = operate(
        &pool,
        &services,
        Operation::Bind,
        &instance,
        Some(&binding),
        json!({}),
    )
    .await;
    assert_eq!((row.state.as_str(), row.attempts), ("failed", 1));
    assert!(row.last_error.unwrap().contains("missing"));
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
async fn binding_roles_get_scram_verifiers_and_log_in(_: PgPoolOptions, opts: PgConnectOptions) {
    let pool = pool(&opts, 8).await;
    let services = services();
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
    // Twice: the retry's ALTER ROLE sets a new verifier and the stored credentials still work.
    for _ in 0..2 {
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
        let role = creds["PGUSER"].as_str().unwrap();
        let stored: String =
            sqlx::query_scalar("SELECT rolpassword FROM pg_authid WHERE rolname = $1")
                .bind(role)
                .fetch_one(&mut admin().await)
                .await
                .unwrap();
        assert!(stored.starts_with("SCRAM-SHA-256$4096:"), "{stored}");
        let mut app = PgConnection::connect(&url_of(&creds))
            .await
            .expect("the binding logs in with its password");
        let user: String = sqlx::query_scalar("SELECT session_user::text")
            .fetch_one(&mut app)
            .await
            .unwrap();
        assert_eq!(user, role);
    }
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

/// A private server of the test's own, stopped and removed when dropped.
struct PrivateServer {
    dir: std::path::PathBuf,
    server: broker::embedded::PgServer,
}

impl PrivateServer {
    async fn start() -> Self {
        let dir =
            std::env::temp_dir().join(format!("berth-scram-{}", uuid::Uuid::new_v4().simple()));
        let server = broker::embedded::PgServer::ensure_started(&dir)
            .await
            .unwrap();
        Self { dir, server }
    }
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        for pid in berth_worker::providers::local_postgres::processes_in(&self.server.data_dir()) {
            let _ = std::process::Command::new("kill")
                .arg("-KILL")
                .arg(pid.to_string())
                .stderr(std::process::Stdio::null())
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn binding_passwords_never_reach_the_servers_statement_log(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    use secrecy::ExposeSecret;
    let pool = pool(&opts, 8).await;
    let private = PrivateServer::start().await;
    log_every_statement(&private.server).await;
    let services = Arc::new(
        Services::new(
            serde_json::from_value(json!({
                "plans_dir": plans_dir(),
                "name_prefix": PREFIX,
                "shared_postgres_url": private.server.url("postgres").expose_secret(),
            }))
            .unwrap(),
            cipher(),
        )
        .unwrap(),
    );
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
    let writer = new_binding(&pool, &instance, json!({})).await;
    let reader = new_binding(&pool, &instance, json!({ "access": "read-only" })).await;
    let mut passwords = vec![];
    for binding in [&writer, &writer, &reader] {
        succeeded(
            &operate(
                &pool,
                &services,
                Operation::Bind,
                &instance,
                Some(binding),
                json!({}),
            )
            .await,
        );
        let creds = credentials(&pool, binding).await;
        PgConnection::connect(&url_of(&creds))
            .await
            .expect("the binding logs in");
        passwords.push(creds["PGPASSWORD"].as_str().unwrap().to_string());
    }
    let log = server_log(&private.server);
    // The log did record the role statements (with a verifier in place of the password).
    assert!(log.contains("statement: CREATE ROLE"), "{log}");
    for password in &passwords {
        assert!(
            !log.contains(password.as_str()),
            "a binding's password is in the server log:\n{log}"
        );
    }
    assert!(log.contains("PASSWORD 'SCRAM-SHA-256$4096:"), "{log}");
    private.server.stop().await.unwrap();
}

/// Enqueues an operation's task without running it.
async fn enqueue_operation(
    pool: &PgPool,
    op: Operation,
    instance_id: &str,
    binding_id: Option<&str>,
) -> TaskId {
    let mut new = NewTask::new(op.task_kind(), json!({}));
    new.instance_id = Some(instance_id.to_string());
    new.binding_id = binding_id.map(str::to_string);
    new.operation = Some(op);
    new.max_attempts = 3;
    enqueue_with(pool, new).await
}

/// An unbind sent while its bind still runs (a platform cleaning up after a synchronous bind that timed out)
/// waits, without spending attempts, until the bind has ended, then drops the role the bind made.
#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn an_unbind_waits_for_its_running_bind(_: PgPoolOptions, opts: PgConnectOptions) {
    let pool = pool(&opts, 8).await;
    let services = services();
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
    let role = names::binding_role(PREFIX, &binding);
    // The bind has made its role, and is still running on another worker.
    let bind = operate(
        &pool,
        &services,
        Operation::Bind,
        &instance,
        Some(&binding),
        json!({}),
    )
    .await;
    succeeded(&bind);
    assert!(role_exists(&role).await);
    sqlx::query(
        "UPDATE tasks SET state = 'running', worker_id = 'elsewhere', lease_until = now() + interval '1 hour',
                          finished_at = NULL WHERE id = $1",
    )
    .bind(bind.id)
    .execute(&pool)
    .await
    .unwrap();

    let unbind = enqueue_operation(&pool, Operation::Unbind, &instance, Some(&binding)).await;
    let worker = tokio::spawn({
        let (pool, services) = (pool.clone(), services.clone());
        async move { drain(&pool, services, tasks::registry(), config("w")).await }
    });
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let waiting = task(&pool, unbind).await;
    assert_eq!(waiting.state, "pending", "{waiting:?}");
    assert_eq!(waiting.attempts, 0, "waiting spends no attempt");
    assert_eq!(
        waiting.progress.as_deref(),
        Some("waiting for the bind in progress to end")
    );
    assert!(
        role_exists(&role).await,
        "the unbind did not run beside the bind"
    );

    // The bind ends; the unbind goes ahead.
    sqlx::query("UPDATE tasks SET state = 'succeeded', finished_at = now() WHERE id = $1")
        .bind(bind.id)
        .execute(&pool)
        .await
        .unwrap();
    worker.await.unwrap();
    succeeded(&task(&pool, unbind).await);
    assert!(!role_exists(&role).await);
    assert!(bindings::get(&pool, &binding).await.unwrap().is_none());
}

/// A bind and the unbind that follows it, both queued (the bind timed out before a worker took it): whichever
/// way the worker takes them, nothing is left: the bind is cancelled, or it runs first and the unbind after.
#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn a_queued_bind_and_its_unbind_leave_nothing(_: PgPoolOptions, opts: PgConnectOptions) {
    let pool = pool(&opts, 8).await;
    let services = services();
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
    let mut roles = Vec::new();
    let mut binds = Vec::new();
    let mut unbinds = Vec::new();
    for _ in 0..4 {
        let binding = new_binding(&pool, &instance, json!({})).await;
        roles.push((binding.clone(), names::binding_role(PREFIX, &binding)));
        binds.push(enqueue_operation(&pool, Operation::Bind, &instance, Some(&binding)).await);
        unbinds.push(enqueue_operation(&pool, Operation::Unbind, &instance, Some(&binding)).await);
    }
    drain(&pool, services.clone(), tasks::registry(), config("w")).await;
    for ((binding, role), (bind, unbind)) in roles.iter().zip(binds.iter().zip(&unbinds)) {
        succeeded(&task(&pool, *unbind).await);
        let bind = task(&pool, *bind).await;
        assert!(
            bind.state == "succeeded"
                || bind.last_error.as_deref()
                    == Some("cancelled: an unbind was requested before it started"),
            "{bind:?}"
        );
        assert!(!role_exists(role).await, "role {role} left behind");
        assert!(bindings::get(&pool, binding).await.unwrap().is_none());
    }
}

/// The same for a provision and the deprovision that follows it.
#[sqlx::test(migrator = "broker::MIGRATOR")]
async fn a_queued_provision_and_its_deprovision_leave_nothing(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let pool = pool(&opts, 8).await;
    let services = services();
    let instance = new_instance(&pool, json!({})).await;
    let provision = enqueue_operation(&pool, Operation::Provision, &instance, None).await;
    let deprovision = enqueue_operation(&pool, Operation::Deprovision, &instance, None).await;
    drain(&pool, services.clone(), tasks::registry(), config("w")).await;
    succeeded(&task(&pool, deprovision).await);
    let provision = task(&pool, provision).await;
    assert!(
        provision.state == "succeeded"
            || provision.last_error.as_deref()
                == Some("cancelled: a deprovision was requested before it started"),
        "{provision:?}"
    );
    assert!(!database_exists(&names::instance_database(PREFIX, &instance)).await);
    assert!(!role_exists(&names::instance_owner_role(PREFIX, &instance)).await);
    assert!(instances::get(&pool, &instance).await.unwrap().is_none());
}
