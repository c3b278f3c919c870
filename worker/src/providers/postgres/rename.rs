//! Renaming a pooled server's objects for the instance that takes it (the `local` and `ha_local` engines' adopt
//! step): a database or a role, idempotently.

use broker::names::quote_ident;

use super::{database_exists, exec, role_exists};
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
