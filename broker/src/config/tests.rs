//! The settings table held to the code: the struct's fields and defaults, the flags, the config file loader,
//! the example config file and docs/settings.md (whose tables are made from the table and checked here).

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use super::{
    SettingSources, Settings,
    flags::SettingFlags,
    other_variables::{OTHER_VARIABLES, OtherKind},
    sources::field_names,
    table::{self, DefaultValue, ReadBy},
};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A file of its own under the temp folder, removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn toml(text: &str) -> Self {
        let name = format!("berth-settings-{}.toml", uuid::Uuid::new_v4().simple());
        let path = std::env::temp_dir().join(name);
        std::fs::write(&path, text).unwrap();
        Self(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn the_table_names_exactly_the_settings_fields() {
    let mut seen = BTreeSet::new();
    for setting in table::all() {
        assert!(
            seen.insert(setting.name),
            "{} is in the table twice",
            setting.name
        );
        assert!(
            setting
                .name
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_'),
            "{} is not an environment name",
            setting.name
        );
    }
    let in_table: BTreeSet<String> = seen.iter().map(|n| n.to_ascii_lowercase()).collect();
    let fields: BTreeSet<String> = field_names().iter().map(|f| f.to_string()).collect();
    let missing: Vec<_> = fields.difference(&in_table).collect();
    let extra: Vec<_> = in_table.difference(&fields).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "Settings fields without a row in config/table.rs: {missing:?}; rows without a field: {extra:?}"
    );
}

/// Each field of `settings` by its serde name, and its value as `{:#?}` prints it (first line only). Debug
/// prints the fields in the order serde lists them, under their Rust names (`data_dir` for `berth_data_dir`).
fn field_values(settings: &Settings) -> BTreeMap<String, String> {
    let printed = format!("{settings:#?}");
    let values: Vec<String> = printed
        .lines()
        .filter(|line| line.starts_with("    ") && !line.starts_with("     "))
        .filter_map(|line| line.trim().split_once(": "))
        .map(|(_, value)| value.trim_end_matches(',').to_string())
        .collect();
    assert_eq!(values.len(), field_names().len(), "{printed}");
    field_names()
        .iter()
        .map(|f| f.to_string())
        .zip(values)
        .collect()
}

/// Settings from the struct's defaults and `given` alone (no environment, no file).
fn settings_from(given: &[(&str, &str)]) -> Settings {
    let mut builder = config::Config::builder();
    for (key, value) in given {
        builder = builder
            .set_override(key.to_ascii_lowercase(), *value)
            .unwrap();
    }
    builder.build().unwrap().try_deserialize().unwrap()
}

#[test]
fn the_table_defaults_are_the_structs_defaults() {
    let defaults = field_values(&settings_from(&[]));
    for setting in table::all() {
        let field = setting.name.to_ascii_lowercase();
        let default = &defaults[&field];
        match setting.default {
            DefaultValue::Value(text) => {
                assert_ne!(
                    default, "None",
                    "{} has no default in the struct",
                    setting.name
                );
                let given = field_values(&settings_from(&[(setting.name, text)]));
                assert_eq!(
                    &given[&field], default,
                    "{}: the table says {text:?}, the struct's default is {default}",
                    setting.name
                );
            }
            DefaultValue::Fallback(_) | DefaultValue::Unset => assert_eq!(
                default, "None",
                "{}: the table says it is unset by default, the struct says {default}",
                setting.name
            ),
        }
    }
}

fn parse_flags(args: &[&str]) -> Result<SettingSources, clap::Error> {
    use clap::{Args, FromArgMatches};
    let cmd = SettingFlags::augment_args(clap::Command::new("berth-test"));
    let matches =
        cmd.try_get_matches_from(std::iter::once("berth-test").chain(args.iter().copied()))?;
    Ok(SettingFlags::from_arg_matches(&matches)?.sources)
}

#[test]
fn every_setting_but_the_secrets_is_a_flag() {
    for setting in table::all() {
        let flag = format!("--{}", super::flags::flag_name(setting));
        let parsed = parse_flags(&[&flag, "x"]);
        if setting.secret {
            let error = parsed.expect_err("a secret has no flag");
            assert_eq!(
                error.kind(),
                clap::error::ErrorKind::UnknownArgument,
                "{flag}"
            );
        } else {
            let sources = parsed.unwrap_or_else(|e| panic!("{flag}: {e}"));
            assert_eq!(
                sources.flags,
                vec![(setting.name, "x".to_string())],
                "{flag}"
            );
        }
    }
    let sources = parse_flags(&["--config", "/etc/berth.toml", "--data-dir", "/srv"]).unwrap();
    assert_eq!(sources.config_file, Some(PathBuf::from("/etc/berth.toml")));
    assert_eq!(sources.flags, vec![("BERTH_DATA_DIR", "/srv".to_string())]);
}

#[test]
fn a_flag_wins_over_the_config_file() {
    // WORKER_PREFETCH: a setting no test environment sets, which would win over the file.
    let file = TempFile::toml("worker_prefetch = 7\nname_prefix = \"fromfile_\"\n");
    let from_file = SettingSources {
        config_file: Some(file.0.clone()),
        flags: Vec::new(),
    };
    let settings = from_file.load().unwrap();
    assert_eq!(
        (settings.worker_prefetch, settings.name_prefix.as_str()),
        (7, "fromfile_")
    );
    assert!(from_file.is_given("WORKER_PREFETCH") && !from_file.is_given("WORKER_POLL_MS"));

    let with_flag = SettingSources {
        flags: vec![("WORKER_PREFETCH", "9".into())],
        ..from_file
    };
    let settings = with_flag.load().unwrap();
    assert_eq!(
        (settings.worker_prefetch, settings.name_prefix.as_str()),
        (9, "fromfile_")
    );
}

#[test]
fn a_config_file_key_that_is_no_setting_stops_the_load_naming_it() {
    for (text, expected) in [
        (
            "prot = 8080\n",
            "unknown setting `prot` (did you mean `port`?)",
        ),
        (
            "PORT = 8080\n",
            "unknown setting `PORT` (keys are lower case: `port`)",
        ),
        ("[server]\nport = 8080\n", "unknown setting `server`"),
    ] {
        let file = TempFile::toml(text);
        let sources = SettingSources {
            config_file: Some(file.0.clone()),
            flags: Vec::new(),
        };
        let error = format!("{:#}", sources.load().expect_err(text));
        assert!(
            error.contains(expected) && error.contains(&file.0.display().to_string()),
            "{text:?} gave: {error}"
        );
    }
}

#[test]
fn a_bad_flag_value_names_its_setting() {
    let sources = SettingSources {
        config_file: None,
        flags: vec![("WORKER_PREFETCH", "many".into())],
    };
    let error = format!("{:#}", sources.load().expect_err("not a number"));
    assert!(error.contains("worker_prefetch"), "{error}");
}

const EXAMPLE: &str = "deploy/berth.example.toml";

#[test]
fn the_example_config_file_loads_with_its_values() {
    let sources = SettingSources {
        config_file: Some(repo().join(EXAMPLE)),
        flags: Vec::new(),
    };
    let settings = sources.load().unwrap();
    // Each value differs from its default; the environment of a test run sets none of these.
    assert_eq!(settings.data_dir, PathBuf::from("/var/lib/berth"));
    assert_eq!(
        settings.key_file,
        Some(PathBuf::from("/etc/berth/master.key"))
    );
    assert_eq!(settings.plans_dir, PathBuf::from("/usr/share/berth/plans"));
    assert_eq!(settings.worker_concurrency, 16);
    assert_eq!(settings.database_pool_size, 24);
    assert_eq!(settings.snapshot_zstd_level, 3);
    assert_eq!(
        settings.snapshot_store_url.as_deref(),
        Some("file:///var/lib/berth/snapshots")
    );
}

/// How a default is written in TOML: numbers and booleans bare, the rest quoted.
fn toml_value(text: &str) -> String {
    if text.parse::<i64>().is_ok() || text == "true" || text == "false" {
        text.to_string()
    } else {
        format!("{text:?}")
    }
}

#[test]
fn the_example_config_file_lists_every_setting_with_its_default() {
    let text = std::fs::read_to_string(repo().join(EXAMPLE)).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    for setting in table::all() {
        let key = setting.name.to_ascii_lowercase();
        let commented = format!("# {key} = ");
        let set = format!("{key} = ");
        let line = lines
            .iter()
            .find(|l| l.starts_with(&commented) || l.starts_with(&set))
            .unwrap_or_else(|| panic!("{EXAMPLE} lacks `# {key} = ...` ({})", setting.meaning));
        if let DefaultValue::Value(default) = setting.default
            && line.starts_with('#')
        {
            let expected = format!("{commented}{}", toml_value(default));
            assert_eq!(*line, expected, "{EXAMPLE}: the default of {key}");
        }
    }
}

const PAGE: &str = "docs/settings.md";
const BEGIN: &str = "<!-- BEGIN settings tables: made from broker/src/config/table.rs by `BERTH_UPDATE_DOCS=1 cargo test -p broker config::` -->";
const END: &str = "<!-- END settings tables -->";

/// The page's tables, made from the table.
fn settings_tables() -> String {
    let mut out = String::new();
    for (heading, settings) in table::GROUPS {
        out.push_str(&format!(
            "\n### {heading}\n\n| NAME | default | meaning |\n|---|---|---|\n"
        ));
        for setting in settings.iter() {
            let default = match setting.default {
                DefaultValue::Value(text) => format!("`{text}`"),
                // `<BERTH_DATA_DIR>` would be taken for an HTML tag.
                other => other.text().replace('<', "\\<").replace('>', "\\>"),
            };
            let mut notes = Vec::new();
            match setting.read_by {
                ReadBy::Api => notes.push("berth-api only"),
                ReadBy::Worker => notes.push("berth-worker only"),
                ReadBy::Both => {}
            }
            if setting.secret {
                notes.push("secret: no flag");
            }
            let notes = if notes.is_empty() {
                String::new()
            } else {
                format!(" _({})_", notes.join("; "))
            };
            out.push_str(&format!(
                "| `{}` | {default} | {}{notes} |\n",
                setting.name, setting.meaning
            ));
        }
    }
    for (kind, heading) in [
        (
            OtherKind::Process,
            "Other variables berth-api and berth-worker read",
        ),
        (OtherKind::Cli, "Read by the `berth` command line tool"),
        (
            OtherKind::Internal,
            "Internal (set by berth itself, its build or its tests)",
        ),
    ] {
        out.push_str(&format!(
            "\n### {heading}\n\n| NAME | meaning |\n|---|---|\n"
        ));
        for variable in OTHER_VARIABLES.iter().filter(|v| v.kind == kind) {
            out.push_str(&format!("| `{}` | {} |\n", variable.name, variable.meaning));
        }
    }
    out
}

#[test]
fn the_settings_page_tables_are_made_from_the_table() {
    for text in table::all()
        .map(|s| s.meaning)
        .chain(OTHER_VARIABLES.iter().map(|v| v.meaning))
    {
        assert!(
            !text.contains('|') && !text.contains('\n'),
            "breaks a table row: {text}"
        );
    }
    let path = repo().join(PAGE);
    let page = std::fs::read_to_string(&path).unwrap();
    let (head, rest) = page
        .split_once(BEGIN)
        .expect("the page has the BEGIN marker");
    let (current, tail) = rest.split_once(END).expect("the page has the END marker");
    let wanted = format!("{}\n", settings_tables());
    if current != wanted {
        if std::env::var_os("BERTH_UPDATE_DOCS").is_some() {
            std::fs::write(&path, format!("{head}{BEGIN}{wanted}{END}{tail}")).unwrap();
        } else {
            panic!(
                "{PAGE} is stale: run `BERTH_UPDATE_DOCS=1 cargo test -p broker config::` and commit it"
            );
        }
    }
}

/// Environment variables read in the sources of the crates berth ships: `env::var("…")`, `var_os("…")`,
/// either of them on a constant defined in the same file, clap's `env = "…"`, `env!`/`option_env!` (but
/// Cargo's own), and `RUST_LOG` through tracing's `from_default_env`.
fn variables_read_by_the_code() -> BTreeMap<String, PathBuf> {
    let literal =
        regex::Regex::new(r#"\b(?:var|var_os|env!|option_env!)\(\s*"([A-Z][A-Z0-9_]*)""#).unwrap();
    let by_constant = regex::Regex::new(r"\b(?:var|var_os)\(\s*([A-Z][A-Z0-9_]*)\s*\)").unwrap();
    let clap_env = regex::Regex::new(r#"\benv\s*=\s*"([A-Z][A-Z0-9_]*)""#).unwrap();
    let mut found = BTreeMap::new();
    for crate_dir in ["api", "worker", "broker", "cli"] {
        for file in rust_files(&repo().join(crate_dir)) {
            let source = std::fs::read_to_string(&file).unwrap();
            let mut names: Vec<String> = Vec::new();
            for pattern in [&literal, &clap_env] {
                names.extend(pattern.captures_iter(&source).map(|c| c[1].to_string()));
            }
            for constant in by_constant.captures_iter(&source) {
                let definition = regex::Regex::new(&format!(
                    r#"const {}\s*:\s*&(?:'static )?str\s*=\s*"([A-Z][A-Z0-9_]*)""#,
                    &constant[1]
                ))
                .unwrap();
                let value = definition.captures(&source).unwrap_or_else(|| {
                    panic!(
                        "{}: the variable in {} is not a constant here",
                        file.display(),
                        &constant[0]
                    )
                });
                names.push(value[1].to_string());
            }
            if source.contains("from_default_env") {
                names.push("RUST_LOG".into());
            }
            for name in names.into_iter().filter(|n| !set_by_cargo(n)) {
                found.entry(name).or_insert_with(|| file.clone());
            }
        }
    }
    found
}

/// What Cargo sets for a build (script): no setting of berth's.
fn set_by_cargo(name: &str) -> bool {
    name.starts_with("CARGO_") || ["PROFILE", "OUT_DIR", "TARGET", "HOST"].contains(&name)
}

/// The `.rs` files under `dir`, leaving out test folders and build output.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if path.is_dir() && name != "tests" && name != "target" {
            files.extend(rust_files(&path));
        } else if name.ends_with(".rs") {
            files.push(path);
        }
    }
    files
}

#[test]
fn every_variable_the_code_reads_is_on_the_settings_page() {
    let page = std::fs::read_to_string(repo().join(PAGE)).unwrap();
    let read = variables_read_by_the_code();
    // The scan itself works: it sees the reads this crate is known to make.
    for known in ["BERTH_CONFIG", "PG_BIN_DIR", "RUST_LOG", "BERTH_LOCK_KEY"] {
        assert!(
            read.contains_key(known),
            "the scan missed {known}: {read:?}"
        );
    }
    for (name, file) in &read {
        let listed = table::find(name).is_some() || OTHER_VARIABLES.iter().any(|v| v.name == name);
        assert!(
            listed,
            "{name} (read in {}) is neither a setting (config/table.rs) nor in config/other_variables.rs",
            file.display()
        );
        assert!(
            page.contains(&format!("`{name}`")),
            "{PAGE} does not mention `{name}`"
        );
    }
    for setting in table::all() {
        assert!(
            page.contains(&format!("| `{}` |", setting.name)),
            "{PAGE} lacks {}",
            setting.name
        );
    }
}
