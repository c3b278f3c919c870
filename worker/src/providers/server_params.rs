//! The parameters of a Postgres server berth runs (the `dedicated` plan's `local` engine, and each member of an
//! `ha` cluster): version, extensions, tuning profile, the app database's and its admin's names. The schema
//! checked them at the API already; a payload that does not parse here is Fatal.

use serde_json::Value;

use super::{pg_tuning as tuning, shared_postgres::requested_extensions};
use crate::registry::TaskError;

pub const DEFAULT_APP_DB: &str = "app";
pub const DEFAULT_ADMIN: &str = "app_admin";

/// What berth acts on when it runs a server (the cloud-only parameters are recorded, nothing more).
#[derive(Debug, Clone)]
pub struct Params {
    pub postgres_version: Option<String>,
    pub extensions: Vec<String>,
    pub tuning_profile: String,
    pub app_db_name: String,
    pub admin_user: String,
}

impl Params {
    pub fn of(parameters: &Value) -> Result<Self, TaskError> {
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
