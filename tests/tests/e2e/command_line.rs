//! The server binaries' command lines: `--help` lists every setting with its environment name and default,
//! `--version` prints the version, an unknown flag is refused with exit status 2, and a setting's sources win
//! in the documented order (flag > environment > config file), the example config file included.

use std::{
    path::Path,
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use berth_tests::{TestFolder, bin_dir, free_port, repo_dir, with_database};
use broker::config::table;
use sqlx::Connection;

const BINARIES: [&str; 2] = ["berth-api", "berth-worker"];

/// Runs `binary` with `args` and only `env` (and PATH) in its environment.
fn run(binary: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(bin_dir().join(binary))
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn help_lists_every_setting_with_its_environment_name_and_default() {
    for binary in BINARIES {
        let out = run(binary, &["--help"], &[]);
        let help = text(&out.stdout);
        assert!(
            out.status.success(),
            "{binary} --help: {}",
            text(&out.stderr)
        );
        // `-h` is the short form, one line per setting (secrets have no flag: they are listed below the
        // options, name first).
        let short = text(&run(binary, &["-h"], &[]).stdout);
        assert!(short.len() < help.len());
        for setting in table::all() {
            let default = format!("[default: {}]", setting.default.text());
            let env = format!("[env: {}]", setting.name);
            for (form, text) in [("--help", &help), ("-h", &short)] {
                let listed = text.lines().any(|line| {
                    line.contains(&default)
                        && if setting.secret {
                            line.trim_start().starts_with(setting.name)
                                || form == "--help"
                                    && help.contains(&format!("  {} ", setting.name))
                        } else {
                            line.contains(&env)
                        }
                });
                assert!(
                    listed,
                    "{binary} {form} lacks {} with {default}:\n{text}",
                    setting.name
                );
            }
        }
        assert!(help.contains("--port <PORT>") && help.contains("--data-dir <BERTH_DATA_DIR>"));
        assert!(
            help.contains("--config <FILE>") && help.contains("Precedence: flag > environment")
        );
        assert!(!help.contains("--broker-password"), "a secret has no flag");
    }
    let api = text(&run("berth-api", &["--help"], &[]).stdout);
    assert!(api.contains("serve") && api.contains("gen-key"), "{api}");
    let worker = text(&run("berth-worker", &["--help"], &[]).stdout);
    assert!(worker.contains("  run "), "{worker}");
}

#[test]
fn version_prints_the_package_version() {
    for binary in BINARIES {
        let out = run(binary, &["--version"], &[]);
        assert!(out.status.success());
        let version = text(&out.stdout);
        assert!(
            version.starts_with(&format!("{binary} {}", env!("CARGO_PKG_VERSION"))),
            "{binary} --version: {version}"
        );
    }
}

#[test]
fn an_unknown_flag_or_a_secret_as_a_flag_exits_2_naming_it() {
    for binary in BINARIES {
        for args in [
            &["--no-such-flag"][..],
            &["--database-url", "postgres://u:p@h/db"],
            &["--port"],
        ] {
            let out = run(binary, args, &[]);
            let stderr = text(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{binary} {args:?}: {stderr}");
            assert!(stderr.contains(args[0]), "{binary} {args:?} said: {stderr}");
            assert!(
                !stderr.contains("u:p@h"),
                "the value of a refused flag is not echoed"
            );
        }
    }
    let out = run("berth-api", &["serve", "--no-such-flag"], &[]);
    assert_eq!(out.status.code(), Some(2));
    let out = run("berth-api", &["gen-key"], &[]);
    assert_eq!(out.status.code(), Some(2), "gen-key needs its PATH");
}

#[test]
fn gen_key_writes_a_key_once() {
    let dir = TestFolder(std::env::temp_dir().join(format!("berth-genkey-{}", tag())));
    std::fs::create_dir_all(&dir.0).unwrap();
    let key = dir.0.join("master.key");
    let key_arg = key.display().to_string();
    let out = run("berth-api", &["gen-key", &key_arg], &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains(&format!("BERTH_KEY_FILE={key_arg}")));
    let written = std::fs::read(&key).unwrap();
    assert!(broker::crypto::read_key_file(&key).is_ok());
    let again = run("berth-api", &["gen-key", &key_arg], &[]);
    assert!(!again.status.success(), "gen-key overwrote a key");
    assert_eq!(std::fs::read(&key).unwrap(), written);
}

#[test]
fn a_config_file_key_that_is_no_setting_stops_both_binaries_naming_it() {
    let dir = TestFolder(std::env::temp_dir().join(format!("berth-config-{}", tag())));
    std::fs::create_dir_all(&dir.0).unwrap();
    let file = dir.0.join("berth.toml");
    std::fs::write(&file, "port = 8080\nworker_concurency = 4\n").unwrap();
    let file_arg = file.display().to_string();
    for binary in BINARIES {
        for out in [
            run(binary, &[], &[("BERTH_CONFIG", &file_arg)]),
            run(binary, &["--config", &file_arg], &[]),
        ] {
            let stderr = text(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{binary}: {stderr}");
            assert!(
                stderr.contains("unknown setting `worker_concurency`")
                    && stderr.contains("did you mean `worker_concurrency`")
                    && stderr.contains(&file_arg),
                "{binary} said: {stderr}"
            );
        }
    }
}

#[test]
fn both_binaries_read_the_example_config_file() {
    // The example's key file (/etc/berth/master.key) is what the binaries open first, so its name in the
    // error shows the file was read; the flag then wins over the file.
    let example = repo_dir().join("deploy/berth.example.toml");
    let example = example.display().to_string();
    let env = [
        ("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none"),
        ("BROKER_USERNAME", "u"),
        ("BROKER_PASSWORD", "p"),
    ];
    let mut with_config = env.to_vec();
    with_config.push(("BERTH_CONFIG", &example));
    for binary in BINARIES {
        for out in [
            run(binary, &["--config", &example], &env),
            run(binary, &[], &with_config),
        ] {
            let stderr = text(&out.stderr);
            assert!(!out.status.success());
            assert!(
                stderr.contains("/etc/berth/master.key"),
                "{binary} said: {stderr}"
            );
        }
        let out = run(
            binary,
            &["--config", &example, "--key-file", "/nonexistent/k.key"],
            &env,
        );
        let stderr = text(&out.stderr);
        assert!(
            stderr.contains("/nonexistent/k.key") && !stderr.contains("/etc/berth/master.key"),
            "{binary} said: {stderr}"
        );
    }
}

#[test]
fn a_berth_variable_that_is_no_setting_is_warned_about() {
    let env = [
        ("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none"),
        ("BERTH_KEY_FILE", "/nonexistent/master.key"),
        ("BERTH_DATA_DRI", "/srv/berth"),
    ];
    let out = run("berth-worker", &[], &env);
    let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(
        said.contains(
            "BERTH_DATA_DRI is set but is no berth setting (did you mean BERTH_DATA_DIR?)"
        ),
        "{said}"
    );
}

#[test]
fn a_worker_flag_wins_over_the_environment() {
    let env = [
        ("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none"),
        ("WORKER_CONCURRENCY", "4"),
    ];
    let out = run("berth-worker", &["--worker-concurrency", "0"], &env);
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("WORKER_CONCURRENCY must be at least 1"),
        "{stderr}"
    );
    let out = run("berth-worker", &["run", "--worker-concurrency", "0"], &env);
    assert!(text(&out.stderr).contains("WORKER_CONCURRENCY must be at least 1"));
}

fn tag() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..10].to_string()
}

/// Whether an API answers /health on `port` within `limit`.
async fn answers(port: u16, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if reqwest::get(format!("http://127.0.0.1:{port}/health"))
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// A fresh broker database (its name and the environment naming it), a key and a config file setting
/// `port = file_port`, in `dir`.
async fn api_environment(dir: &Path, file_port: u16) -> (String, Vec<(&'static str, String)>) {
    let server = std::env::var("DATABASE_URL").expect("DATABASE_URL names the test Postgres");
    let db = format!("e2e_flags_{}", tag());
    let mut admin = sqlx::PgConnection::connect(&with_database(&server, "postgres"))
        .await
        .unwrap();
    sqlx::query(&format!("CREATE DATABASE {db}"))
        .execute(&mut admin)
        .await
        .unwrap();
    let key = dir.join("master.key");
    broker::crypto::generate_key_file(&key).unwrap();
    let config = dir.join("berth.toml");
    std::fs::write(
        &config,
        format!("port = {file_port}\nbind_address = \"127.0.0.1\"\n"),
    )
    .unwrap();
    let env = vec![
        ("DATABASE_URL", with_database(&server, &db)),
        ("BERTH_KEY_FILE", key.display().to_string()),
        ("PLANS_DIR", repo_dir().join("plans").display().to_string()),
        ("BROKER_USERNAME", "e2e".into()),
        ("BROKER_PASSWORD", "e2e-password".into()),
        ("BERTH_DATA_DIR", dir.display().to_string()),
        ("BERTH_CONFIG", config.display().to_string()),
    ];
    (db, env)
}

#[tokio::test]
async fn the_port_comes_from_the_flag_then_the_environment_then_the_config_file() {
    let dir = TestFolder(std::env::temp_dir().join(format!("berth-flags-{}", tag())));
    std::fs::create_dir_all(&dir.0).unwrap();
    let [file_port, env_port, flag_port] = [(); 3].map(|_| free_port().unwrap());
    let (db, base) = api_environment(&dir.0, file_port).await;
    let flag = flag_port.to_string();
    let cases: [(&[&str], bool, u16); 3] = [
        (&["--port", &flag], true, flag_port),
        (&[], true, env_port),
        (&[], false, file_port),
    ];
    for (args, with_env, expected) in cases {
        let mut cmd = tokio::process::Command::new(bin_dir().join("berth-api"));
        cmd.args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(base.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        if with_env {
            cmd.env("PORT", env_port.to_string());
        }
        let mut api = cmd.spawn().unwrap();
        assert!(
            answers(expected, Duration::from_secs(30)).await,
            "berth-api {args:?} (PORT in the environment: {with_env}) does not answer on {expected}"
        );
        for other in [file_port, env_port, flag_port]
            .into_iter()
            .filter(|p| *p != expected)
        {
            assert!(
                std::net::TcpStream::connect(("127.0.0.1", other)).is_err(),
                "berth-api {args:?} listens on {other} as well"
            );
        }
        api.start_kill().unwrap();
        api.wait().await.unwrap();
    }
    let server = std::env::var("DATABASE_URL").unwrap();
    let mut admin = sqlx::PgConnection::connect(&with_database(&server, "postgres"))
        .await
        .unwrap();
    sqlx::query(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .execute(&mut admin)
        .await
        .unwrap();
}

#[tokio::test]
async fn the_embedded_default_keeps_settings_of_the_config_file_and_hands_its_flags_to_its_worker()
{
    let dir = TestFolder(std::env::temp_dir().join(format!("berth-embedded-flags-{}", tag())));
    std::fs::create_dir_all(&dir.0).unwrap();
    // The embedded default turns the local engine on unless the operator said otherwise: here, in a file.
    let config = dir.0.join("berth.toml");
    std::fs::write(&config, "local_engine = false\n").unwrap();
    let port = free_port().unwrap();
    let worker_id = format!("embedded-{}", tag());
    let config_arg = config.display().to_string();
    let port_arg = port.to_string();
    let mut api = tokio::process::Command::new(bin_dir().join("berth-api"))
        .args([
            "--config",
            &config_arg,
            "--port",
            &port_arg,
            "--worker-id",
            &worker_id,
        ])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("BERTH_DATA_DIR", dir.0.join(".berth"))
        .env("PLANS_DIR", repo_dir().join("plans"))
        .current_dir(&dir.0)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.0.join("api.log")).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let log = || std::fs::read_to_string(dir.0.join("api.log")).unwrap_or_default();
    assert!(
        answers(port, Duration::from_secs(120)).await,
        "no API on {port}: {}",
        log()
    );

    let stored: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.0.join(".berth/broker-credentials.json")).unwrap(),
    )
    .unwrap();
    let client = berth_tests::OsbClient::new(
        format!("http://127.0.0.1:{port}"),
        stored["username"].as_str().unwrap().to_string(),
        stored["password"].as_str().unwrap().to_string(),
    )
    .unwrap();
    let catalog = client.catalog().await.unwrap();
    let plans: Vec<&str> = berth_tests::find_service(&catalog, "postgres").unwrap()["plans"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|plan| plan["name"].as_str())
        .collect();
    assert!(
        plans.contains(&"shared") && !plans.contains(&"dedicated"),
        "plans: {plans:?}"
    );

    // The worker it started read the same config file and the API's flags.
    let worker = berth_tests::processes_under(&dir.0)
        .into_iter()
        .find(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|stat| stat.contains("(berth-worker)"))
        })
        .expect("the embedded worker runs");
    let environ = std::fs::read(format!("/proc/{worker}/environ")).unwrap();
    let environ: Vec<String> = environ
        .split(|b| *b == 0)
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .collect();
    for wanted in [
        format!("WORKER_ID={worker_id}"),
        format!("BERTH_CONFIG={config_arg}"),
        "LOCAL_ENGINE=off".to_string(),
    ] {
        assert!(
            environ.contains(&wanted),
            "the worker's environment lacks {wanted}"
        );
    }

    let pid = api.id().unwrap().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = tokio::time::timeout(Duration::from_secs(60), api.wait())
        .await
        .expect("berth-api stops on SIGTERM")
        .unwrap();
    assert!(
        status.success(),
        "berth-api exited with {status}: {}",
        log()
    );
}
