//! Chaos under load, with the real binaries: 300 provisions and 100 binds on the `shared` plan, then their unbinds
//! and deprovisions, while the two workers are killed with SIGKILL again and again (60 times at least) and the
//! broker's Postgres (also the plan's server) is restarted in the middle of the binds. The client behaves as a
//! platform does: a request that got a 5xx, a 408 or no answer is sent again until it is accepted.
//!
//! Every accepted operation ends `succeeded`, and only once: one task per operation, one database and owner role
//! per instance, one role per binding, every binding's credentials log in, and once everything is deleted nothing
//! is left on the server.

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use berth_tests::{OsbClient, PG_SERVICE, PG_SHARED, TestFolder, bin_dir, free_port, repo_dir};
use broker::embedded::PgServer;
use reqwest::Method;
use secrecy::ExposeSecret;
use serde_json::{Value, json};
use sqlx::{Connection, PgConnection};
use tokio::{
    process::{Child, Command},
    sync::Semaphore,
    task::JoinSet,
};

const INSTANCES: usize = 300;
const BINDINGS: usize = 100;
const KILLS: usize = 60;
const PREFIX: &str = "chaos_";
/// Requests in flight at once, as a busy platform sends them.
const IN_FLIGHT: usize = 32;

/// The two workers, killed and started again by the chaos loop.
struct Workers {
    env: Vec<(&'static str, String)>,
    dir: PathBuf,
    children: Vec<Child>,
    started: usize,
}

impl Workers {
    fn start(env: Vec<(&'static str, String)>, dir: &Path) -> Self {
        let mut workers = Self {
            env,
            dir: dir.to_path_buf(),
            children: Vec::new(),
            started: 0,
        };
        for _ in 0..2 {
            let child = workers.spawn();
            workers.children.push(child);
        }
        workers
    }

    fn spawn(&mut self) -> Child {
        self.started += 1;
        let log =
            std::fs::File::create(self.dir.join(format!("worker-{}.log", self.started))).unwrap();
        Command::new(bin_dir().join("berth-worker"))
            .envs(self.env.iter().map(|(k, v)| (*k, v.as_str())))
            .env("WORKER_ID", format!("chaos-{}", self.started))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("starting berth-worker")
    }

    /// SIGKILL to worker `slot`, and a new one in its place.
    async fn kill_and_replace(&mut self, slot: usize) {
        let _ = self.children[slot].start_kill();
        let _ = self.children[slot].wait().await;
        let child = self.spawn();
        self.children[slot] = child;
    }

    /// Starts again any worker that exited by itself (none should).
    fn revive(&mut self) -> usize {
        let mut revived = 0;
        for slot in 0..self.children.len() {
            if matches!(self.children[slot].try_wait(), Ok(Some(_))) {
                let child = self.spawn();
                self.children[slot] = child;
                revived += 1;
            }
        }
        revived
    }
}

/// Sends the request until the broker accepts it (2xx), as a platform retries a 5xx, a 408 or a dropped
/// connection. Anything else (a 4xx) is a refusal the test did not expect.
async fn until_accepted(
    client: &OsbClient,
    method: Method,
    path: &str,
    body: Option<&Value>,
) -> u16 {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let mut request = client.request(method.clone(), path);
        if let Some(body) = body {
            request = request.json(body);
        }
        match client.send(request).await {
            Ok((status, _)) if (200..300).contains(&status) => return status,
            Ok((status, body)) if status >= 500 || status == 408 => {
                assert!(
                    Instant::now() < deadline,
                    "{method} {path} still {status} {body}"
                );
            }
            Ok((status, body)) => panic!("{method} {path} was refused: {status} {body}"),
            Err(e) => assert!(
                Instant::now() < deadline,
                "{method} {path} still failing: {e:#}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Sends every request of `paths` (at most [`IN_FLIGHT`] at once) until each is accepted.
async fn send_all(client: &OsbClient, method: Method, paths: Vec<String>, body: Option<Value>) {
    let limit = Arc::new(Semaphore::new(IN_FLIGHT));
    let mut sends = JoinSet::new();
    for path in paths {
        let (client, method, body, limit) =
            (client.clone(), method.clone(), body.clone(), limit.clone());
        sends.spawn(async move {
            let _slot = limit.acquire().await.unwrap();
            until_accepted(&client, method, &path, body.as_ref()).await
        });
    }
    while let Some(sent) = sends.join_next().await {
        assert!([200, 201, 202].contains(&sent.unwrap()));
    }
}

/// Connects to `url`, waiting while the server restarts.
async fn connect(url: &str) -> PgConnection {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match PgConnection::connect(url).await {
            Ok(conn) => return conn,
            Err(e) => assert!(Instant::now() < deadline, "cannot connect to {url}: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until `expected` tasks of `operation` exist and none is unfinished; returns (succeeded, failed).
async fn settled(broker_url: &str, operation: &str, expected: i64) -> (i64, i64) {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let mut conn = connect(broker_url).await;
        let counts: Result<(i64, i64, i64), _> = sqlx::query_as(
            "SELECT count(*), count(*) FILTER (WHERE state = 'succeeded'), count(*) FILTER (WHERE state = 'failed')
             FROM tasks WHERE operation = $1",
        )
        .bind(operation)
        .fetch_one(&mut conn)
        .await;
        if let Ok((all, succeeded, failed)) = counts {
            assert!(
                all <= expected,
                "{all} {operation} tasks for {expected} requests: a duplicate"
            );
            if all == expected && succeeded + failed == all {
                if failed > 0 {
                    // Say why, so a failure here reads as more than two numbers.
                    let errors: Vec<(Option<String>, i64)> = sqlx::query_as(
                        "SELECT last_error, count(*) FROM tasks WHERE operation = $1 AND state = 'failed'
                         GROUP BY 1 ORDER BY 2 DESC LIMIT 5",
                    )
                    .bind(operation)
                    .fetch_all(&mut conn)
                    .await
                    .unwrap_or_default();
                    eprintln!("{operation}: {failed} failed tasks; their errors: {errors:#?}");
                }
                return (succeeded, failed);
            }
            assert!(
                Instant::now() < deadline,
                "{operation}: {succeeded} + {failed} of {expected} finished"
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn count(url: &str, sql: &str) -> i64 {
    sqlx::query_scalar(sql)
        .fetch_one(&mut connect(url).await)
        .await
        .unwrap()
}

async fn server_objects(server_url: &str) -> (i64, i64, i64) {
    (
        count(
            server_url,
            "SELECT count(*) FROM pg_database WHERE datname LIKE 'chaos\\_db\\_%'",
        )
        .await,
        count(
            server_url,
            "SELECT count(*) FROM pg_roles WHERE rolname LIKE 'chaos\\_own\\_%'",
        )
        .await,
        count(
            server_url,
            "SELECT count(*) FROM pg_roles WHERE rolname LIKE 'chaos\\_bnd\\_%'",
        )
        .await,
    )
}

#[tokio::test]
async fn kill_9_of_workers_and_a_postgres_restart_under_load_lose_and_duplicate_nothing() {
    let started = Instant::now();
    let tag = uuid::Uuid::new_v4().simple().to_string()[..10].to_string();
    let dir = std::env::temp_dir().join(format!("berth-e2e-chaos-{tag}"));
    std::fs::create_dir_all(&dir).unwrap();
    let _folder = TestFolder(dir.clone());
    let pg = Arc::new(
        PgServer::ensure_started(&dir.join("pg"))
            .await
            .expect("a private Postgres"),
    );
    pg.ensure_database("broker").await.unwrap();
    let broker_url = pg.url("broker").expose_secret().to_string();
    let server_url = pg.url("postgres").expose_secret().to_string();

    let key = dir.join("master.key");
    broker::crypto::generate_key_file(&key).unwrap();
    let port = free_port().unwrap();
    let password = broker::crypto::random_password(24);
    let env: Vec<(&'static str, String)> = vec![
        ("DATABASE_URL", broker_url.clone()),
        ("SHARED_POSTGRES_URL", server_url.clone()),
        ("BERTH_KEY_FILE", key.display().to_string()),
        ("PLANS_DIR", repo_dir().join("plans").display().to_string()),
        ("BROKER_USERNAME", "chaos".into()),
        ("BROKER_PASSWORD", password.clone()),
        ("NAME_PREFIX", PREFIX.into()),
        ("PORT", port.to_string()),
        ("BIND_ADDRESS", "127.0.0.1".into()),
        ("BERTH_DATA_DIR", dir.display().to_string()),
        // A killed worker's tasks come back after 2 s.
        ("WORKER_LEASE_SECS", "2".into()),
        ("WORKER_POLL_MS", "200".into()),
        ("RUST_LOG", "warn".into()),
    ];
    let (mut api, client) = start_api(&env, &dir, port, password).await;

    // The chaos: one worker killed and replaced every 600 ms, alternately (each lives about 1.2 s, starting
    // included), until told to stop (and at least KILLS). At 300 ms a worker lived 0.6 s, less than a debug build's
    // bind takes on a slow machine, so some binds could never finish anywhere and ran out of lost runs.
    let stop = Arc::new(AtomicBool::new(false));
    let killer = tokio::spawn({
        let (stop, env, dir) = (stop.clone(), env.clone(), dir.clone());
        async move {
            let mut workers = Workers::start(env, &dir);
            let mut kills = 0;
            while kills < KILLS || !stop.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(600)).await;
                workers.kill_and_replace(kills % 2).await;
                kills += 1;
            }
            (workers, kills)
        }
    });

    let instances: Vec<String> = (0..INSTANCES).map(|i| format!("chaos-i-{i}")).collect();
    let bindings: Vec<(String, String)> = instances
        .iter()
        .take(BINDINGS)
        .enumerate()
        .map(|(b, i)| (i.clone(), format!("chaos-b-{b}")))
        .collect();
    let provision = json!({"service_id": PG_SERVICE, "plan_id": PG_SHARED, "organization_guid": "o", "space_guid": "s"});
    let bind = json!({"service_id": PG_SERVICE, "plan_id": PG_SHARED, "app_guid": "app"});
    let delete_query =
        format!("service_id={PG_SERVICE}&plan_id={PG_SHARED}&accepts_incomplete=true");

    // 1. Provisions.
    let paths = instances
        .iter()
        .map(|i| format!("/v2/service_instances/{i}?accepts_incomplete=true"))
        .collect();
    send_all(&client, Method::PUT, paths, Some(provision)).await;
    assert_eq!(
        settled(&broker_url, "provision", INSTANCES as i64).await,
        (INSTANCES as i64, 0)
    );

    // 2. Binds, with the broker's Postgres (and the plan's server) restarted while they arrive and run.
    let restart = tokio::spawn({
        let pg = pg.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(400)).await;
            pg.stop().await.expect("stopping Postgres under load");
            tokio::time::sleep(Duration::from_secs(2)).await;
            pg.start().await.expect("starting Postgres again");
        }
    });
    let paths = bindings
        .iter()
        .map(|(i, b)| {
            format!("/v2/service_instances/{i}/service_bindings/{b}?accepts_incomplete=true")
        })
        .collect();
    send_all(&client, Method::PUT, paths, Some(bind)).await;
    restart.await.unwrap();
    assert_eq!(
        settled(&broker_url, "bind", BINDINGS as i64).await,
        (BINDINGS as i64, 0)
    );

    // Everything exists once, and every binding's credentials log in.
    assert_eq!(
        server_objects(&server_url).await,
        (INSTANCES as i64, INSTANCES as i64, BINDINGS as i64)
    );
    assert_every_binding_logs_in(&client, &bindings).await;

    // 3. Unbinds, then deprovisions.
    let paths = bindings
        .iter()
        .map(|(i, b)| format!("/v2/service_instances/{i}/service_bindings/{b}?{delete_query}"))
        .collect();
    send_all(&client, Method::DELETE, paths, None).await;
    assert_eq!(
        settled(&broker_url, "unbind", BINDINGS as i64).await,
        (BINDINGS as i64, 0)
    );
    let paths = instances
        .iter()
        .map(|i| format!("/v2/service_instances/{i}?{delete_query}"))
        .collect();
    send_all(&client, Method::DELETE, paths, None).await;

    stop.store(true, Ordering::SeqCst);
    let (mut workers, kills) = killer.await.unwrap();
    let revived = workers.revive();
    assert_eq!(
        settled(&broker_url, "deprovision", INSTANCES as i64).await,
        (INSTANCES as i64, 0)
    );

    // Nothing left behind, on the server or in the broker; one task per accepted operation.
    let operations = assert_nothing_left_and_one_task_each(&broker_url, &server_url).await;
    let rerun = count(
        &broker_url,
        "SELECT count(*) FROM tasks WHERE operation IS NOT NULL AND attempts > 1",
    )
    .await;
    assert!(kills >= KILLS);
    eprintln!(
        "chaos: {INSTANCES} provisions, {BINDINGS} binds, {BINDINGS} unbinds, {INSTANCES} deprovisions under {kills} \
         kill -9s of workers and 1 Postgres restart: {operations} tasks, all succeeded, none duplicated, \
         {rerun} run again after a kill, {revived} workers exited by themselves, nothing left; {:.1} s",
        started.elapsed().as_secs_f64()
    );

    for child in workers.children.iter_mut().chain(std::iter::once(&mut api)) {
        let _ = child.start_kill();
        let _ = child.wait().await;
    }
    let _ = pg.stop().await;
}

/// Starts `berth-api` with `env` (its log in `dir/api.log`) and waits until it is healthy.
async fn start_api(
    env: &[(&'static str, String)],
    dir: &std::path::Path,
    port: u16,
    password: String,
) -> (Child, OsbClient) {
    let api_log = std::fs::File::create(dir.join("api.log")).unwrap();
    let api = Command::new(bin_dir().join("berth-api"))
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(api_log.try_clone().unwrap())
        .stderr(api_log)
        .kill_on_drop(true)
        .spawn()
        .expect("starting berth-api");
    let client =
        OsbClient::new(format!("http://127.0.0.1:{port}"), "chaos".into(), password).unwrap();
    client.wait_healthy(Duration::from_secs(60)).await.unwrap();
    (api, client)
}

/// Every binding's credentials log in (a pooled connection the restart broke fails its next request with 503,
/// which a platform retries).
async fn assert_every_binding_logs_in(client: &OsbClient, bindings: &[(String, String)]) {
    for (instance, binding) in bindings {
        let path = format!("/v2/service_instances/{instance}/service_bindings/{binding}");
        // A pooled connection the restart broke fails its next request with 503 (the pool does not ping before
        // each checkout), which a platform retries.
        let mut answer = client
            .send(client.request(Method::GET, &path))
            .await
            .unwrap();
        for _ in 0..20 {
            if answer.0 != 503 {
                break;
            }
            answer = client
                .send(client.request(Method::GET, &path))
                .await
                .unwrap();
        }
        let (status, body) = answer;
        assert_eq!(status, 200, "{body}");
        let url = body["credentials"]["DATABASE_URL"]
            .as_str()
            .expect("DATABASE_URL");
        let mut app = PgConnection::connect(url)
            .await
            .unwrap_or_else(|e| panic!("{binding} cannot log in: {e}"));
        let one: i32 = sqlx::query_scalar("SELECT 1")
            .fetch_one(&mut app)
            .await
            .unwrap();
        assert_eq!(one, 1);
    }
}

/// Nothing left behind, on the server or in the broker; one task per accepted operation. Returns the task count.
async fn assert_nothing_left_and_one_task_each(broker_url: &str, server_url: &str) -> i64 {
    assert_eq!(
        server_objects(server_url).await,
        (0, 0, 0),
        "an orphan on the plan's server"
    );
    assert_eq!(
        count(broker_url, "SELECT count(*) FROM service_instances").await,
        0
    );
    assert_eq!(
        count(broker_url, "SELECT count(*) FROM service_bindings").await,
        0
    );
    let operations = count(
        broker_url,
        "SELECT count(*) FROM tasks WHERE operation IS NOT NULL",
    )
    .await;
    assert_eq!(
        operations,
        (2 * INSTANCES + 2 * BINDINGS) as i64,
        "one task per accepted operation"
    );
    operations
}
