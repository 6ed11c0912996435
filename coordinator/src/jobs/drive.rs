//! Runs one task attempt on a worker to its end: start it, poll it every `poll_interval`
//! (renewing its lease in the database), hand progress to the caller, and tell apart a task that
//! failed, a worker that is gone and a job that was cancelled.

use super::db::JobDb;
use super::remote;
use crate::registry::{Registry, WorkerState};
use crate::supervisor::Supervisor;
use ragd_shared::blobs::BlobStore;
use ragd_shared::protocol::jobs::{TaskOutput, TaskProgress, TaskRef, TaskStart, TaskState};
use ragd_shared::protocol::RUN_TASK_VERSION;
use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// What the job machinery shares.
#[derive(Clone)]
pub struct JobCtx {
    /// Durable state.
    pub db: Arc<JobDb>,
    /// The coordinator's blob store.
    pub blobs: BlobStore,
    /// Live worker connections.
    pub supervisor: Arc<Supervisor>,
    /// Worker states and capabilities.
    pub registry: Arc<Registry>,
    /// The state directory.
    pub state_dir: PathBuf,
    /// How often running tasks are polled.
    pub poll_interval: Duration,
    /// How long a lease lasts without a successful poll.
    pub lease_ttl: Duration,
    /// Live progress lines per job, for `jobs show` and `--follow`.
    pub live: Arc<Mutex<HashMap<String, HashMap<String, String>>>>,
}

impl JobCtx {
    /// Sets a live progress line of a job (`key` = "train", "generate", ...).
    pub fn set_live(&self, job: &str, key: &str, line: String) {
        self.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(job.to_string())
            .or_default()
            .insert(key.to_string(), line);
    }

    /// A job's live progress lines.
    pub fn live_lines(&self, job: &str) -> Vec<(String, String)> {
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        live.get(job)
            .map(|m| {
                let mut v: Vec<_> = m.iter().map(|(k, l)| (k.clone(), l.clone())).collect();
                v.sort();
                v
            })
            .unwrap_or_default()
    }

    /// Whether the worker is connected and answering.
    pub fn worker_ready(&self, id: &str) -> bool {
        matches!(
            self.registry.state_of(id),
            Some(WorkerState::Ready | WorkerState::Busy)
        ) && self.supervisor.connection(id).is_some()
    }
}

/// How an attempt ended, when not with an output.
#[derive(Debug, Clone, PartialEq)]
pub enum DriveError {
    /// The task failed on the worker.
    Failed {
        /// The worker's message.
        message: String,
        /// Whether another attempt may succeed.
        retryable: bool,
    },
    /// The worker is gone (connection lost, polls failing past the lease).
    Lost(String),
    /// The database says another attempt holds the task now.
    LeaseLost,
    /// The job was cancelled (the remote task was told to stop).
    Cancelled,
}

impl std::fmt::Display for DriveError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DriveError::Failed { message, .. } => write!(f, "{message}"),
            DriveError::Lost(why) => write!(f, "worker lost: {why}"),
            DriveError::LeaseLost => write!(f, "lease lost to another attempt"),
            DriveError::Cancelled => write!(f, "cancelled"),
        }
    }
}

/// Runs `start` on `worker` until it ends, first telling the worker to forget the results in
/// `forget` (committed earlier). `on_progress` sees every poll's progress. With `leased`, every
/// poll renews the task's lease in the database and a lost lease ends the run.
///
/// A worker that speaks protocol v3 gets one `RunTask` (forget, start and the first long poll in
/// one round trip: a short task ends there); an older one gets the separate requests.
pub async fn drive<F, Fut>(
    ctx: &JobCtx,
    worker: &str,
    start: TaskStart,
    forget: Vec<TaskRef>,
    leased: bool,
    cancel: &CancellationToken,
    mut on_progress: F,
) -> Result<TaskOutput, DriveError>
where
    F: FnMut(TaskProgress) -> Fut,
    Fut: Future<Output = ()>,
{
    let task: TaskRef = start.task.clone();
    let Some(conn) = ctx.supervisor.connection(worker) else {
        return Err(DriveError::Lost("not connected".into()));
    };
    let version = ctx.registry.protocol_version(worker).unwrap_or(0);
    let mut first = None;
    if version >= RUN_TASK_VERSION {
        match remote::run(&conn, forget, start).await {
            Ok(state) => first = Some(state),
            Err(e) => return Err(DriveError::Lost(e.to_string())),
        }
    } else {
        for done in &forget {
            let _ = remote::forget(&conn, done).await;
        }
        if let Err(e) = remote::start(&conn, start).await {
            return Err(DriveError::Lost(e.to_string()));
        }
    }
    let ttl_ms = ctx.lease_ttl.as_millis() as u64;
    let max_misses = (ctx.lease_ttl.as_millis() / ctx.poll_interval.as_millis().max(1)).max(2);
    let mut misses = 0u128;
    // Polls are long polls: the worker answers when the task ends or after about a second with
    // its progress, so the end is seen at once and a running task is polled about once a second.
    loop {
        if conn.close_reason().is_some()
            || matches!(
                ctx.registry.state_of(worker),
                Some(WorkerState::Unreachable)
            )
        {
            return Err(DriveError::Lost("connection closed".into()));
        }
        let polled = match first.take() {
            Some(state) => Ok(state),
            None => tokio::select! {
                _ = cancel.cancelled() => {
                    let _ = remote::cancel(&conn, &task).await;
                    return Err(DriveError::Cancelled);
                }
                polled = remote::poll(&conn, &task) => polled,
            },
        };
        match polled {
            Ok(TaskState::Running(p)) => {
                misses = 0;
                match ctx.db.renew(&task.task_id, task.attempt, ttl_ms).await {
                    _ if !leased => {}
                    Ok(true) => {}
                    Ok(false) => {
                        let _ = remote::cancel(&conn, &task).await;
                        return Err(DriveError::LeaseLost);
                    }
                    Err(e) => tracing::warn!(error = %e, "lease renewal not recorded"),
                }
                on_progress(p).await;
            }
            Ok(TaskState::Done(out)) => return Ok(out),
            Ok(TaskState::Failed { message, retryable }) => {
                return Err(DriveError::Failed { message, retryable })
            }
            Ok(TaskState::Cancelled) => {
                return Err(DriveError::Failed {
                    message: "the worker stopped the task (shutting down?)".into(),
                    retryable: true,
                })
            }
            Ok(TaskState::Unknown) => {
                return Err(DriveError::Failed {
                    message: "the worker no longer knows the task (it restarted)".into(),
                    retryable: true,
                })
            }
            Err(e) => {
                misses += 1;
                if misses >= max_misses {
                    return Err(DriveError::Lost(e.to_string()));
                }
                tokio::select! {
                    _ = cancel.cancelled() => {}
                    _ = tokio::time::sleep(ctx.poll_interval) => {}
                }
            }
        }
    }
}
