//! Postgres errors of a server berth administers (the shared server, local engine servers), sorted into "try again" and "a person must act".

use crate::registry::TaskError;

/// Maps a Postgres error met while doing `what` (never SQL text: it may carry a password) to Retryable or
/// Fatal. Connection trouble, timeouts, serialization failures, locks and server restarts retry; missing
/// permissions, refused logins and bad requests fail with a sentence saying what to fix.
pub fn classify(err: sqlx::Error, what: &str) -> TaskError {
    match &err {
        sqlx::Error::Database(db) => {
            let code = db.code().map(|c| c.to_string()).unwrap_or_default();
            let message = db.message().to_string();
            let class = code.get(..2).unwrap_or("");
            match (class, code.as_str()) {
                (_, "42501") => TaskError::Fatal(anyhow::anyhow!(
                    "{what}: permission denied on the Postgres server ({message}); berth's admin role there \
                     (SHARED_POSTGRES_URL for the shared plan) needs to be a superuser (or hold CREATEROLE and CREATEDB)"
                )),
                ("28", _) => TaskError::Fatal(anyhow::anyhow!(
                    "{what}: the Postgres server refused berth's admin login ({message}); check \
                     SHARED_POSTGRES_URL (shared plan) or the server's superuser-password file (local engine)"
                )),
                ("0A" | "22" | "42" | "58", _) => {
                    TaskError::Fatal(anyhow::anyhow!("{what}: {message} (SQLSTATE {code})"))
                }
                // connection exception, transaction rollback (serialization, deadlock), insufficient
                // resources, object in use / lock not available, operator intervention, internal error
                _ => TaskError::Retryable(anyhow::anyhow!("{what}: {message} (SQLSTATE {code})")),
            }
        }
        sqlx::Error::Configuration(_) => TaskError::Fatal(anyhow::anyhow!(
            "{what}: the admin connection settings are not usable (SHARED_POSTGRES_URL for the shared plan)"
        )),
        // I/O, TLS, protocol, pool timeouts: the server or the network is having a moment.
        _ => TaskError::Retryable(anyhow::anyhow!("{what}: {err}")),
    }
}

/// The SQLSTATE of a database error, if it is one.
pub fn code(err: &sqlx::Error) -> Option<String> {
    match err {
        sqlx::Error::Database(db) => db.code().map(|c| c.to_string()),
        _ => None,
    }
}
