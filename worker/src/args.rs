//! `berth-worker`'s command line: `run` (the default), and every setting as a flag
//! (`broker::config::flags`), so `--help` lists them all with their defaults.

use broker::config::{SettingSources, flags::SettingFlags};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "berth-worker",
    version = env!("BERTH_VERSION"),
    about = "berth's worker: claims tasks from the broker's database and runs them",
    long_about = "berth's worker: claims tasks from the broker's database (DATABASE_URL, the API's) and runs \
                  them until SIGTERM or SIGINT. Run any number of them.\n\nSettings come from flags, the \
                  environment and a config file; every setting is listed below with its environment name \
                  and default."
)]
pub struct Cli {
    #[command(flatten)]
    settings: SettingFlags,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
pub enum Command {
    /// Claim and run tasks until SIGTERM or SIGINT (the default).
    Run,
    /// Re-seal every stored secret and snapshot with the primary keys (the first of BERTH_KEY_FILES and of
    /// SNAPSHOT_KEY_FILES) while the broker serves, then retire the keys nothing is sealed with any more.
    /// Exits non-zero while anything is left under an older key. See docs/keys.md.
    Rekey {
        /// Rows re-sealed per statement (each batch is its own short transaction).
        #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(i64).range(1..=100_000))]
        batch_size: i64,
        /// Leave snapshots alone (re-seal only the secrets in the broker's database).
        #[arg(long)]
        skip_snapshots: bool,
    },
    // More commands go here (each a function of the worker's library called from main.rs).
}

impl Cli {
    /// The command (`run` when none is given) and the settings' sources.
    pub fn into_parts(self) -> (Command, SettingSources) {
        (self.command.unwrap_or(Command::Run), self.settings.sources)
    }
}
