//! The `berth` command line against a running broker: pipe-friendly provisioning, presets, gen-key.

use std::process::Output;

use berth_tests::{Stack, bin_dir};
use reqwest::Method;
use serde_json::Value;
use sqlx::{Connection, PgConnection};

async fn berth(stack: &Stack, args: &[&str]) -> Output {
    tokio::process::Command::new(bin_dir().join("berth"))
        .args(args)
        .env("BERTH_URL", &stack.base_url)
        .env("BROKER_USERNAME", &stack.username)
        .env("BROKER_PASSWORD", &stack.password)
        .output()
        .await
        .expect("running berth")
}

/// The command exited 0; else its stderr and the broker's logs say why.
fn assert_succeeded(out: &Output, stack: &Stack) {
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        stack.logs()
    );
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn provision_connstr_only_presets_and_deprovision() {
    let stack = Stack::start().await.unwrap();

    // stdout is exactly the connection string; progress goes to stderr.
    let out = berth(
        &stack,
        &[
            "provision",
            "postgres",
            "dedicated",
            "--name",
            "cli-db",
            "--wait",
            "--connstr-only",
        ],
    )
    .await;
    assert_succeeded(&out, &stack);
    let lines: Vec<String> = stdout(&out).lines().map(str::to_string).collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].starts_with("postgres://"), "{lines:?}");
    let mut conn = PgConnection::connect(&lines[0]).await.unwrap();
    sqlx::raw_sql("CREATE TABLE t (x int); INSERT INTO t VALUES (42);")
        .execute(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();

    // Presets from the command line.
    let out = berth(
        &stack,
        &[
            "presets",
            "push-new",
            "answer",
            "--instance",
            "cli-db",
            "--wait",
        ],
    )
    .await;
    assert_succeeded(&out, &stack);
    let out = berth(&stack, &["presets", "list"]).await;
    let listed: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(listed["presets"][0]["name"], "answer");
    assert_eq!(listed["presets"][0]["latest_version"], 1);
    let out = berth(&stack, &["presets", "lock", "answer", "--by", "ci"]).await;
    let key = stdout(&out).trim().to_string();
    assert!(key.starts_with("lk_"), "{key}");
    let out = berth(
        &stack,
        &["presets", "push", "answer", "--instance", "cli-db"],
    )
    .await;
    assert!(
        !out.status.success(),
        "a locked preset refuses a push without the key"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("locked"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = berth(
        &stack,
        &[
            "presets",
            "push",
            "answer",
            "--instance",
            "cli-db",
            "--lock-key",
            &key,
            "--wait",
        ],
    )
    .await;
    assert_succeeded(&out, &stack);

    // A failing provision exits non-zero and prints nothing on stdout.
    let out = berth(
        &stack,
        &[
            "provision",
            "postgres",
            "dedicated",
            "-p",
            "tuning_profile=turbo",
            "--wait",
            "--connstr-only",
        ],
    )
    .await;
    assert!(!out.status.success());
    assert!(stdout(&out).is_empty());

    let out = berth(&stack, &["deprovision", "cli-db", "--wait"]).await;
    assert_succeeded(&out, &stack);
    let (status, _) = stack
        .send(stack.request(Method::GET, "/v2/service_instances/cli-db"))
        .await
        .unwrap();
    assert_eq!(status, 404);

    // gen-key writes a key once and never overwrites it.
    let key_file = stack.dir.join("cli.key");
    let path = key_file.display().to_string();
    let out = berth(&stack, &["gen-key", "--out", &path]).await;
    assert!(out.status.success());
    let first = std::fs::read_to_string(&key_file).unwrap();
    let out = berth(&stack, &["gen-key", "--out", &path]).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("refusing to overwrite"));
    assert_eq!(std::fs::read_to_string(&key_file).unwrap(), first);
    stack.stop().await;
}
