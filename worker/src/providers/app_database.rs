//! The app database, admin user and binding roles on a Postgres server of an instance's own (the `local`
//! engine's server, the primary of an `ha` cluster): the same SQL whatever runs the server. The caller says
//! how to reach the server as superuser, database by database.

use sqlx::{PgConnection, postgres::PgConnectOptions};

use super::scram;
use super::shared_postgres::{
    Access, connect, create_extensions, database_exists, drop_role, ensure_database, ensure_role,
    exec, exec_tolerating, lock_out, read_only_grants, role_exists,
};
use crate::registry::TaskError;
use broker::names::{quote_ident, quote_literal};

/// Superuser connect options for a database of the server.
pub(crate) type Superuser<'a> = &'a (dyn Fn(&str) -> PgConnectOptions + Sync);

/// What [`set_up`] makes.
pub(crate) struct AppDatabase<'a> {
    pub database: &'a str,
    pub owner: &'a str,
    pub admin_user: &'a str,
    pub admin_password: &'a str,
    pub extensions: &'a [String],
}

/// The owner role, the admin user (`LOGIN CREATEDB`, member of the owner), the app database closed to other
/// roles, the public schema handed to the owner on PostgreSQL < 15, the extensions. Idempotent.
pub(crate) async fn set_up(
    su: Superuser<'_>,
    app: &AppDatabase<'_>,
    major_version: u32,
) -> Result<(), TaskError> {
    let mut conn = connect(&su("postgres"), "connecting to the instance's server").await?;
    ensure_role(
        &mut conn,
        app.owner,
        "NOLOGIN",
        "creating the app database's owner role",
    )
    .await?;
    // CREATEDB but not CREATEROLE: on PostgreSQL 15 CREATEROLE could grant pg_execute_server_program.
    ensure_login(&mut conn, app.admin_user, "CREATEDB", app.admin_password).await?;
    exec(
        &mut conn,
        &format!(
            "GRANT {} TO {}",
            quote_ident(app.owner),
            quote_ident(app.admin_user)
        ),
        "making the admin user a member of the owner role",
    )
    .await?;
    ensure_database(&mut conn, app.database, app.owner).await?;
    exec(
        &mut conn,
        &format!(
            "REVOKE ALL ON DATABASE {} FROM PUBLIC",
            quote_ident(app.database)
        ),
        "closing the app database to other roles",
    )
    .await?;
    drop(conn);
    // From PostgreSQL 15 the public schema belongs to the database owner already.
    let old_public = major_version < 15;
    if old_public || !app.extensions.is_empty() {
        let mut db = connect(&su(app.database), "connecting to the app database").await?;
        if old_public {
            exec(
                &mut db,
                &format!("ALTER SCHEMA public OWNER TO {}", quote_ident(app.owner)),
                "handing the public schema to the owner role",
            )
            .await?;
        }
        create_extensions(&mut db, app.extensions).await?;
    }
    Ok(())
}

/// Creates the extensions in the app database (an update's new ones).
pub(crate) async fn add_extensions(
    su: Superuser<'_>,
    database: &str,
    extensions: &[String],
) -> Result<(), TaskError> {
    if extensions.is_empty() {
        return Ok(());
    }
    let mut db = connect(&su(database), "connecting to the app database").await?;
    create_extensions(&mut db, extensions).await
}

/// A binding's login role: read-write acts as the owner role; read-only reads every table of the app
/// database's public schema, now and later.
pub(crate) async fn grant_binding(
    su: Superuser<'_>,
    database: &str,
    owner: &str,
    role: &str,
    password: &str,
    access: Access,
) -> Result<(), TaskError> {
    let (role_q, owner_q, db_q) = (quote_ident(role), quote_ident(owner), quote_ident(database));
    let mut conn = connect(&su("postgres"), "connecting to the instance's server").await?;
    if !database_exists(&mut conn, database).await? || !role_exists(&mut conn, owner).await? {
        return Err(TaskError::fatal(format!(
            "the app database {database} is missing on the instance's server (did provisioning fail?); \
             deprovision the instance and provision it again"
        )));
    }
    ensure_login(&mut conn, role, "", password).await?;
    match access {
        Access::ReadWrite => {
            exec(
                &mut conn,
                &format!("GRANT {owner_q} TO {role_q}"),
                "making the binding role a member of the owner role",
            )
            .await?;
            exec(
                &mut conn,
                &format!("ALTER ROLE {role_q} SET role = {}", quote_literal(owner)),
                "making the binding act as the owner role",
            )
            .await?;
        }
        Access::ReadOnly => {
            exec(
                &mut conn,
                &format!("ALTER ROLE {role_q} SET default_transaction_read_only = on"),
                "making the binding role read-only",
            )
            .await?;
        }
    }
    exec(
        &mut conn,
        &format!("GRANT CONNECT ON DATABASE {db_q} TO {role_q}"),
        "letting the binding role connect",
    )
    .await?;
    drop(conn);
    if access == Access::ReadOnly {
        let mut db = connect(&su(database), "connecting to the app database").await?;
        let grants = read_only_grants(&role_q, &owner_q);
        exec(
            &mut db,
            &grants,
            "granting the read-only binding role SELECT on the app database's tables",
        )
        .await?;
    }
    Ok(())
}

/// Ends a binding role's sessions, hands what it owns to the owner role and drops it. Gone already: done.
pub(crate) async fn revoke_binding(
    su: Superuser<'_>,
    database: &str,
    owner: &str,
    role: &str,
) -> Result<(), TaskError> {
    let mut conn = connect(&su("postgres"), "connecting to the instance's server").await?;
    if !role_exists(&mut conn, role).await? {
        return Ok(());
    }
    lock_out(&mut conn, role).await?;
    if database_exists(&mut conn, database).await? {
        let mut db = connect(&su(database), "connecting to the app database").await?;
        exec(
            &mut db,
            &format!(
                "REASSIGN OWNED BY {} TO {}",
                quote_ident(role),
                quote_ident(owner)
            ),
            "handing the binding role's objects to the owner role",
        )
        .await?;
        exec(
            &mut db,
            &format!("DROP OWNED BY {}", quote_ident(role)),
            "revoking the binding role's privileges",
        )
        .await?;
    }
    drop_role(&mut conn, role, "dropping the binding role").await
}

/// Sets a login role's password (as a SCRAM verifier), creating the role if needed.
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
