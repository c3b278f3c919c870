//! The parameters of a Postgres server of an instance's own, as the `local` and `ha_local` engines read them
//! (strictly: a value of the wrong type is Fatal).

use serde_json::Value;

use super::{app_database::DEFAULT_APP_DB, extensions::requested_extensions, tuning};
use crate::registry::TaskError;

/// The admin user's name when the parameters name none.
pub(crate) const DEFAULT_ADMIN: &str = "app_admin";

/// The instance parameters a dedicated server is made with (the cloud-only ones are recorded, nothing more).
#[derive(Debug, Clone)]
pub struct ServerParams {
    pub(crate) postgres_version: Option<String>,
    pub(crate) extensions: Vec<String>,
    pub(crate) tuning_profile: String,
    pub(crate) app_db_name: String,
    pub(crate) admin_user: String,
}

impl ServerParams {
    pub(crate) fn of(parameters: &Value) -> Result<Self, TaskError> {
        let text = |key: &str, default: &str| -> Result<String, TaskError> {
            match parameters.get(key) {
                None | Some(Value::Null) => Ok(default.to_string()),
                Some(Value::String(s)) => Ok(s.clone()),
                Some(other) => Err(TaskError::fatal(format!(
                    "parameter `{key}` must be a string, not {other}"
                ))),
            }
        };
        let tuning_profile = text("tuning_profile", "default")?;
        if !tuning::PROFILES.contains(&tuning_profile.as_str()) {
            return Err(TaskError::fatal(format!(
                "parameter `tuning_profile` must be one of {}",
                tuning::PROFILES.join(", ")
            )));
        }
        let app_db_name = text("app_db_name", DEFAULT_APP_DB)?;
        let admin_user = text("admin_user", DEFAULT_ADMIN)?;
        for (key, value) in [("app_db_name", &app_db_name), ("admin_user", &admin_user)] {
            if !is_plain_identifier(value) || value == "postgres" || value.starts_with("pg_") {
                return Err(TaskError::fatal(format!(
                    "parameter `{key}` must be 1-63 characters of a-z, 0-9 and _ (not postgres or pg_*)"
                )));
            }
        }
        let postgres_version = match parameters.get("postgres_version") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Number(n)) => Some(n.to_string()),
            Some(other) => {
                return Err(TaskError::fatal(format!(
                    "parameter `postgres_version` must be a string, not {other}"
                )));
            }
        };
        Ok(Self {
            postgres_version,
            extensions: requested_extensions(parameters)?,
            tuning_profile,
            app_db_name,
            admin_user,
        })
    }
}

fn is_plain_identifier(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !s.starts_with(|c: char| c.is_ascii_digit())
}
