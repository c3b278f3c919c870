//! Group commit for new provisions: the fast path's insert (instance row + first task) of many concurrent
//! requests goes to the database as one statement, one commit and one NOTIFY, instead of one each.
//!
//! No timer: a few writers take turns at the queue; a writer takes whatever is waiting (at most [`BATCH`])
//! and writes it, and what arrives meanwhile is the next writer's batch. A lone request is written at once;
//! under load each commit carries many. A request is answered only after its batch has committed, so a 202
//! still means the task is durable.
//!
//! A request is written only while someone waits for its answer: a writer takes its connection first, then
//! drops the jobs whose requester is gone (a 408, a client that disconnected) or that are too old to be answered
//! before the request timeout, and only then writes. A batch that fails because the database cannot be reached
//! answers every request 503 at once (the platform retries); a batch that fails on its data is retried one
//! request at a time, so one request's error never becomes another's.

use std::{
    collections::HashSet,
    sync::Arc,
    time::{Duration, Instant},
};

use broker::{
    db::{
        instances::{self, NewInstance, PendingInstance},
        tasks::NewTask,
    },
    model::TaskId,
};
use sqlx::PgPool;
use tokio::sync::{Mutex, mpsc, oneshot};
use tracing::warn;

use crate::{
    REQUEST_TIMEOUT,
    error::{ApiError, ApiResult, is_connection_error},
};

/// Most provisions in one statement.
const BATCH: usize = 128;
/// Requests waiting for a writer before new ones wait for room.
const QUEUE: usize = 4 * BATCH;
/// A job not written this long after it was queued is answered 503 instead: its write could otherwise commit
/// after the request has been answered 408 (which tells the platform nothing was done).
const WRITE_DEADLINE: Duration = REQUEST_TIMEOUT.saturating_sub(Duration::from_secs(5));

struct Job {
    instance: PendingInstance,
    task: NewTask,
    queued_at: Instant,
    /// `Some(task)`: inserted; `None`: the id exists (the caller takes the slow path).
    reply: oneshot::Sender<ApiResult<Option<TaskId>>>,
}

impl Job {
    /// Whether the request still waits for this job, answering it 503 if it is too old to be written.
    fn still_wanted(&mut self) -> bool {
        if self.reply.is_closed() {
            return false;
        }
        if self.queued_at.elapsed() > WRITE_DEADLINE {
            let reply = std::mem::replace(&mut self.reply, oneshot::channel().0);
            let _ = reply.send(Err(unavailable()));
            return false;
        }
        true
    }
}

fn unavailable() -> ApiError {
    ApiError::Unavailable("the broker's database is not answering; retry the request".into())
}

/// A handle on the writers; cloned into every request's state. The writers stop when the last handle goes.
#[derive(Clone)]
pub struct ProvisionBatcher {
    db: PgPool,
    jobs: mpsc::Sender<Job>,
}

impl std::fmt::Debug for ProvisionBatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProvisionBatcher").finish_non_exhaustive()
    }
}

impl ProvisionBatcher {
    /// Starts `writers` writers on the current Tokio runtime. More than one lets a batch be written while the
    /// next one gathers; each holds a pool connection only while it writes.
    pub fn start(db: PgPool, writers: usize) -> Self {
        let (jobs, queue) = mpsc::channel(QUEUE);
        let queue = Arc::new(Mutex::new(queue));
        for _ in 0..writers.max(1) {
            tokio::spawn(write_batches(db.clone(), queue.clone()));
        }
        Self { db, jobs }
    }

    /// [`instances::insert_with_task`], batched with concurrent calls: `Some(task id)` when the instance and
    /// its task were inserted (and committed), `None` when the id exists already and nothing was written.
    pub async fn insert(&self, new: &NewInstance<'_>, task: NewTask) -> ApiResult<Option<TaskId>> {
        let (reply, answer) = oneshot::channel();
        let job = Job {
            instance: new.to_pending(),
            task: task.clone(),
            queued_at: Instant::now(),
            reply,
        };
        if self.jobs.send(job).await.is_ok()
            && let Ok(result) = answer.await
        {
            return result;
        }
        // The writers are gone (the server is stopping, or one panicked with our job): write it alone.
        Ok(instances::insert_with_task(&self.db, new, &task).await?)
    }
}

async fn write_batches(db: PgPool, queue: Arc<Mutex<mpsc::Receiver<Job>>>) {
    let mut batch: Vec<Job> = Vec::with_capacity(BATCH);
    loop {
        {
            let mut queue = queue.lock().await;
            let Some(first) = queue.recv().await else {
                return;
            };
            batch.push(first);
            while batch.len() < BATCH {
                match queue.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
        }
        write(&db, std::mem::take(&mut batch)).await;
    }
}

async fn write(db: &PgPool, jobs: Vec<Job>) {
    // The connection first: waiting for it is where a request outlives its client while the database is down.
    let mut conn = match db.acquire().await {
        Ok(conn) => conn,
        Err(e) => {
            warn!(error = %e, batch = jobs.len(), "no database connection for a batch of provisions");
            for job in jobs {
                let _ = job.reply.send(Err(unavailable()));
            }
            return;
        }
    };
    let jobs: Vec<Job> = jobs
        .into_iter()
        .filter_map(|mut job| job.still_wanted().then_some(job))
        .collect();
    // Ids must be distinct within a statement: a repeated id (the same PUT twice at once) is answered
    // "exists", and its slow path waits for this batch's row and compares.
    let mut seen = HashSet::with_capacity(jobs.len());
    let (unique, repeated): (Vec<Job>, Vec<Job>) = jobs
        .into_iter()
        .partition(|job| seen.insert(job.instance.id.clone()));
    let rows: Vec<(PendingInstance, NewTask)> = unique
        .iter()
        .map(|job| (job.instance.clone(), job.task.clone()))
        .collect();
    if rows.is_empty() {
        return;
    }
    match instances::insert_many_with_tasks(&mut *conn, &rows).await {
        Ok(inserted) => {
            let inserted: HashSet<String> = inserted.into_iter().collect();
            for job in unique {
                let outcome = inserted.contains(&job.instance.id).then_some(job.task.id);
                let _ = job.reply.send(Ok(outcome));
            }
        }
        Err(e) if is_connection_error(&e) => {
            warn!(error = %e, batch = rows.len(), "a batch of provisions lost the database; answering 503");
            for job in unique {
                let _ = job.reply.send(Err(unavailable()));
            }
        }
        Err(e) => {
            warn!(error = %e, batch = rows.len(), "a batch of provisions failed; writing them one at a time");
            for mut job in unique {
                if !job.still_wanted() {
                    continue;
                }
                let new = NewInstance {
                    id: &job.instance.id,
                    service_id: &job.instance.service_id,
                    plan_id: &job.instance.plan_id,
                    organization_guid: &job.instance.organization_guid,
                    space_guid: &job.instance.space_guid,
                    context: &job.instance.context,
                    parameters: &job.instance.parameters,
                    maintenance_version: job.instance.maintenance_version.as_deref(),
                };
                let result = instances::insert_with_task(&mut *conn, &new, &job.task).await;
                let _ = job.reply.send(result.map_err(ApiError::from));
            }
        }
    }
    for job in repeated {
        let _ = job.reply.send(Ok(None));
    }
}
