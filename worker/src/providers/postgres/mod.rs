//! The Postgres admin toolkit every Postgres engine (`shared`, `local`, `ec2`, `ha_local`, `ha_ec2`) and the
//! snapshot steps use; it imports no engine. Names reach SQL only through `quote_ident` / `quote_literal`,
//! passwords only as SCRAM verifiers.
//!
//! - [`sql`]: running statements (`exec`, `exec_tolerating`, `exists`, `connect`)
//! - [`errors`]: Postgres errors sorted into Retryable and Fatal
//! - [`roles`]: roles and login roles (`ensure_role`, `ensure_login`, `lock_out`, `drop_role`)
//! - [`scram`]: SCRAM-SHA-256 verifiers sent instead of passwords
//! - [`databases`]: `database_exists`, `ensure_database`
//! - [`extensions`]: the allow-list, the `extensions` parameter, `create_extensions`
//! - [`grants`]: what a binding role may do in its database; the grants a restore gives again
//! - [`bindings`]: a binding's login role made and dropped, its credentials and details
//! - [`app_database`]: the app database and admin user on a server of an instance's own
//! - [`rename`]: a pooled server's database and roles renamed for the instance that takes it
//! - [`replication`]: the replicas a primary sees streaming
//! - [`server_params`]: the parameters such a server is made with
//! - [`tuning`]: `tuning_profile` → postgresql.conf settings

pub(crate) mod app_database;
pub(crate) mod bindings;
pub(crate) mod databases;
pub mod errors;
pub(crate) mod extensions;
pub(crate) mod grants;
pub(crate) mod rename;
pub(crate) mod replication;
pub(crate) mod roles;
pub mod scram;
pub(crate) mod server_params;
pub(crate) mod sql;
pub mod tuning;

pub(crate) use super::binding_access::Access;
pub use errors::classify;
pub use extensions::ALLOWED_EXTENSIONS;
pub(crate) use {
    app_database::{AppDatabase, DEFAULT_APP_DB, add_extensions, app_db_name, set_up},
    bindings::{
        BindingRole, ServerAccess, bind_role, binding_details, credentials, grant_binding_role,
        make_binding_role, revoke_binding_role,
    },
    databases::{close_to_public, database_exists, ensure_database},
    extensions::{create_extensions, requested_extensions},
    grants::{RoleGrant, binding_grants, read_only_grants},
    rename::{pooled_renames, rename_statements},
    replication::streaming_replicas,
    roles::{drop_role, ensure_role, lock_out, members_of, role_exists},
    server_params::{DEFAULT_ADMIN, ServerParams},
    sql::{connect, exec, exec_tolerating},
};
