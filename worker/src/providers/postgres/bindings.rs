//! Bindings: a login role of their own per binding, made and dropped by the server's superuser, and the
//! credentials and details handed back. Every Postgres engine binds through here.

use broker::{
    crypto::random_password,
    db::{bindings::BindingRow, instances::InstanceRow},
    names::{self, quote_ident},
};
use serde_json::{Map, Value, json};
use sqlx::postgres::PgConnectOptions;

use super::{
    app_database::{Superuser, app_db_name},
    databases::database_exists,
    grants::{RoleGrant, grant_access},
    roles::{drop_role, ensure_login, lock_out, role_exists},
    sql::{connect, exec},
};
use crate::{providers::Bound, providers::binding_access::Access, registry::TaskError};

/// How berth reaches a dedicated server to manage roles: superuser connect options per database, and the
/// host and port apps are given.
pub(crate) struct ServerAccess<'a> {
    pub superuser: Superuser<'a>,
    pub host: &'a str,
    pub port: u16,
}

/// A binding on a dedicated server: a login role of its own (member of the owner role, or read-only), with
/// credentials that require TLS.
pub(crate) async fn bind_role(
    server: &ServerAccess<'_>,
    prefix: &str,
    instance: &InstanceRow,
    binding: &BindingRow,
) -> Result<Bound, TaskError> {
    let access = Access::of(binding)?;
    let made = grant_binding_role(server.superuser, prefix, instance, binding, access).await?;
    Ok(Bound {
        details: binding_details(server.host, server.port, &made),
        credentials: credentials(
            server.host,
            server.port,
            &made.database,
            &made.role,
            &made.password,
            true,
        )?,
    })
}

/// The login role a binding got, with its fresh password.
pub(crate) struct BindingRole {
    pub database: String,
    pub role: String,
    pub password: String,
    pub access: Access,
}

impl BindingRole {
    /// The database, role and password, for credentials.
    pub(crate) fn into_parts(self) -> (String, String, String) {
        (self.database, self.role, self.password)
    }
}

/// Makes `binding`'s login role on the server of an instance of its own (`su` reaches its primary as
/// superuser) with a new password, in the instance's app database.
pub(crate) async fn grant_binding_role(
    su: Superuser<'_>,
    prefix: &str,
    instance: &InstanceRow,
    binding: &BindingRow,
    access: Access,
) -> Result<BindingRole, TaskError> {
    let made = BindingRole {
        database: app_db_name(instance).to_string(),
        role: names::binding_role(prefix, &binding.id),
        password: random_password(32),
        access,
    };
    let owner = names::instance_owner_role(prefix, &instance.id);
    grant_binding(
        su,
        &made.database,
        &owner,
        &made.role,
        &made.password,
        access,
    )
    .await?;
    Ok(made)
}

/// Drops `binding`'s login role on the server of an instance of its own (`su` reaches its primary).
pub(crate) async fn revoke_binding_role(
    su: Superuser<'_>,
    prefix: &str,
    instance: &InstanceRow,
    binding: &BindingRow,
) -> Result<(), TaskError> {
    let owner = names::instance_owner_role(prefix, &instance.id);
    let role = names::binding_role(prefix, &binding.id);
    revoke_binding(su, app_db_name(instance), &owner, &role).await
}

/// A binding's login role in the app database: read-write acts as the owner role; read-only reads every table
/// of the app database's public schema, now and later.
pub(crate) async fn grant_binding(
    su: Superuser<'_>,
    database: &str,
    owner: &str,
    role: &str,
    password: &str,
    access: Access,
) -> Result<(), TaskError> {
    let mut conn = connect(&su("postgres"), "connecting to the instance's server").await?;
    if !database_exists(&mut conn, database).await? || !role_exists(&mut conn, owner).await? {
        return Err(TaskError::fatal(format!(
            "the app database {database} is missing on the instance's server (did provisioning fail?); \
             deprovision the instance and provision it again"
        )));
    }
    let grant = RoleGrant {
        database,
        owner,
        role,
        access,
    };
    make_binding_role(
        &mut conn,
        &su(database),
        "connecting to the app database",
        &grant,
        password,
    )
    .await
}

/// Creates (or re-passwords) the login role of `grant` and grants it its access. `admin` is a superuser
/// connection to the server; `database` reaches the role's database as superuser.
pub(crate) async fn make_binding_role(
    admin: &mut sqlx::PgConnection,
    database: &PgConnectOptions,
    connecting: &str,
    grant: &RoleGrant<'_>,
    password: &str,
) -> Result<(), TaskError> {
    ensure_login(admin, grant.role, "", password).await?;
    grant_access(admin, database, connecting, grant).await
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

/// A binding's non-secret details: where apps connect, its role, database and access.
pub(crate) fn binding_details(host: &str, port: u16, made: &BindingRole) -> Value {
    json!({
        "endpoints": [{ "host": host, "ports": [port.to_string()] }],
        "role": made.role,
        "database": made.database,
        "access": made.access.as_str(),
    })
}

/// A binding's credentials: a connection URL and the libpq variables (with `sslmode=require` when `tls`).
pub(crate) fn credentials(
    host: &str,
    port: u16,
    database: &str,
    user: &str,
    password: &str,
    tls: bool,
) -> Result<Map<String, Value>, TaskError> {
    let mut url = url::Url::parse("postgres://localhost/")
        .map_err(|e| TaskError::fatal(format!("building the connection URL: {e}")))?;
    let bad = |what: &str| {
        TaskError::fatal(format!(
            "building the connection URL: the {what} is not valid in a URL"
        ))
    };
    url.set_host(Some(host)).map_err(|_| bad("host"))?;
    url.set_port(Some(port)).map_err(|()| bad("port"))?;
    url.set_username(user).map_err(|()| bad("user name"))?;
    url.set_password(Some(password))
        .map_err(|()| bad("password"))?;
    url.set_path(database);
    if tls {
        url.set_query(Some("sslmode=require"));
    }
    let url: String = url.into();
    let mut map = Map::new();
    map.insert("DATABASE_URL".into(), Value::String(url.clone()));
    map.insert("uri".into(), Value::String(url));
    map.insert("PGHOST".into(), Value::String(host.into()));
    map.insert("PGPORT".into(), Value::String(port.to_string()));
    map.insert("PGDATABASE".into(), Value::String(database.into()));
    map.insert("PGUSER".into(), Value::String(user.into()));
    map.insert("PGPASSWORD".into(), Value::String(password.into()));
    if tls {
        map.insert("PGSSLMODE".into(), Value::String("require".into()));
    }
    Ok(map)
}
