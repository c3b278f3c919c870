//! The task-kind trait and the table of kinds a worker knows.

use std::{collections::HashMap, fmt, sync::Arc, time::Duration};

use async_trait::async_trait;

use crate::context::TaskContext;

/// One kind of task. Each kind is one struct in one file under `tasks/`, listed in [`crate::tasks::registry`].
#[async_trait]
pub trait TaskHandler: Send + Sync {
    /// The value of `tasks.kind` this handler serves.
    fn kind(&self) -> &'static str;

    /// Carries the task one step forward. Must be idempotent: delivery is at-least-once. A retry after a
    /// crash runs it again, and so does a crash after the step returned but before its outcome was
    /// written (plain successes and failures are written in batches a few milliseconds later): the task
    /// stays `running` until its lease expires, then runs once more.
    async fn run(&self, ctx: &TaskContext<'_>) -> Result<Step, TaskError>;
}

/// What a successful step asks of the queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// The task is finished.
    Done,
    /// Run again after `after` without spending an attempt (a VM booting, a cluster electing a leader);
    /// `progress` becomes the task's progress text.
    Wait { after: Duration, progress: String },
}

/// Why a step failed, and what the queue should do about it.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    /// Back off and try again, until `max_attempts`.
    #[error("{0:#}")]
    Retryable(anyhow::Error),
    /// Fail now; the message says what a person can do about it.
    #[error("{0:#}")]
    Fatal(anyhow::Error),
}

impl TaskError {
    pub fn fatal(message: impl fmt::Display + fmt::Debug + Send + Sync + 'static) -> Self {
        Self::Fatal(anyhow::anyhow!(message))
    }

    pub fn retryable(message: impl fmt::Display + fmt::Debug + Send + Sync + 'static) -> Self {
        Self::Retryable(anyhow::anyhow!(message))
    }

    pub fn is_fatal(&self) -> bool {
        matches!(self, Self::Fatal(_))
    }

    /// Adds what we were doing to the message, keeping the kind.
    pub fn context(self, what: impl fmt::Display + Send + Sync + 'static) -> Self {
        match self {
            Self::Retryable(e) => Self::Retryable(e.context(what)),
            Self::Fatal(e) => Self::Fatal(e.context(what)),
        }
    }
}

/// `?` on an `anyhow::Result` (usually after `.context("what we were doing")`) retries, unless the
/// cause is a bug: a statement Postgres cannot parse or a row that does not decode fails the same way
/// on every attempt, so it fails at once and says so rather than after ten retries.
impl From<anyhow::Error> for TaskError {
    fn from(err: anyhow::Error) -> Self {
        match bug_in(&err) {
            Some(what) => Self::Fatal(err.context(format!(
                "a bug in berth ({what}): retrying would fail the same way; please report it"
            ))),
            None => Self::Retryable(err),
        }
    }
}

/// What kind of bug, if any cause in the chain is one.
fn bug_in(err: &anyhow::Error) -> Option<&'static str> {
    err.chain()
        .filter_map(|cause| cause.downcast_ref::<sqlx::Error>())
        .find_map(sqlx_bug)
}

fn sqlx_bug(err: &sqlx::Error) -> Option<&'static str> {
    match err {
        sqlx::Error::ColumnNotFound(_)
        | sqlx::Error::ColumnIndexOutOfBounds { .. }
        | sqlx::Error::ColumnDecode { .. }
        | sqlx::Error::TypeNotFound { .. }
        | sqlx::Error::Decode(_)
        | sqlx::Error::Encode(_) => Some("a query does not match the rows it reads"),
        sqlx::Error::Database(db) => db
            .code()
            .filter(|code| STATEMENT_BUGS.contains(&code.as_ref()))
            .map(|_| "a statement Postgres rejects"),
        _ => None,
    }
}

/// SQLSTATEs that only a wrong statement raises: syntax, names that do not exist, type mismatches.
/// Not `42501` (privileges) or `42P01` (a table that may not exist yet): those can be passing.
const STATEMENT_BUGS: &[&str] = &[
    "42601", // syntax_error
    "42602", // invalid_name
    "42702", // ambiguous_column
    "42703", // undefined_column
    "42725", // ambiguous_function
    "42803", // grouping_error
    "42804", // datatype_mismatch
    "42846", // cannot_coerce
    "42883", // undefined_function
    "42P02", // undefined_parameter
    "42P08", // ambiguous_parameter
    "42P18", // indeterminate_datatype
];

/// The kinds a worker serves.
#[derive(Default, Clone)]
pub struct Registry {
    handlers: HashMap<&'static str, Arc<dyn TaskHandler>>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut kinds: Vec<_> = self.handlers.keys().collect();
        kinds.sort();
        f.debug_struct("Registry").field("kinds", &kinds).finish()
    }
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a handler. Panics when two handlers claim one kind: that is a programming error.
    pub fn with(mut self, handler: impl TaskHandler + 'static) -> Self {
        self.add(Arc::new(handler));
        self
    }

    pub fn add(&mut self, handler: Arc<dyn TaskHandler>) {
        let kind = handler.kind();
        let previous = self.handlers.insert(kind, handler);
        assert!(previous.is_none(), "task kind {kind:?} registered twice");
    }

    pub fn get(&self, kind: &str) -> Option<Arc<dyn TaskHandler>> {
        self.handlers.get(kind).cloned()
    }

    pub fn kinds(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.handlers.keys().copied()
    }
}
