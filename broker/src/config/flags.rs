//! Settings as command-line flags for `berth-api` and `berth-worker` (`#[command(flatten)]`): one flag per
//! setting of the table (`PORT` is `--port`, `BERTH_DATA_DIR` is `--data-dir`), except secrets, plus
//! `--config FILE`. `--help` lists every setting under its group with its environment name and default.

use std::path::PathBuf;

use clap::{Arg, ArgMatches, Args, Command, FromArgMatches};

use super::{
    SettingSources,
    table::{self, Setting},
};

const CONFIG: &str = "BERTH_CONFIG";

/// The settings given on the command line.
#[derive(Debug, Clone, Default)]
pub struct SettingFlags {
    pub sources: SettingSources,
}

/// The flag of a setting: its environment name without `BERTH_`, in lower case, `-` for `_`.
pub fn flag_name(setting: &Setting) -> String {
    let name = setting.name.strip_prefix("BERTH_").unwrap_or(setting.name);
    name.to_ascii_lowercase().replace('_', "-")
}

impl FromArgMatches for SettingFlags {
    fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        let mut flags = Self::default();
        flags.update_from_arg_matches(matches)?;
        Ok(flags)
    }

    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
        if let Some(path) = matches.get_one::<PathBuf>(CONFIG) {
            self.sources.config_file = Some(path.clone());
        }
        for setting in table::all().filter(|s| !s.secret) {
            if let Some(value) = matches.get_one::<String>(setting.name) {
                self.sources.flags.retain(|(name, _)| *name != setting.name);
                self.sources.flags.push((setting.name, value.clone()));
            }
        }
        Ok(())
    }
}

impl Args for SettingFlags {
    fn augment_args(cmd: Command) -> Command {
        let config = Arg::new(CONFIG)
            .long("config")
            .value_name("FILE")
            .value_parser(clap::value_parser!(PathBuf))
            .global(true)
            .help("TOML file of settings (keys: the environment names in lower case) [env: BERTH_CONFIG]");
        let mut cmd = cmd.arg(config);
        for (heading, settings) in table::GROUPS {
            for setting in settings.iter().filter(|s| !s.secret) {
                cmd = cmd.arg(setting_arg(heading, setting));
            }
        }
        cmd.after_help(after_help(false))
            .after_long_help(after_help(true))
    }

    fn augment_args_for_update(cmd: Command) -> Command {
        Self::augment_args(cmd)
    }
}

fn setting_arg(heading: &'static str, setting: &'static Setting) -> Arg {
    let tail = format!(
        "[env: {}] [default: {}]",
        setting.name,
        setting.default.text()
    );
    Arg::new(setting.name)
        .long(flag_name(setting))
        .value_name(setting.name)
        .global(true)
        .help_heading(heading)
        .help(format!("{} {tail}", first_sentence(setting.meaning)))
        .long_help(format!(
            "{}\n{tail} [read by: {}]",
            wrap(setting.meaning, 90),
            setting.read_by.label()
        ))
}

/// `text` with line breaks between words so that no line is longer than `width` (clap wraps nothing).
fn wrap(text: &str, width: usize) -> String {
    let mut out = String::new();
    let mut line_len = 0;
    for word in text.split(' ') {
        if line_len > 0 && line_len + 1 + word.len() > width {
            out.push('\n');
            line_len = 0;
        } else if line_len > 0 {
            out.push(' ');
            line_len += 1;
        }
        out.push_str(word);
        line_len += word.len();
    }
    out
}

/// The text up to the first full stop that ends a sentence.
fn first_sentence(text: &str) -> &str {
    match text.find(". ") {
        Some(end) => &text[..=end],
        None => text,
    }
}

/// The secrets (no flags) and the rules of precedence, shown below the options.
fn after_help(long: bool) -> String {
    let mut text = String::from(
        "Secrets: from the environment or the config file only, never a flag (a command line is\n\
         visible to every user through ps):\n",
    );
    let indent = format!("\n{:31}", "");
    for setting in table::all().filter(|s| s.secret) {
        let default = format!("[default: {}]", setting.default.text());
        let line = if long {
            let meaning = wrap(setting.meaning, 70).replace('\n', &indent);
            format!("{meaning}{indent}{default}")
        } else {
            format!("{} {default}", first_sentence(setting.meaning))
        };
        text.push_str(&format!("  {:<28} {line}\n", setting.name));
    }
    text.push_str(&wrap(
        "\nPrecedence: flag > environment variable > config file (--config, else BERTH_CONFIG) > \
         default. Config file keys are the environment names in lower case (see \
         deploy/berth.example.toml); a key that is no setting is an error. Every setting: \
         docs/settings.md.",
        100,
    ));
    text
}
