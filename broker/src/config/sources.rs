//! Where settings come from, each winning over the one before: the struct's defaults, the config file
//! (`--config FILE`, else `BERTH_CONFIG`), the environment, then flags.

use std::{
    path::{Path, PathBuf},
    sync::OnceLock,
};

use anyhow::Context;

use super::{Settings, other_variables::OTHER_VARIABLES, table};

/// What a process was given beyond its environment: a config file and settings as flags.
#[derive(Debug, Clone, Default)]
pub struct SettingSources {
    /// `--config FILE`; unset = `BERTH_CONFIG`, if that is set.
    pub config_file: Option<PathBuf>,
    /// Settings given as flags, by environment name (`("PORT", "9090")` for `--port 9090`).
    pub flags: Vec<(&'static str, String)>,
}

impl SettingSources {
    /// The config file to read, if any.
    pub fn config_path(&self) -> Option<PathBuf> {
        self.config_file
            .clone()
            .or_else(|| std::env::var_os("BERTH_CONFIG").map(PathBuf::from))
    }

    /// Reads and checks the settings. Fails with a message naming the bad setting, or the config file key
    /// that is no setting (a typo there would otherwise be ignored without a word).
    pub fn load(&self) -> anyhow::Result<Settings> {
        let mut builder = config::Config::builder();
        if let Some(path) = self.config_path() {
            let keys = file_keys(&path)?;
            if let Some(problem) = keys.iter().find_map(|key| unknown_key(key)) {
                anyhow::bail!("config file {}: {problem}", path.display());
            }
            builder = builder.add_source(config_file(&path));
        }
        builder = builder.add_source(config::Environment::default().try_parsing(false));
        for (name, value) in &self.flags {
            builder = builder.set_override(name.to_ascii_lowercase(), value.as_str())?;
        }
        let settings: Settings = builder
            .build()?
            .try_deserialize()
            .map_err(|e| anyhow::anyhow!("invalid setting: {e}"))?;
        settings.check()?;
        Ok(settings)
    }

    /// Warns about each `BERTH_*` variable that names no setting (a typo, most likely). Called once logging is
    /// set up, which needs the loaded settings (`LOG_FORMAT`), so the warning is not lost.
    pub fn warn_about_unknown_variables(&self) {
        for name in unknown_berth_variables() {
            let hint = match nearest_field(&name.to_ascii_lowercase()) {
                Some(near) => format!("did you mean {}?", near.to_ascii_uppercase()),
                None => "a typo? the settings are in docs/settings.md".to_string(),
            };
            tracing::warn!(variable = %name, "{name} is set but is no berth setting ({hint})");
        }
    }

    /// Whether the setting `name` (its environment name) was given at all: as a flag, in the environment, or
    /// in the config file; the embedded default picks its own values only for the ones that were not.
    pub fn is_given(&self, name: &str) -> bool {
        self.flags.iter().any(|(flag, _)| *flag == name)
            || std::env::var_os(name).is_some()
            || self.config_path().is_some_and(|path| {
                file_keys(&path).is_ok_and(|keys| keys.iter().any(|k| k.eq_ignore_ascii_case(name)))
            })
    }

    /// Environment that gives a child process (the embedded default's worker) the same settings: the config
    /// file (absolute) and the flags, which the child then reads from its environment.
    pub fn child_env(&self) -> Vec<(String, String)> {
        let mut env = Vec::new();
        if let Some(path) = &self.config_file {
            let path = std::path::absolute(path).unwrap_or_else(|_| path.clone());
            env.push(("BERTH_CONFIG".to_string(), path.display().to_string()));
        }
        env.extend(
            self.flags
                .iter()
                .map(|(name, value)| (name.to_string(), value.clone())),
        );
        env
    }
}

/// The config file source; `with_name` so that a name without an extension still finds `NAME.toml`.
fn config_file(path: &Path) -> config::File<config::FileSourceFile, config::FileFormat> {
    config::File::with_name(&path.to_string_lossy()).required(true)
}

/// The top-level keys of the config file.
fn file_keys(path: &Path) -> anyhow::Result<Vec<String>> {
    let table = config::Config::builder()
        .add_source(config_file(path))
        .build()
        .and_then(|config| config::Source::collect(&config))
        .with_context(|| format!("reading the config file {}", path.display()))?;
    Ok(table.into_keys().collect())
}

/// What is wrong with a config file key, if it names no setting.
fn unknown_key(key: &str) -> Option<String> {
    if field_names().contains(&key) {
        return None;
    }
    let hint = if field_names().contains(&key.to_ascii_lowercase().as_str()) {
        format!(" (keys are lower case: `{}`)", key.to_ascii_lowercase())
    } else if let Some(near) = nearest_field(key) {
        format!(" (did you mean `{near}`?)")
    } else {
        String::new()
    };
    Some(format!(
        "unknown setting `{key}`{hint}; the settings are listed in docs/settings.md"
    ))
}

/// The field name within two edits of `key`, if there is one.
fn nearest_field(key: &str) -> Option<&'static str> {
    field_names()
        .iter()
        .map(|field| (edit_distance(key, field), *field))
        .filter(|(distance, _)| *distance <= 2)
        .min()
        .map(|(_, field)| field)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut current = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(ca != *cb);
            current.push(substitution.min(previous[j + 1] + 1).min(current[j] + 1));
        }
        previous = current;
    }
    previous[b.len()]
}

/// `BERTH_*` variables in the environment that are neither settings nor variables berth reads elsewhere. The
/// environment holds everything, so only berth's own prefix can be told apart from a typo.
fn unknown_berth_variables() -> Vec<String> {
    std::env::vars_os()
        .filter_map(|(name, _)| name.into_string().ok())
        .filter(|name| name.starts_with("BERTH_"))
        .filter(|name| {
            table::find(name).is_none() && !OTHER_VARIABLES.iter().any(|v| v.name == name)
        })
        .collect()
}

/// The names of [`Settings`]' fields as serde reads them (renames applied): the keys a config file may hold.
pub(crate) fn field_names() -> &'static [&'static str] {
    static NAMES: OnceLock<&'static [&'static str]> = OnceLock::new();
    NAMES.get_or_init(|| {
        let mut names = None;
        let _ = <Settings as serde::Deserialize>::deserialize(FieldNames(&mut names));
        names.expect("Settings deserializes as a struct")
    })
}

/// A deserializer that only notes the field list serde's derive hands to `deserialize_struct`, then stops.
struct FieldNames<'a>(&'a mut Option<&'static [&'static str]>);

#[derive(Debug)]
struct Stop;

impl std::fmt::Display for Stop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("only the field names were wanted")
    }
}

impl std::error::Error for Stop {}

impl serde::de::Error for Stop {
    fn custom<T: std::fmt::Display>(_: T) -> Self {
        Stop
    }
}

impl<'de> serde::Deserializer<'de> for FieldNames<'_> {
    type Error = Stop;

    fn deserialize_any<V: serde::de::Visitor<'de>>(self, _: V) -> Result<V::Value, Stop> {
        Err(Stop)
    }

    fn deserialize_struct<V: serde::de::Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Stop> {
        *self.0 = Some(fields);
        Err(Stop)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option unit
        unit_struct newtype_struct seq tuple tuple_struct map enum identifier ignored_any
    }
}
