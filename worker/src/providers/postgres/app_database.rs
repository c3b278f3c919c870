//! The app database and its admin user on a Postgres server of an instance's own (the `local` engine's
//! server, an `ec2` VM, the primary of an `ha` cluster): the same SQL whatever runs the server. The caller says
//! how to reach the server as superuser, database by database.

use broker::{db::instances::InstanceRow, names::quote_ident};
use serde_json::Value;
use sqlx::postgres::PgConnectOptions;

use super::{
    databases::{close_to_public, ensure_database},
    extensions::create_extensions,
    roles::{ensure_login, ensure_role},
    sql::{connect, exec},
};
use crate::registry::TaskError;

/// The app database's name when the parameters name none.
pub(crate) const DEFAULT_APP_DB: &str = "app";

/// The app database of a provisioned instance (its details record the name it was made with).
pub(crate) fn app_db_name(instance: &InstanceRow) -> &str {
    instance
        .details
        .get("app_db_name")
        .and_then(Value::as_str)
        .unwrap_or(DEFAULT_APP_DB)
}

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
    close_to_public(
        &mut conn,
        app.database,
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
