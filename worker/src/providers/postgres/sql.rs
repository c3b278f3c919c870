//! Running admin SQL: one statement, a statement whose "already done" errors count as success, an existence
//! check, a connection. Errors are classified by [`super::errors::classify`].

use std::{future::Future, pin::Pin};

use sqlx::{Connection, PgConnection, postgres::PgConnectOptions};

use super::errors::{classify, code};
use crate::registry::TaskError;

/// Boxed, `Send` futures for the SQL helpers: sqlx's executor bounds are higher-ranked, and proving `Send`
/// for them inside `#[async_trait]` bodies trips a compiler limitation; boxing checks each helper on its own.
pub(crate) type Sql<'a, T> = Pin<Box<dyn Future<Output = Result<T, TaskError>> + Send + 'a>>;

/// Runs one statement (or several, `;`-separated). `what` describes it for errors; the statement itself never
/// reaches a message or a log (it may name a role's password verifier). Not prepared, so not cached.
pub(crate) fn exec<'a>(conn: &'a mut PgConnection, sql: &'a str, what: &'a str) -> Sql<'a, ()> {
    Box::pin(async move {
        sqlx::Executor::execute(&mut *conn, sqlx::raw_sql(sql))
            .await
            .map_err(|e| classify(e, what))?;
        Ok(())
    })
}

/// Like [`exec`], but an error with one of the SQLSTATEs in `tolerated` counts as done; `false` then.
pub(crate) fn exec_tolerating<'a>(
    conn: &'a mut PgConnection,
    sql: &'a str,
    tolerated: &'a [&'a str],
    what: &'a str,
) -> Sql<'a, bool> {
    Box::pin(async move {
        match sqlx::Executor::execute(&mut *conn, sqlx::raw_sql(sql)).await {
            Ok(_) => Ok(true),
            Err(e) if code(&e).is_some_and(|c| tolerated.contains(&c.as_str())) => Ok(false),
            Err(e) => Err(classify(e, what)),
        }
    })
}

/// Runs a `SELECT EXISTS (...)` query with `name` bound as `$1`.
pub(crate) fn exists<'a>(
    conn: &'a mut PgConnection,
    sql: &'static str,
    name: &'a str,
    what: &'a str,
) -> Sql<'a, bool> {
    Box::pin(async move {
        sqlx::query_scalar::<_, bool>(sql)
            .bind(name)
            .fetch_one(&mut *conn)
            .await
            .map_err(|e| classify(e, what))
    })
}

pub(crate) fn connect<'a>(options: &'a PgConnectOptions, what: &'a str) -> Sql<'a, PgConnection> {
    Box::pin(async move {
        PgConnection::connect_with(options)
            .await
            .map_err(|e| classify(e, what))
    })
}
