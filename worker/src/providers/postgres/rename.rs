//! Renaming a pooled server's objects for the instance that takes it (the `local` and `ha_local` engines' adopt
//! step): a database or a role, idempotently.

use broker::{
    db::instances::InstanceRow,
    names::{self, quote_ident},
};
use serde_json::Value;

use super::{
    DEFAULT_ADMIN, DEFAULT_APP_DB, database_exists, errors::classify, exec, role_exists, sql::Sql,
};
use crate::registry::TaskError;

/// What a pooled server's object is renamed as.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Rename {
    Database,
    Role,
}

impl Rename {
    /// Renames `from` to `to` unless that is done (a retry: `from` is gone and `to` exists) or not needed.
    pub(crate) async fn apply(
        self,
        conn: &mut sqlx::PgConnection,
        from: &str,
        to: &str,
    ) -> Result<(), TaskError> {
        if from == to {
            return Ok(());
        }
        let (exists_from, keyword) = match self {
            Rename::Database => (database_exists(conn, from).await?, "DATABASE"),
            Rename::Role => (role_exists(conn, from).await?, "ROLE"),
        };
        if !exists_from {
            return Ok(());
        }
        exec(
            conn,
            &format!(
                "ALTER {keyword} {} RENAME TO {}",
                quote_ident(from),
                quote_ident(to)
            ),
            "renaming the pooled server's objects for the instance",
        )
        .await
    }
}

/// The statements of `renames` still to run, from one look at the server (a retry finds `from` gone and `to`
/// there), for a caller that sends them in one batch with its other changes.
pub(crate) fn rename_statements<'a>(
    conn: &'a mut sqlx::PgConnection,
    renames: &'a [(Rename, String, String)],
) -> Sql<'a, Vec<String>> {
    Box::pin(async move {
        let pending: Vec<&(Rename, String, String)> =
            renames.iter().filter(|(_, from, to)| from != to).collect();
        let named = |database: bool| -> Vec<String> {
            pending
                .iter()
                .filter(|(kind, ..)| matches!(kind, Rename::Database) == database)
                .map(|(_, from, _)| from.clone())
                .collect()
        };
        let existing: Vec<(bool, String)> = sqlx::query_as(
            "SELECT true, datname::text FROM pg_database WHERE datname = ANY($1)
             UNION ALL SELECT false, rolname::text FROM pg_roles WHERE rolname = ANY($2)",
        )
        .bind(named(true))
        .bind(named(false))
        .fetch_all(&mut *conn)
        .await
        .map_err(|e| classify(e, "reading the pooled server's names"))?;
        Ok(pending
            .into_iter()
            .filter(|(kind, from, _)| {
                existing.contains(&(matches!(kind, Rename::Database), from.clone()))
            })
            .map(|(kind, from, to)| {
                let keyword = match kind {
                    Rename::Database => "DATABASE",
                    Rename::Role => "ROLE",
                };
                format!(
                    "ALTER {keyword} {} RENAME TO {}",
                    quote_ident(from),
                    quote_ident(to)
                )
            })
            .collect())
    })
}

/// What a pooled server's objects are renamed as when `instance` takes the item `pool_item`: the app database
/// and the admin user to the names the instance asks for, the owner role to the instance's. The item's names
/// are the ones its details recorded (the defaults when it recorded none).
pub(crate) fn pooled_renames(
    instance: &InstanceRow,
    prefix: &str,
    pool_item: &str,
    app_db_name: &str,
    admin_user: &str,
) -> [(Rename, String, String); 3] {
    let recorded = |key: &str, default: &str| -> String {
        instance
            .details
            .get(key)
            .and_then(Value::as_str)
            .unwrap_or(default)
            .to_string()
    };
    [
        (
            Rename::Database,
            recorded("app_db_name", DEFAULT_APP_DB),
            app_db_name.to_string(),
        ),
        (
            Rename::Role,
            recorded("admin_user", DEFAULT_ADMIN),
            admin_user.to_string(),
        ),
        (
            Rename::Role,
            recorded("owner_role", &names::instance_owner_role(prefix, pool_item)),
            names::instance_owner_role(prefix, &instance.id),
        ),
    ]
}
