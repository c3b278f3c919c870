//! Databases: looking one up, creating it for its owner.

use broker::names::quote_ident;
use sqlx::PgConnection;

use super::sql::{Sql, exec, exec_tolerating, exists};
use crate::registry::TaskError;

pub(crate) fn database_exists<'a>(conn: &'a mut PgConnection, database: &'a str) -> Sql<'a, bool> {
    exists(
        conn,
        "SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)",
        database,
        "looking up a database",
    )
}

/// Creates the database unless it exists. CREATE DATABASE cannot run in a transaction and may race a
/// concurrent one: "already exists" is success.
pub(crate) async fn ensure_database(
    conn: &mut PgConnection,
    database: &str,
    owner: &str,
) -> Result<(), TaskError> {
    if database_exists(conn, database).await? {
        return Ok(());
    }
    let sql = format!(
        "CREATE DATABASE {} OWNER {}",
        quote_ident(database),
        quote_ident(owner)
    );
    exec_tolerating(
        conn,
        &sql,
        &["42P04", "23505"],
        "creating the instance's database",
    )
    .await?;
    Ok(())
}

/// Takes CONNECT (and TEMP) away from PUBLIC: only roles granted CONNECT reach the database.
pub(crate) async fn close_to_public(
    conn: &mut PgConnection,
    database: &str,
    what: &str,
) -> Result<(), TaskError> {
    let sql = format!(
        "REVOKE ALL ON DATABASE {} FROM PUBLIC",
        quote_ident(database)
    );
    exec(conn, &sql, what).await
}
