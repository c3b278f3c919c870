//! `berth-api`'s command line: `serve` (the default) and `gen-key PATH`, and every setting as a flag
//! (`broker::config::flags`), so `--help` lists them all with their defaults.

use std::path::PathBuf;

use broker::config::{SettingSources, flags::SettingFlags};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "berth-api",
    version = env!("BERTH_VERSION"),
    about = "berth's Open Service Broker API server",
    long_about = "berth's Open Service Broker API server (OSB v2.17). With no DATABASE_URL it runs the \
                  embedded default: a private Postgres under BERTH_DATA_DIR, the API on 127.0.0.1 and one \
                  worker.\n\nSettings come from flags, the environment and a config file; every setting is \
                  listed below with its environment name and default."
)]
pub struct Cli {
    #[command(flatten)]
    settings: SettingFlags,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
pub enum Command {
    /// Serve the OSB API (the default).
    Serve,
    /// Write a new secrets key to PATH (refuses to overwrite one), then set BERTH_KEY_FILE=PATH.
    GenKey { path: PathBuf },
}

impl Cli {
    /// The command (`serve` when none is given) and the settings' sources.
    pub fn into_parts(self) -> (Command, SettingSources) {
        (
            self.command.unwrap_or(Command::Serve),
            self.settings.sources,
        )
    }
}
