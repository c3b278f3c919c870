//! Replication as a primary sees it.

use super::{errors::classify, sql::Sql};

/// Replicas streaming from the primary `conn` is connected to, by its own account.
pub(crate) fn streaming_replicas(conn: &mut sqlx::PgConnection) -> Sql<'_, usize> {
    Box::pin(async move {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'",
        )
        .fetch_one(conn)
        .await
        .map_err(|e| classify(e, "counting the streaming replicas"))?;
        Ok(usize::try_from(n).unwrap_or_default())
    })
}
