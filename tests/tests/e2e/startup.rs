//! Start-up refusals of the real binaries: a bad catalog file stops `berth-api` and `berth-worker` before they
//! serve or claim anything, with a message naming the file and the field.

use std::process::Command;

use berth_tests::{bin_dir, repo_dir};

#[test]
fn a_bad_catalog_file_stops_both_binaries_naming_file_and_field() {
    let dir = std::env::temp_dir().join(format!("berth-startup-{}", &uuid::Uuid::new_v4().simple().to_string()[..10]));
    let plans = dir.join("plans");
    std::fs::create_dir_all(&plans).unwrap();
    // The shipped postgres catalog with one field broken: the first plan's `bindable` is not a boolean.
    let mut postgres: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(repo_dir().join("plans/postgres.json")).unwrap()).unwrap();
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
        assert!(!stderr.contains("nobody@"), "{binary} tried the database first: {stderr}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}
