//! Waiting for a task to finish, for requests answered synchronously (no `accepts_incomplete=true`).
//!
//! One LISTEN connection per API process hears `berth_task_finished` (a trigger sends it, with the task id, when
//! an operation task becomes succeeded or failed) and wakes the requests waiting on that id. A request registers
//! before it reads the task's state, so a finish between the read and the wait still wakes it. When the listener
//! loses its connection, notifications may have been lost: once it listens again it wakes every waiter, and each
//! reads its task again. No request polls.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use broker::{
    db::tasks::{self, TaskRow},
    model::TaskId,
};
use sqlx::{
    PgPool,
    postgres::{PgListener, PgPoolOptions},
};
use tokio::{sync::Notify, time::Instant};
use tracing::warn;
use uuid::Uuid;

/// The channel the `tasks_notify_finished` trigger notifies.
pub const CHANNEL: &str = "berth_task_finished";

/// Pause before listening again after the connection failed.
const RECONNECT_PAUSE: Duration = Duration::from_secs(1);

type Waiters = HashMap<Uuid, Vec<(u64, Arc<Notify>)>>;

/// A handle on the process's listener and its waiters; cheap to clone.
#[derive(Clone)]
pub struct TaskWaits {
    db: PgPool,
    waiters: Arc<Mutex<Waiters>>,
    next_key: Arc<AtomicU64>,
}

impl std::fmt::Debug for TaskWaits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskWaits").finish_non_exhaustive()
    }
}

/// How a wait ended.
#[derive(Debug)]
pub enum Waited {
    /// The task succeeded or failed: its row.
    Finished(Box<TaskRow>),
    /// The time ran out first; the task goes on.
    TimedOut,
}

impl TaskWaits {
    /// Starts the listener on the current Tokio runtime. It stops when `db` is closed.
    pub fn start(db: PgPool) -> Self {
        let waits = Self {
            db,
            waiters: Arc::default(),
            next_key: Arc::default(),
        };
        tokio::spawn(listen(waits.db.clone(), waits.waiters.clone()));
        waits
    }

    /// Waits until task `id` has finished, at most `within`.
    pub async fn until_finished(&self, id: TaskId, within: Duration) -> sqlx::Result<Waited> {
        let deadline = Instant::now() + within;
        let registration = self.register(id.0);
        loop {
            let task = tasks::get(&self.db, id)
                .await?
                .ok_or(sqlx::Error::RowNotFound)?;
            if task.state.is_finished() {
                return Ok(Waited::Finished(Box::new(task)));
            }
            // A wake-up that came since registering is kept by `Notify` (one permit), so none is missed.
            if tokio::time::timeout_at(deadline, registration.wake.notified())
                .await
                .is_err()
            {
                return Ok(Waited::TimedOut);
            }
        }
    }

    fn register(&self, id: Uuid) -> Registration {
        let key = self.next_key.fetch_add(1, Ordering::Relaxed);
        let wake = Arc::new(Notify::new());
        lock(&self.waiters)
            .entry(id)
            .or_default()
            .push((key, wake.clone()));
        Registration {
            id,
            key,
            wake,
            waiters: self.waiters.clone(),
        }
    }
}

/// One waiting request; leaves the table when dropped (answered, timed out, or the client went away).
struct Registration {
    id: Uuid,
    key: u64,
    wake: Arc<Notify>,
    waiters: Arc<Mutex<Waiters>>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut waiters = lock(&self.waiters);
        if let Some(list) = waiters.get_mut(&self.id) {
            list.retain(|(key, _)| *key != self.key);
            if list.is_empty() {
                waiters.remove(&self.id);
            }
        }
    }
}

fn lock(waiters: &Mutex<Waiters>) -> std::sync::MutexGuard<'_, Waiters> {
    // The table stays consistent whatever panicked while holding it: every change is one call.
    waiters
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn wake(waiters: &Mutex<Waiters>, id: Uuid) {
    if let Some(list) = lock(waiters).get(&id) {
        for (_, wake) in list {
            wake.notify_one();
        }
    }
}

fn wake_all(waiters: &Mutex<Waiters>) {
    for list in lock(waiters).values() {
        for (_, wake) in list {
            wake.notify_one();
        }
    }
}

async fn listen(db: PgPool, waiters: Arc<Mutex<Waiters>>) {
    // A connection of its own, outside the request pool: the listener holds it for good, and requests (and the
    // pool's size, which operators tune) must not lose one to it. It closes with the request pool.
    let own = PgPoolOptions::new()
        .max_connections(1)
        .connect_lazy_with((*db.connect_options()).clone());
    tokio::select! {
        () = listen_on(&own, &waiters) => {}
        () = db.close_event() => {}
    }
    own.close().await;
}

async fn listen_on(own: &PgPool, waiters: &Mutex<Waiters>) {
    loop {
        let mut listener = match connect(own).await {
            Ok(listener) => listener,
            Err(e) => {
                warn!(error = %e, "cannot listen for finished tasks; trying again");
                tokio::time::sleep(RECONNECT_PAUSE).await;
                continue;
            }
        };
        // Listening (again): whatever finished while nobody listened has not been heard.
        wake_all(waiters);
        loop {
            match listener.try_recv().await {
                Ok(Some(notification)) => match Uuid::parse_str(notification.payload()) {
                    Ok(id) => wake(waiters, id),
                    Err(_) => warn!(
                        payload = notification.payload(),
                        "a task-finished notice without a task id"
                    ),
                },
                // The connection was lost and listens again (sqlx re-subscribes): re-check everyone.
                Ok(None) => wake_all(waiters),
                Err(e) => {
                    warn!(error = %e, "lost the listener for finished tasks");
                    break;
                }
            }
        }
        tokio::time::sleep(RECONNECT_PAUSE).await;
    }
}

async fn connect(db: &PgPool) -> sqlx::Result<PgListener> {
    let mut listener = PgListener::connect_with(db).await?;
    listener.listen(CHANNEL).await?;
    Ok(listener)
}
