//! What a binding role may do in its database: read-write acts as the owner role; read-only reads every table
//! of the public schema, now and later. Also the list of binding roles a restore grants again.

use broker::{
    db::bindings::BindingRow,
    names::{self, quote_ident, quote_literal},
};
use sqlx::{PgConnection, postgres::PgConnectOptions};

use super::sql::{connect, exec};
use crate::{providers::binding_access::Access, registry::TaskError, snapshots::BindingGrant};

/// What a read-only binding role gets in its database: SELECT on what is there and on what the owner makes
/// later. Arguments are quoted identifiers.
pub(crate) fn read_only_grants(role_q: &str, owner_q: &str) -> String {
    format!(
        "GRANT USAGE ON SCHEMA public TO {role_q};
         GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role_q};
         GRANT SELECT ON ALL SEQUENCES IN SCHEMA public TO {role_q};
         ALTER DEFAULT PRIVILEGES FOR ROLE {owner_q} IN SCHEMA public GRANT SELECT ON TABLES TO {role_q};
         ALTER DEFAULT PRIVILEGES FOR ROLE {owner_q} IN SCHEMA public GRANT SELECT ON SEQUENCES TO {role_q};"
    )
}

/// A binding role's place on the server: its database, the database's owner role, its access.
pub(crate) struct RoleGrant<'a> {
    pub database: &'a str,
    pub owner: &'a str,
    pub role: &'a str,
    pub access: Access,
}

/// Grants `grant.access` to an existing login role. `admin` is a superuser connection to the server; `database`
/// reaches the role's database as superuser (opened only for a read-only role's table grants), `connecting`
/// says so in errors.
pub(crate) async fn grant_access(
    admin: &mut PgConnection,
    database: &PgConnectOptions,
    connecting: &str,
    grant: &RoleGrant<'_>,
) -> Result<(), TaskError> {
    let (role_q, owner_q, db_q) = (
        quote_ident(grant.role),
        quote_ident(grant.owner),
        quote_ident(grant.database),
    );
    match grant.access {
        Access::ReadWrite => {
            exec(
                admin,
                &format!("GRANT {owner_q} TO {role_q}"),
                "making the binding role a member of the owner role",
            )
            .await?;
            // Objects the app creates belong to the owner role, so every binding sees and can change them.
            exec(
                admin,
                &format!(
                    "ALTER ROLE {role_q} SET role = {}",
                    quote_literal(grant.owner)
                ),
                "making the binding act as the owner role",
            )
            .await?;
        }
        Access::ReadOnly => {
            exec(
                admin,
                &format!("ALTER ROLE {role_q} SET default_transaction_read_only = on"),
                "making the binding role read-only",
            )
            .await?;
        }
    }
    exec(
        admin,
        &format!("GRANT CONNECT ON DATABASE {db_q} TO {role_q}"),
        "letting the binding role connect",
    )
    .await?;
    if grant.access == Access::ReadOnly {
        let mut db = connect(database, connecting).await?;
        exec(
            &mut db,
            &read_only_grants(&role_q, &owner_q),
            "granting the read-only binding role SELECT on the database's tables",
        )
        .await?;
    }
    Ok(())
}

/// The binding roles of `bindings` and whether each is read-only (for grants after a restore).
pub(crate) fn binding_grants(
    prefix: &str,
    bindings: &[BindingRow],
) -> Result<Vec<BindingGrant>, TaskError> {
    bindings
        .iter()
        .map(|b| {
            Ok(BindingGrant {
                role: names::binding_role(prefix, &b.id),
                read_only: Access::of(b)? == Access::ReadOnly,
            })
        })
        .collect()
}
