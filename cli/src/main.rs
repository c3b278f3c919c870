//! `berth`: the broker from a terminal. Instances and bindings through the OSB API (pipe-friendly:
//! `--connstr-only` prints only the connection string on stdout), listing, HA switchover and failover, presets
//! and backups through `/berth/v1`, and `gen-key` for the snapshot key. Progress goes to stderr, data to stdout
//! (`--json` for scripts); a failure exits 1 with the broker's description, a `--timeout` that runs out exits 124.

mod client;
mod commands;
mod output;
mod progress;

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Args, Parser, Subcommand};
use client::{Client, TimedOut};

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
    /// Print data as JSON (for scripts) instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

/// How long `--wait` waits when no `--timeout` is given.
const DEFAULT_WAIT: Duration = Duration::from_secs(3600);

/// `--wait` and `--timeout`, on every command that starts an operation.
#[derive(Args, Clone, Copy, Debug)]
pub struct Wait {
    /// Wait until the operation has finished.
    #[arg(long)]
    wait: bool,
    /// Give up waiting after this long (`90s`, `10m`, `1h`, or seconds) and exit 124; implies --wait
    /// (default: an hour).
    #[arg(long, value_parser = parse_duration)]
    timeout: Option<Duration>,
}

impl Wait {
    pub fn waiting(&self) -> bool {
        self.wait || self.timeout.is_some()
    }

    pub fn limit(&self) -> Duration {
        self.timeout.unwrap_or(DEFAULT_WAIT)
    }
}

/// `90s`, `10m`, `2h`, `1h30m` or a number of seconds.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let wrong =
        || format!("{text:?} is not a duration: write 90s, 10m, 1h30m or a number of seconds");
    if let Ok(seconds) = text.parse::<u64>() {
        return Ok(Duration::from_secs(seconds));
    }
    let (mut total, mut number) = (0u64, String::new());
    for c in text.chars() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let unit = match c {
            'h' => 3600,
            'm' => 60,
            's' => 1,
            _ => return Err(wrong()),
        };
        let n: u64 = number.parse().map_err(|_| wrong())?;
        total = total
            .checked_add(n.checked_mul(unit).ok_or_else(wrong)?)
            .ok_or_else(wrong)?;
        number.clear();
    }
    if !number.is_empty() || text.is_empty() {
        return Err(wrong());
    }
    Ok(Duration::from_secs(total))
}

/// Parameters of a provision, bind or update.
#[derive(Args, Debug)]
pub struct Params {
    /// A parameter, `key=value` (value parsed as JSON when it is JSON); repeatable.
    #[arg(short = 'p', long = "param")]
    pub params: Vec<String>,
    /// All parameters as one JSON object.
    #[arg(long)]
    pub params_json: Option<String>,
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
        #[command(flatten)]
        wait: Wait,
    },
    /// Every instance with its plan and latest operation.
    List {
        /// Instances per request to the broker (all pages are printed).
        #[arg(long, default_value_t = 100)]
        page_size: u32,
    },
    /// An instance: plan, parameters, latest operation.
    Status { instance: String },
    /// Change an instance's plan or parameters.
    Update {
        instance: String,
        /// The new plan's name (default: the current plan).
        #[arg(long)]
        plan: Option<String>,
        #[command(flatten)]
        params: Params,
        #[command(flatten)]
        wait: Wait,
    },
    /// Bind an instance and print the binding's credentials (waits for them).
    Bind {
        instance: String,
        /// The binding id (default: a new UUID).
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        params: Params,
        /// Give up waiting after this long and exit 124 (default: an hour).
        #[arg(long, value_parser = parse_duration)]
        timeout: Option<Duration>,
    },
    /// Delete a binding (its credentials stop working).
    Unbind {
        instance: String,
        binding: String,
        #[command(flatten)]
        wait: Wait,
    },
    /// New credentials for every binding of an instance.
    RotateCredentials {
        instance: String,
        #[command(flatten)]
        wait: Wait,
    },
    /// HA clusters: the primary hands over to a healthy replica (planned).
    Switchover(ChangePrimary),
    /// HA clusters: promote a replica also when the primary is unhealthy (forced).
    Failover(ChangePrimary),
    /// Which EC2 instance types a dedicated instance with these requirements would get, with prices.
    PriceCheck {
        /// Requirements as `key=value` (region=eu-west-1 cpu_min=2 spot=false limit=5 ...).
        requirements: Vec<String>,
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
    #[command(flatten)]
    params: Params,
    #[command(flatten)]
    wait: Wait,
    /// With --wait: bind it and print only its DATABASE_URL (or uri) on stdout.
    #[arg(long)]
    connstr_only: bool,
}

#[derive(Args)]
pub struct ChangePrimary {
    instance: String,
    /// The member to promote (default: the healthiest replica).
    #[arg(long)]
    candidate: Option<String>,
    #[command(flatten)]
    wait: Wait,
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
        #[command(flatten)]
        wait: Wait,
    },
    /// Delete a preset with all its versions, or one version: the objects in the snapshot store and the template
    /// databases cached on servers go too.
    Delete {
        name: String,
        /// Only this version.
        #[arg(long)]
        version: Option<i32>,
        #[arg(long)]
        namespace: Option<String>,
        #[command(flatten)]
        wait: Wait,
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
    #[command(flatten)]
    wait: Wait,
}

#[derive(Subcommand)]
enum Backups {
    List {
        instance: String,
    },
    /// Take a backup now.
    Take {
        instance: String,
        #[command(flatten)]
        wait: Wait,
    },
    /// Reset the instance's database to a backup.
    Restore {
        instance: String,
        backup: String,
        #[command(flatten)]
        wait: Wait,
    },
    /// Delete a backup (its object in the snapshot store too).
    Delete {
        instance: String,
        backup: String,
        #[command(flatten)]
        wait: Wait,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("berth: {}", progress::plain(&format!("{e:#}")));
            if e.downcast_ref::<TimedOut>().is_some() {
                ExitCode::from(TimedOut::EXIT_CODE)
            } else {
                ExitCode::FAILURE
            }
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
    let c = commands::Ctx {
        client: &client,
        json: cli.json,
    };
    match cli.command {
        Command::GenKey { .. } => unreachable!("handled above"),
        Command::Catalog => c.catalog().await,
        Command::Provision(p) => {
            c.provision(
                &p.service,
                &p.plan,
                p.name,
                &p.params,
                p.wait,
                p.connstr_only,
            )
            .await
        }
        Command::Deprovision { instance, wait } => c.deprovision(&instance, wait).await,
        Command::List { page_size } => c.list(page_size).await,
        Command::Status { instance } => c.status(&instance).await,
        Command::Update {
            instance,
            plan,
            params,
            wait,
        } => c.update(&instance, plan.as_deref(), &params, wait).await,
        Command::Bind {
            instance,
            name,
            params,
            timeout,
        } => {
            let wait = Wait {
                wait: true,
                timeout,
            };
            c.bind(&instance, name, &params, wait).await
        }
        Command::Unbind {
            instance,
            binding,
            wait,
        } => c.unbind(&instance, &binding, wait).await,
        Command::RotateCredentials { instance, wait } => {
            c.rotate_credentials(&instance, wait).await
        }
        Command::Switchover(s) => {
            c.change_primary("switchover", &s.instance, s.candidate, s.wait)
                .await
        }
        Command::Failover(f) => {
            c.change_primary("failover", &f.instance, f.candidate, f.wait)
                .await
        }
        Command::PriceCheck { requirements } => c.price_check(&requirements).await,
        Command::Presets(p) => presets(&c, p).await,
        Command::Backups(b) => backups(&c, b).await,
    }
}

async fn presets(c: &commands::Ctx<'_>, command: Presets) -> anyhow::Result<()> {
    match command {
        Presets::List { namespace } => c.presets_list(&namespace).await,
        Presets::PushNew {
            name,
            instance,
            push,
            post_restore_sql,
        } => {
            let sql = post_restore_sql
                .map(|p| {
                    std::fs::read_to_string(&p)
                        .map_err(|e| anyhow::anyhow!("reading {}: {e}", p.display()))
                })
                .transpose()?;
            let body = serde_json::json!({
                "name": name, "namespace": push.namespace, "instance_id": instance,
                "description": push.description, "author": push.author, "post_restore_sql": sql,
            });
            let what = format!("preset {name}");
            c.post_task("/berth/v1/presets", &body, push.wait, &what)
                .await
        }
        Presets::Push {
            name,
            instance,
            push,
            lock_key,
        } => {
            let body = serde_json::json!({
                "instance_id": instance, "description": push.description, "author": push.author, "lock_key": lock_key,
            });
            let path = commands::preset_path(&name, "/versions", &Some(push.namespace));
            c.post_task(&path, &body, push.wait, &format!("preset {name}"))
                .await
        }
        Presets::Versions { name, namespace } => c.presets_versions(&name, &namespace).await,
        Presets::Lock {
            name,
            by,
            reason,
            namespace,
        } => c.presets_lock(&name, &by, &reason, &namespace).await,
        Presets::Unlock {
            name,
            lock_key,
            namespace,
        } => c.presets_unlock(&name, &lock_key, &namespace).await,
        Presets::GetLock { name, namespace } => c.presets_get_lock(&name, &namespace).await,
        Presets::Select {
            name,
            instance,
            version,
            namespace,
            wait,
        } => {
            let body =
                serde_json::json!({"preset": name, "namespace": namespace, "version": version});
            let path = format!("/berth/v1/instances/{}/select", commands::escape(&instance));
            c.post_task(&path, &body, wait, &format!("instance {instance}"))
                .await
        }
        Presets::Delete {
            name,
            version,
            namespace,
            wait,
        } => c.presets_delete(&name, version, &namespace, wait).await,
    }
}

async fn backups(c: &commands::Ctx<'_>, command: Backups) -> anyhow::Result<()> {
    match command {
        Backups::List { instance } => c.backups_list(&instance).await,
        Backups::Take { instance, wait } => {
            let path = format!(
                "/berth/v1/instances/{}/backups",
                commands::escape(&instance)
            );
            let what = format!("backup of {instance}");
            c.post_task(&path, &serde_json::json!({}), wait, &what)
                .await
        }
        Backups::Restore {
            instance,
            backup,
            wait,
        } => {
            let path = format!(
                "/berth/v1/instances/{}/backups/{}/restore",
                commands::escape(&instance),
                commands::escape(&backup)
            );
            let what = format!("instance {instance}");
            c.post_task(&path, &serde_json::json!({}), wait, &what)
                .await
        }
        Backups::Delete {
            instance,
            backup,
            wait,
        } => c.backups_delete(&instance, &backup, wait).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        for bad in ["", "s", "10x", "1.5m", "m10", "10m5"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn timeout_implies_wait() {
        let cli = Cli::try_parse_from(["berth", "deprovision", "db1", "--timeout", "2s"]).unwrap();
        let Command::Deprovision { wait, .. } = cli.command else {
            panic!("not deprovision");
        };
        assert!(wait.waiting());
        assert_eq!(wait.limit(), Duration::from_secs(2));
        let cli = Cli::try_parse_from(["berth", "deprovision", "db1"]).unwrap();
        let Command::Deprovision { wait, .. } = cli.command else {
            panic!("not deprovision");
        };
        assert!(!wait.waiting());
    }
}
