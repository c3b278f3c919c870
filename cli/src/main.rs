//! `berth`: the broker from a terminal. Provision and deprovision through the OSB API (pipe-friendly:
//! `--connstr-only` prints only the connection string on stdout), presets and backups through `/berth/v1`,
//! and `gen-key` for the snapshot key. Progress goes to stderr; a failure exits non-zero.

mod client;

use std::{path::PathBuf, process::ExitCode};

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use client::Client;
use reqwest::Method;
use serde_json::{Map, Value, json};

#[derive(Parser)]
#[command(name = "berth", version, about = "Talk to a berth broker")]
struct Cli {
    /// The broker's URL (default http://127.0.0.1:$PORT, PORT default 8080).
    #[arg(long, env = "BERTH_URL", global = true)]
    url: Option<String>,
    #[arg(long, env = "BROKER_USERNAME", global = true)]
    user: Option<String>,
    #[arg(long, env = "BROKER_PASSWORD", global = true, hide_env_values = true)]
    password: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write a new snapshot key (32 random bytes, base64, mode 0600). Refuses to overwrite a key.
    GenKey {
        #[arg(long, default_value = "snapshot.key")]
        out: PathBuf,
    },
    /// The catalog: services and plans.
    Catalog,
    /// Make an instance of SERVICE on PLAN (names from the catalog).
    Provision(Provision),
    /// Delete an instance (its id, as `provision` printed it).
    Deprovision {
        instance: String,
        #[arg(long)]
        wait: bool,
    },
    /// Named, versioned database snapshots.
    #[command(subcommand)]
    Presets(Presets),
    /// Backups of an instance.
    #[command(subcommand)]
    Backups(Backups),
}

#[derive(Args)]
struct Provision {
    service: String,
    plan: String,
    /// The instance id (default: a new UUID).
    #[arg(long)]
    name: Option<String>,
    /// A parameter, `key=value` (value parsed as JSON when it is JSON); repeatable.
    #[arg(short = 'p', long = "param")]
    params: Vec<String>,
    /// All parameters as one JSON object.
    #[arg(long)]
    params_json: Option<String>,
    /// Wait until the instance is ready.
    #[arg(long)]
    wait: bool,
    /// With --wait: bind it and print only its DATABASE_URL (or uri) on stdout.
    #[arg(long, requires = "wait")]
    connstr_only: bool,
}

#[derive(Subcommand)]
enum Presets {
    /// Presets and their newest versions.
    List {
        #[arg(long)]
        namespace: Option<String>,
    },
    /// Snapshot an instance's database as a new preset (refused if the name exists).
    PushNew {
        name: String,
        #[arg(long)]
        instance: String,
        #[command(flatten)]
        push: PushArgs,
        /// SQL run after each restore into a template (migrations, say).
        #[arg(long)]
        post_restore_sql: Option<PathBuf>,
    },
    /// Snapshot an instance's database as a new version of a preset.
    Push {
        name: String,
        #[arg(long)]
        instance: String,
        #[command(flatten)]
        push: PushArgs,
        /// The key `lock` printed, when the preset is locked.
        #[arg(long, env = "BERTH_LOCK_KEY", hide_env_values = true)]
        lock_key: Option<String>,
    },
    /// A preset's versions (its change log).
    Versions {
        name: String,
        #[arg(long)]
        namespace: Option<String>,
    },
    /// Lock a preset; prints the key that pushes and unlock need.
    Lock {
        name: String,
        #[arg(long)]
        by: String,
        #[arg(long, default_value = "")]
        reason: String,
        #[arg(long)]
        namespace: Option<String>,
    },
    Unlock {
        name: String,
        #[arg(long, env = "BERTH_LOCK_KEY", hide_env_values = true)]
        lock_key: String,
        #[arg(long)]
        namespace: Option<String>,
    },
    GetLock {
        name: String,
        #[arg(long)]
        namespace: Option<String>,
    },
    /// Reset an instance's database to a preset version (default: the newest).
    Select {
        name: String,
        #[arg(long)]
        instance: String,
        #[arg(long)]
        version: Option<i32>,
        #[arg(long, default_value = "")]
        namespace: String,
        #[arg(long)]
        wait: bool,
    },
}

#[derive(Args)]
struct PushArgs {
    #[arg(long, default_value = "")]
    namespace: String,
    #[arg(long)]
    description: Option<String>,
    #[arg(long, env = "USER")]
    author: Option<String>,
    #[arg(long)]
    wait: bool,
}

#[derive(Subcommand)]
enum Backups {
    List {
        instance: String,
    },
    /// Take a backup now.
    Take {
        instance: String,
        #[arg(long)]
        wait: bool,
    },
    /// Reset the instance's database to a backup.
    Restore {
        instance: String,
        backup: String,
        #[arg(long)]
        wait: bool,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("berth: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Command::GenKey { out } = &cli.command {
        broker::crypto::generate_key_file(out)?;
        eprintln!(
            "wrote a new snapshot key to {} (keep it: snapshots sealed with it need it)",
            out.display()
        );
        return Ok(());
    }
    let client = Client::new(cli.url, cli.user, cli.password)?;
    match cli.command {
        Command::GenKey { .. } => unreachable!("handled above"),
        Command::Catalog => print(&client.call(Method::GET, "/v2/catalog", None).await?.1),
        Command::Provision(p) => provision(&client, p).await,
        Command::Deprovision { instance, wait } => deprovision(&client, &instance, wait).await,
        Command::Presets(p) => presets(&client, p).await,
        Command::Backups(b) => backups(&client, b).await,
    }
}

fn print(value: &Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn ns_query(namespace: &Option<String>) -> String {
    match namespace {
        Some(ns) => format!("?namespace={}", url_escape(ns)),
        None => String::new(),
    }
}

fn url_escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `key=value` pairs (and `--params-json`) as one JSON object.
fn parameters(pairs: &[String], json_text: Option<&str>) -> anyhow::Result<Map<String, Value>> {
    let mut params = match json_text {
        Some(text) => match serde_json::from_str(text).context("--params-json is not JSON")? {
            Value::Object(map) => map,
            _ => bail!("--params-json must be a JSON object"),
        },
        None => Map::new(),
    };
    for pair in pairs {
        let (key, value) = pair
            .split_once('=')
            .with_context(|| format!("parameter {pair:?} is not key=value"))?;
        let value =
            serde_json::from_str(value).unwrap_or_else(|_| Value::String(value.to_string()));
        params.insert(key.to_string(), value);
    }
    Ok(params)
}

async fn provision(client: &Client, p: Provision) -> anyhow::Result<()> {
    let (_, catalog) = client.call(Method::GET, "/v2/catalog", None).await?;
    let service = catalog["services"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == p.service.as_str()))
        .with_context(|| format!("the catalog has no service {:?}", p.service))?;
    let plan = service["plans"]
        .as_array()
        .and_then(|ps| ps.iter().find(|x| x["name"] == p.plan.as_str()))
        .with_context(|| format!("service {:?} has no plan {:?}", p.service, p.plan))?;
    let (service_id, plan_id) = (service["id"].clone(), plan["id"].clone());
    let id = p
        .name
        .clone()
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let body = json!({
        "service_id": service_id, "plan_id": plan_id,
        "organization_guid": "berth-cli", "space_guid": "berth-cli",
        "parameters": parameters(&p.params, p.params_json.as_deref())?,
    });
    let path = format!("/v2/service_instances/{id}");
    client
        .call(
            Method::PUT,
            &format!("{path}?accepts_incomplete=true"),
            Some(&body),
        )
        .await?;
    eprintln!("instance {id}: provisioning");
    if !p.wait {
        println!("{id}");
        return Ok(());
    }
    let last = client
        .wait_last_operation(&format!("{path}/last_operation"))
        .await?;
    if last["state"] != "succeeded" {
        bail!(
            "instance {id}: {}",
            last["description"]
                .as_str()
                .unwrap_or("provisioning failed")
        );
    }
    eprintln!("instance {id}: ready");
    if !p.connstr_only {
        println!("{id}");
        return Ok(());
    }
    let binding = format!("{path}/service_bindings/cli-{}", uuid::Uuid::new_v4());
    let bind = json!({ "service_id": service_id, "plan_id": plan_id });
    client
        .call(
            Method::PUT,
            &format!("{binding}?accepts_incomplete=true"),
            Some(&bind),
        )
        .await?;
    let last = client
        .wait_last_operation(&format!("{binding}/last_operation"))
        .await?;
    if last["state"] != "succeeded" {
        bail!(
            "binding: {}",
            last["description"].as_str().unwrap_or("binding failed")
        );
    }
    let (_, bound) = client.call(Method::GET, &binding, None).await?;
    let credentials = &bound["credentials"];
    let connstr = credentials["DATABASE_URL"]
        .as_str()
        .or_else(|| credentials["uri"].as_str())
        .context("the binding has no DATABASE_URL or uri")?;
    println!("{connstr}");
    Ok(())
}

async fn deprovision(client: &Client, instance: &str, wait: bool) -> anyhow::Result<()> {
    let path = format!("/v2/service_instances/{instance}");
    let (_, fetched) = client.call(Method::GET, &path, None).await?;
    let (service_id, plan_id) = (
        fetched["service_id"]
            .as_str()
            .context("the instance has no service_id")?,
        fetched["plan_id"]
            .as_str()
            .context("the instance has no plan_id")?,
    );
    // The instance's bindings go with it (their roles and keys are removed by the deprovision).
    let query = format!("service_id={service_id}&plan_id={plan_id}&accepts_incomplete=true");
    client
        .call(Method::DELETE, &format!("{path}?{query}"), None)
        .await?;
    eprintln!("instance {instance}: deprovisioning");
    if wait {
        let last = client
            .wait_last_operation(&format!("{path}/last_operation"))
            .await?;
        if last["state"] != "succeeded" {
            bail!(
                "instance {instance}: {}",
                last["description"].as_str().unwrap_or("deprovision failed")
            );
        }
        eprintln!("instance {instance}: gone");
    }
    Ok(())
}

/// Prints the answer of a 202, waiting for its task first when asked.
async fn finish(client: &Client, answer: Value, wait: bool) -> anyhow::Result<()> {
    if wait {
        let operation = answer["operation"]
            .as_str()
            .context("the broker gave no operation")?;
        let task = client.wait_task(operation).await?;
        if task["state"] != "succeeded" {
            bail!(
                "{}",
                task["error"].as_str().unwrap_or("the operation failed")
            );
        }
    }
    print(&answer)
}

/// `/berth/v1/presets/{name}/{what}` in `namespace`.
fn preset_path(name: &str, what: &str, namespace: &Option<String>) -> String {
    format!(
        "/berth/v1/presets/{}/{what}{}",
        url_escape(name),
        ns_query(namespace)
    )
}

async fn presets(client: &Client, command: Presets) -> anyhow::Result<()> {
    match command {
        Presets::List { namespace } => print(
            &client
                .call(
                    Method::GET,
                    &format!("/berth/v1/presets{}", ns_query(&namespace)),
                    None,
                )
                .await?
                .1,
        ),
        Presets::PushNew {
            name,
            instance,
            push,
            post_restore_sql,
        } => {
            let sql = post_restore_sql
                .map(|p| {
                    std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))
                })
                .transpose()?;
            let body = json!({
                "name": name, "namespace": push.namespace, "instance_id": instance,
                "description": push.description, "author": push.author, "post_restore_sql": sql,
            });
            let (_, answer) = client
                .call(Method::POST, "/berth/v1/presets", Some(&body))
                .await?;
            finish(client, answer, push.wait).await
        }
        Presets::Push {
            name,
            instance,
            push,
            lock_key,
        } => {
            let body = json!({
                "instance_id": instance, "description": push.description, "author": push.author, "lock_key": lock_key,
            });
            let path = preset_path(&name, "versions", &Some(push.namespace));
            let (_, answer) = client.call(Method::POST, &path, Some(&body)).await?;
            finish(client, answer, push.wait).await
        }
        Presets::Versions { name, namespace } => {
            let path = preset_path(&name, "versions", &namespace);
            print(&client.call(Method::GET, &path, None).await?.1)
        }
        Presets::Lock {
            name,
            by,
            reason,
            namespace,
        } => {
            let path = preset_path(&name, "lock", &namespace);
            let (_, answer) = client
                .call(
                    Method::POST,
                    &path,
                    Some(&json!({"by": by, "reason": reason})),
                )
                .await?;
            eprintln!("locked; pushes and unlock need this key:");
            println!("{}", answer["lock_key"].as_str().unwrap_or_default());
            Ok(())
        }
        Presets::Unlock {
            name,
            lock_key,
            namespace,
        } => {
            let path = preset_path(&name, "lock", &namespace);
            print(
                &client
                    .call(Method::DELETE, &path, Some(&json!({"lock_key": lock_key})))
                    .await?
                    .1,
            )
        }
        Presets::GetLock { name, namespace } => {
            let path = preset_path(&name, "lock", &namespace);
            print(&client.call(Method::GET, &path, None).await?.1)
        }
        Presets::Select {
            name,
            instance,
            version,
            namespace,
            wait,
        } => {
            let body = json!({"preset": name, "namespace": namespace, "version": version});
            let path = format!("/berth/v1/instances/{instance}/select");
            let (_, answer) = client.call(Method::POST, &path, Some(&body)).await?;
            finish(client, answer, wait).await
        }
    }
}

async fn backups(client: &Client, command: Backups) -> anyhow::Result<()> {
    match command {
        Backups::List { instance } => print(
            &client
                .call(
                    Method::GET,
                    &format!("/berth/v1/instances/{instance}/backups"),
                    None,
                )
                .await?
                .1,
        ),
        Backups::Take { instance, wait } => {
            let (_, answer) = client
                .call(
                    Method::POST,
                    &format!("/berth/v1/instances/{instance}/backups"),
                    Some(&json!({})),
                )
                .await?;
            finish(client, answer, wait).await
        }
        Backups::Restore {
            instance,
            backup,
            wait,
        } => {
            let path = format!("/berth/v1/instances/{instance}/backups/{backup}/restore");
            let (_, answer) = client.call(Method::POST, &path, Some(&json!({}))).await?;
            finish(client, answer, wait).await
        }
    }
}
