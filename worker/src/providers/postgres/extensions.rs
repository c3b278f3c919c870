//! Extensions: the allow-list every Postgres plan offers, the `extensions` parameter, creating them.

use broker::names::quote_ident;
use serde_json::Value;
use sqlx::PgConnection;

use super::sql::exec_tolerating;
use crate::registry::TaskError;

/// Extensions an instance may ask for; the plans' JSON schemas list the same ones.
pub const ALLOWED_EXTENSIONS: &[&str] = &[
    "btree_gin",
    "btree_gist",
    "citext",
    "cube",
    "earthdistance",
    "fuzzystrmatch",
    "hstore",
    "intarray",
    "isn",
    "lo",
    "ltree",
    "pg_trgm",
    "pgcrypto",
    "seg",
    "tablefunc",
    "tsm_system_rows",
    "unaccent",
    "uuid-ossp",
];

/// The `extensions` parameter, re-checked against the allow-list (the schema checked it already).
pub(crate) fn requested_extensions(parameters: &Value) -> Result<Vec<String>, TaskError> {
    let Some(list) = parameters.get("extensions") else {
        return Ok(Vec::new());
    };
    let Some(list) = list.as_array() else {
        return Err(TaskError::fatal(
            "parameter `extensions` must be a list of extension names",
        ));
    };
    let mut out = Vec::new();
    for item in list {
        match item.as_str() {
            Some(name) if ALLOWED_EXTENSIONS.contains(&name) => {
                if !out.iter().any(|e| e == name) {
                    out.push(name.to_string());
                }
            }
            _ => {
                return Err(TaskError::fatal(format!(
                    "extension {item} is not offered on this plan; choose from: {}",
                    ALLOWED_EXTENSIONS.join(", ")
                )));
            }
        }
    }
    Ok(out)
}

pub(crate) async fn create_extensions(
    conn: &mut PgConnection,
    extensions: &[String],
) -> Result<(), TaskError> {
    for extension in extensions {
        let sql = format!("CREATE EXTENSION IF NOT EXISTS {}", quote_ident(extension));
        let what = format!("creating extension {extension:?}");
        // Created concurrently by another run: fine.
        exec_tolerating(conn, &sql, &["23505", "42710"], &what).await?;
    }
    Ok(())
}
