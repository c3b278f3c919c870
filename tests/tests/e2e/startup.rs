//! Start-up refusals of the real binaries: a bad catalog file stops `berth-api` and `berth-worker` before they
//! serve or claim anything, with a message naming the file and the field; a sealing key other than the one the
//! broker's database was sealed with stops them too, naming the key file.

use std::{process::Command, time::Duration};

use berth_tests::{Stack, bin_dir, free_port, repo_dir, run_to_end};
use sqlx::Connection;

#[test]
fn a_bad_catalog_file_stops_both_binaries_naming_file_and_field() {
    let dir = std::env::temp_dir().join(format!(
        "berth-startup-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    ));
    let plans = dir.join("plans");
    std::fs::create_dir_all(&plans).unwrap();
    // The shipped postgres catalog with one field broken: the first plan's `bindable` is not a boolean.
    let mut postgres: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo_dir().join("plans/postgres.json")).unwrap(),
    )
    .unwrap();
    postgres["plans"][0]["bindable"] = serde_json::json!("sometimes");
    std::fs::write(plans.join("postgres.json"), postgres.to_string()).unwrap();
    let key = dir.join("master.key");
    broker::crypto::generate_key_file(&key).unwrap();

    for binary in ["berth-api", "berth-worker"] {
        let out = Command::new(bin_dir().join(binary))
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            // Never reached: the catalog is checked before the database is opened.
            .env("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none")
            .env("BERTH_KEY_FILE", &key)
            .env("PLANS_DIR", &plans)
            .env("BROKER_USERNAME", "u")
            .env("BROKER_PASSWORD", "p")
            .env("PORT", "0")
            .current_dir(&dir)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{binary} started with a bad catalog");
        assert!(
            stderr.contains("postgres.json") && stderr.contains("plans[0].bindable"),
            "{binary} said: {stderr}"
        );
        assert!(
            !stderr.contains("nobody@"),
            "{binary} tried the database first: {stderr}"
        );
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// Waits until an API on `port` answers /health, failing after `limit`.
async fn wait_health(port: u16, limit: Duration) {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if reqwest::get(format!("http://127.0.0.1:{port}/health"))
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no healthy API on {port} after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_process_with_another_sealing_key_refuses_to_start_naming_the_key_file() {
    // Key A: the stack's API and worker recorded its check value on first start.
    let stack = Stack::start().await.unwrap();
    let other_key = stack.dir.join("other.key");
    broker::crypto::generate_key_file(&other_key).unwrap();
    let (recorded,): (Vec<u8>,) =
        sqlx::query_as("SELECT check_value FROM sealing_key_checks WHERE name = 'master'")
            .fetch_one(
                &mut sqlx::PgConnection::connect(&stack.broker_db_url)
                    .await
                    .unwrap(),
            )
            .await
            .unwrap();
    let key_a = broker::crypto::read_key_file(&stack.dir.join("master.key")).unwrap();
    assert_eq!(
        recorded,
        broker::crypto::key_check_value(&key_a),
        "the check value, not the key"
    );
    assert!(
        !recorded
            .windows(8)
            .any(|w| key_a.windows(8).any(|k| k == w))
    );

    // Key B: both binaries exit non-zero, naming the key file and the setting.
    for binary in ["berth-api", "berth-worker"] {
        let cmd = stack.command(
            binary,
            &[
                ("BERTH_KEY_FILE", other_key.display().to_string()),
                ("PORT", free_port().unwrap().to_string()),
            ],
        );
        let (ok, said) = run_to_end(cmd, Duration::from_secs(30)).await;
        assert!(!ok, "{binary} started with another key: {said}");
        assert!(
            said.contains(&other_key.display().to_string()) && said.contains("BERTH_KEY_FILE"),
            "{binary} said: {said}"
        );
    }

    // The snapshot key is checked the same way: a worker with one records it; one with another, or with
    // none while the others have one, refuses.
    let snapshot_key = stack.dir.join("snapshot-a.key");
    broker::crypto::generate_key_file(&snapshot_key).unwrap();
    let mut first = tokio::process::Command::from(stack.command(
        "berth-worker",
        &[("SNAPSHOT_KEY_FILE", snapshot_key.display().to_string())],
    ))
    .kill_on_drop(true)
    .spawn()
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut db = sqlx::PgConnection::connect(&stack.broker_db_url)
        .await
        .unwrap();
    while sqlx::query("SELECT 1 FROM sealing_key_checks WHERE name = 'snapshot'")
        .fetch_optional(&mut db)
        .await
        .unwrap()
        .is_none()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no snapshot key check value recorded"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    first.kill().await.unwrap();
    let missing = stack.dir.join("no-such-snapshot.key");
    let (ok, said) = run_to_end(
        stack.command(
            "berth-worker",
            &[("SNAPSHOT_KEY_FILE", missing.display().to_string())],
        ),
        Duration::from_secs(30),
    )
    .await;
    assert!(
        !ok && said.contains(&missing.display().to_string()) && said.contains("SNAPSHOT_KEY_FILE"),
        "{said}"
    );
    let (ok, said) = run_to_end(
        stack.command(
            "berth-worker",
            &[("SNAPSHOT_KEY_FILE", other_key.display().to_string())],
        ),
        Duration::from_secs(30),
    )
    .await;
    assert!(!ok, "a worker started with another snapshot key: {said}");
    assert!(
        said.contains(&other_key.display().to_string()) && said.contains("SNAPSHOT_KEY_FILE"),
        "{said}"
    );

    // Key A again: another API starts and serves.
    let port = free_port().unwrap();
    let mut again =
        tokio::process::Command::from(stack.command("berth-api", &[("PORT", port.to_string())]))
            .kill_on_drop(true)
            .spawn()
            .unwrap();
    wait_health(port, Duration::from_secs(30)).await;
    again.kill().await.unwrap();
    stack.stop().await;
}

#[tokio::test]
async fn two_processes_with_different_keys_starting_at_once_on_a_fresh_database_agree_on_one() {
    let stack = Stack::start().await.unwrap();
    // A fresh database of its own, for two workers with different keys started together.
    let db = format!(
        "e2e_race_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let mut admin = stack.admin().await.unwrap();
    sqlx::query(&format!("CREATE DATABASE {db}"))
        .execute(&mut admin)
        .await
        .unwrap();
    let url = berth_tests::with_database(&stack.broker_db_url, &db);
    let keys: Vec<_> = ["a.key", "b.key"]
        .iter()
        .map(|n| stack.dir.join(n))
        .collect();
    let mut workers = Vec::new();
    for key in &keys {
        broker::crypto::generate_key_file(key).unwrap();
        let mut cmd = stack.command(
            "berth-worker",
            &[
                ("DATABASE_URL", url.clone()),
                ("BERTH_KEY_FILE", key.display().to_string()),
            ],
        );
        cmd.stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        workers.push(
            tokio::process::Command::from(cmd)
                .kill_on_drop(true)
                .spawn()
                .unwrap(),
        );
    }
    // One of them exits with the refusal; the other keeps running.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let loser = loop {
        if let Some(i) = (0..2).find(|&i| workers[i].try_wait().unwrap().is_some()) {
            break i;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "neither worker refused to start"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let winner = 1 - loser;
    assert!(
        workers[winner].try_wait().unwrap().is_none(),
        "both workers exited"
    );
    let loser_out = workers.remove(loser).wait_with_output().await.unwrap();
    assert!(!loser_out.status.success());
    let said = String::from_utf8_lossy(&loser_out.stderr);
    assert!(said.contains(&keys[loser].display().to_string()), "{said}");
    let mut winner = workers.pop().unwrap();
    winner.kill().await.unwrap();
    sqlx::query(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .execute(&mut admin)
        .await
        .unwrap();
    stack.stop().await;
}

#[tokio::test]
async fn a_key_file_readable_by_others_is_warned_about_naming_the_file_and_the_fix() {
    use std::os::unix::fs::PermissionsExt;
    let stack = Stack::start().await.unwrap();
    let key = stack.dir.join("master.key");
    // The stack's own processes got the 0600 key: no warning.
    assert!(
        !stack.log("api.log").contains("chmod 600"),
        "{}",
        stack.log("api.log")
    );
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let port = free_port().unwrap();
    let mut cmd = stack.command("berth-api", &[("PORT", port.to_string())]);
    let log = stack.dir.join("api-0644.log");
    cmd.stderr(std::fs::File::create(&log).unwrap())
        .stdout(std::process::Stdio::null());
    let mut api = tokio::process::Command::from(cmd)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // A warning, not a refusal: it serves.
    wait_health(port, Duration::from_secs(30)).await;
    api.kill().await.unwrap();
    let said = std::fs::read_to_string(&log).unwrap();
    assert!(
        said.contains(&format!("{} has mode 0644", key.display()))
            && said.contains(&format!("chmod 600 {}", key.display())),
        "{said}"
    );
    stack.stop().await;
}

#[tokio::test]
async fn a_database_sealed_before_key_checks_existed_accepts_only_the_key_that_opens_its_secrets() {
    let stack = Stack::start().await.unwrap();
    let key_a = stack.dir.join("master.key");
    let other_key = stack.dir.join("other.key");
    broker::crypto::generate_key_file(&other_key).unwrap();
    // The stack's worker past its own check first, so that nothing records a value behind the test's back.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !stack.log("worker.log").contains("worker started") {
        assert!(std::time::Instant::now() < deadline, "{}", stack.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A secret sealed with key A, and no check value: a database from before the check.
    let mut db = sqlx::PgConnection::connect(&stack.broker_db_url)
        .await
        .unwrap();
    let sealed = broker::crypto::Cipher::from_key_file(&key_a)
        .unwrap()
        .seal(b"webhook secret");
    sqlx::query("INSERT INTO webhook_deliveries (id, task_id, url, secret, body) VALUES ($1, $1, 'http://x', $2, '{}')")
        .bind(uuid::Uuid::new_v4())
        .bind(sealed)
        .execute(&mut db)
        .await
        .unwrap();
    sqlx::query("DELETE FROM sealing_key_checks")
        .execute(&mut db)
        .await
        .unwrap();
    sqlx::query("DELETE FROM sealing_keys")
        .execute(&mut db)
        .await
        .unwrap();

    // Key B cannot open it: refused, and nothing recorded.
    let cmd = stack.command(
        "berth-api",
        &[
            ("BERTH_KEY_FILE", other_key.display().to_string()),
            ("PORT", free_port().unwrap().to_string()),
        ],
    );
    let (ok, said) = run_to_end(cmd, Duration::from_secs(30)).await;
    assert!(
        !ok && said.contains(&other_key.display().to_string()),
        "{said}"
    );
    let recorded: Option<Vec<u8>> =
        sqlx::query_scalar("SELECT check_value FROM sealing_key_checks WHERE name = 'master'")
            .fetch_optional(&mut db)
            .await
            .unwrap();
    assert_eq!(recorded, None);

    // Key A opens it: it starts and records its check value.
    let port = free_port().unwrap();
    let mut api =
        tokio::process::Command::from(stack.command("berth-api", &[("PORT", port.to_string())]))
            .kill_on_drop(true)
            .spawn()
            .unwrap();
    wait_health(port, Duration::from_secs(30)).await;
    api.kill().await.unwrap();
    let recorded: Vec<u8> =
        sqlx::query_scalar("SELECT check_value FROM sealing_key_checks WHERE name = 'master'")
            .fetch_one(&mut db)
            .await
            .unwrap();
    assert_eq!(
        recorded,
        broker::crypto::key_check_value(&broker::crypto::read_key_file(&key_a).unwrap())
    );
    stack.stop().await;
}
