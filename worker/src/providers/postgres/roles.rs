//! Roles: looking them up, creating them (login roles with a SCRAM verifier, never a password in SQL text),
//! locking them out and dropping them.

use broker::names::{quote_ident, quote_literal};
use sqlx::PgConnection;

use super::{
    scram,
    sql::{Sql, exec, exec_tolerating, exists},
};
use crate::registry::TaskError;

pub(crate) fn role_exists<'a>(conn: &'a mut PgConnection, role: &'a str) -> Sql<'a, bool> {
    exists(
        conn,
        "SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)",
        role,
        "looking up a role",
    )
}

/// Roles that are members of `owner` (read-write binding roles).
pub(crate) fn members_of<'a>(conn: &'a mut PgConnection, owner: &'a str) -> Sql<'a, Vec<String>> {
    Box::pin(async move {
        sqlx::query_scalar::<_, String>(
            "SELECT m.rolname::text FROM pg_auth_members a
             JOIN pg_roles o ON o.oid = a.roleid
             JOIN pg_roles m ON m.oid = a.member
             WHERE o.rolname = $1",
        )
        .bind(owner)
        .fetch_all(&mut *conn)
        .await
        .map_err(|e| super::errors::classify(e, "listing the binding roles of the instance"))
    })
}

/// Creates the role unless it exists; a concurrent creation counts as success.
pub(crate) async fn ensure_role(
    conn: &mut PgConnection,
    role: &str,
    options: &str,
    what: &str,
) -> Result<(), TaskError> {
    if role_exists(conn, role).await? {
        return Ok(());
    }
    let sql = format!("CREATE ROLE {} {options}", quote_ident(role));
    exec_tolerating(conn, &sql, &["42710", "23505"], what).await?;
    Ok(())
}

/// Sets a login role's password (as a SCRAM verifier), creating the role if needed. A retry finds the role
/// from the first try and gives it the new password, so the stored credentials match.
pub(crate) async fn ensure_login(
    conn: &mut PgConnection,
    role: &str,
    attributes: &str,
    password: &str,
) -> Result<(), TaskError> {
    let role_q = quote_ident(role);
    let login = format!("LOGIN {attributes} {}", scram::password_clause(password)?);
    let created = if role_exists(conn, role).await? {
        false
    } else {
        exec_tolerating(
            conn,
            &format!("CREATE ROLE {role_q} {login}"),
            &["42710", "23505"],
            "creating a login role",
        )
        .await?
    };
    if !created {
        exec(
            conn,
            &format!("ALTER ROLE {role_q} WITH {login}"),
            "setting a login role's password",
        )
        .await?;
    }
    Ok(())
}

/// Stops a role's logins and ends its sessions.
pub(crate) async fn lock_out(conn: &mut PgConnection, role: &str) -> Result<(), TaskError> {
    exec(
        conn,
        &format!("ALTER ROLE {} NOLOGIN", quote_ident(role)),
        "disabling a binding role's login",
    )
    .await?;
    let terminate = format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = {} AND pid <> pg_backend_pid()",
        quote_literal(role)
    );
    exec(conn, &terminate, "ending a binding role's sessions").await
}

/// Drops a role after revoking what it holds in the admin database and on shared objects (databases).
pub(crate) async fn drop_role(
    conn: &mut PgConnection,
    role: &str,
    what: &str,
) -> Result<(), TaskError> {
    if !role_exists(conn, role).await? {
        return Ok(());
    }
    exec(conn, &format!("DROP OWNED BY {}", quote_ident(role)), what).await?;
    exec(
        conn,
        &format!("DROP ROLE IF EXISTS {}", quote_ident(role)),
        what,
    )
    .await
}
