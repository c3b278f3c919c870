//! The id of the API request being served, kept in a task-local for the request's whole handling: every task the
//! request writes takes it ([`crate::db::tasks::NewTask::new`]), so a worker's log lines of that task carry the
//! request's id without each route handing it along. Workers set it while a task runs, for the tasks it enqueues.

use std::future::Future;

tokio::task_local! {
    static REQUEST_ID: String;
}

/// Runs `work` with `id` as the current request id.
pub async fn scope<F: Future>(id: String, work: F) -> F::Output {
    REQUEST_ID.scope(id, work).await
}

/// The current request id, if this runs inside [`scope`].
pub fn current_id() -> Option<String> {
    REQUEST_ID.try_with(Clone::clone).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_id_is_seen_inside_the_scope_only() {
        assert_eq!(current_id(), None);
        let inside = scope("r-1".into(), async { current_id() }).await;
        assert_eq!(inside.as_deref(), Some("r-1"));
        assert_eq!(current_id(), None);
    }
}
