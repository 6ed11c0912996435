//! Job operations on a worker's connection: tasks (start, poll, cancel, forget) and blobs
//! (push what the worker lacks, fetch what it produced), each bounded in time.

use ragd_shared::blobs::{BlobError, BlobStore, MAX_MANIFEST_LEN};
use ragd_shared::protocol::jobs::{
    BlobFetch, BlobId, BlobQuery, TaskRef, TaskRun, TaskStart, TaskState,
};
use ragd_shared::protocol::messages::{Request, Response};
use ragd_shared::transport::{self, TransportError};
use std::time::Duration;
use tokio::time::Instant;

/// How long a control request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts at moving one blob before giving up.
const BLOB_ATTEMPTS: u32 = 4;
/// Slowest transfer rate assumed when waiting for a blob (bytes/s), on top of a fixed allowance.
const MIN_RATE: u64 = 2 << 20;

/// Errors of remote operations.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// The request failed in transport (the worker may be gone).
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The worker answered something unexpected.
    #[error("worker answered {0}")]
    Unexpected(String),
    /// A blob operation failed.
    #[error(transparent)]
    Blob(#[from] BlobError),
    /// A blob did not arrive after every attempt.
    #[error("blob {blob} did not arrive intact after {attempts} attempts")]
    BlobNotDelivered {
        /// The blob.
        blob: BlobId,
        /// Attempts made.
        attempts: u32,
    },
}

async fn ask(conn: &quinn::Connection, req: Request) -> Result<Response, RemoteError> {
    match transport::request(conn, &req, REQUEST_TIMEOUT).await? {
        Response::Error(e) => Err(RemoteError::Unexpected(e.to_string())),
        other => Ok(other),
    }
}

/// Starts a task attempt.
pub async fn start(conn: &quinn::Connection, start: TaskStart) -> Result<TaskRef, RemoteError> {
    match ask(conn, Request::StartTask(Box::new(start))).await? {
        Response::TaskAccepted(r) => Ok(r),
        other => Err(RemoteError::Unexpected(format!("{other:?}"))),
    }
}

/// Forgets committed results, starts a task attempt and long-polls it, in one round trip
/// (protocol v3): the task's state when it ended or after the worker's long-poll wait.
pub async fn run(
    conn: &quinn::Connection,
    forget: Vec<TaskRef>,
    start: TaskStart,
) -> Result<TaskState, RemoteError> {
    match ask(conn, Request::RunTask(Box::new(TaskRun { forget, start }))).await? {
        Response::TaskStatus(s) => Ok(s.state),
        other => Err(RemoteError::Unexpected(format!("{other:?}"))),
    }
}

/// Polls a task attempt.
pub async fn poll(conn: &quinn::Connection, task: &TaskRef) -> Result<TaskState, RemoteError> {
    match ask(conn, Request::PollTask(task.clone())).await? {
        Response::TaskStatus(s) => Ok(s.state),
        other => Err(RemoteError::Unexpected(format!("{other:?}"))),
    }
}

/// Cancels a task attempt.
pub async fn cancel(conn: &quinn::Connection, task: &TaskRef) -> Result<TaskState, RemoteError> {
    match ask(conn, Request::CancelTask(task.clone())).await? {
        Response::TaskStatus(s) => Ok(s.state),
        other => Err(RemoteError::Unexpected(format!("{other:?}"))),
    }
}

/// Tells the worker a result is committed.
pub async fn forget(conn: &quinn::Connection, task: &TaskRef) -> Result<(), RemoteError> {
    ask(conn, Request::ForgetTask(task.clone()))
        .await
        .map(|_| ())
}

async fn holdings(
    conn: &quinn::Connection,
    ids: &[BlobId],
) -> Result<Vec<Option<u64>>, RemoteError> {
    match ask(
        conn,
        Request::QueryBlobs(BlobQuery {
            blobs: ids.to_vec(),
        }),
    )
    .await?
    {
        Response::BlobHoldings(h) if h.missing.len() == ids.len() => Ok(h.missing),
        other => Err(RemoteError::Unexpected(format!("{other:?}"))),
    }
}

/// Makes sure the worker holds every blob of `ids`, pushing only what it lacks (resuming
/// partial copies). Returns the bytes sent.
pub async fn push_blobs(
    conn: &quinn::Connection,
    store: &BlobStore,
    ids: &[BlobId],
) -> Result<u64, RemoteError> {
    let mut sent = 0;
    for id in ids {
        let mut attempts = 0;
        loop {
            let missing = holdings(conn, std::slice::from_ref(id)).await?;
            let Some(offset) = missing[0] else { break };
            if attempts >= BLOB_ATTEMPTS {
                return Err(RemoteError::BlobNotDelivered {
                    blob: *id,
                    attempts,
                });
            }
            attempts += 1;
            match store.push(conn, id, offset).await {
                Ok(n) => sent += n,
                Err(e @ BlobError::Missing { .. }) => return Err(e.into()),
                Err(e) => tracing::warn!(blob = %id, error = %e, "blob push failed; retrying"),
            }
            // The receiver seals the blob after the stream ends; give it a moment.
            wait_until(Duration::from_secs(5), || {
                let (conn, id) = (conn.clone(), *id);
                async move {
                    holdings(&conn, &[id])
                        .await
                        .map(|m| m[0].is_none())
                        .unwrap_or(false)
                }
            })
            .await;
        }
    }
    Ok(sent)
}

/// Pushes a bundle (its manifest and files) to the worker.
pub async fn push_bundle(
    conn: &quinn::Connection,
    store: &BlobStore,
    bundle: &BlobId,
) -> Result<u64, RemoteError> {
    let manifest = store.bundle(bundle)?;
    let mut ids: Vec<BlobId> = manifest.files.iter().map(|f| f.blob).collect();
    ids.push(*bundle);
    push_blobs(conn, store, &ids).await
}

/// Fetches a blob the worker holds into `store` (resuming a partial copy). The store admits
/// the push only from this connection and of the length the worker declares, at most `ceiling`
/// bytes for the whole blob (see `ragd_shared::blobs::Intake`).
pub async fn fetch_blob(
    conn: &quinn::Connection,
    store: &BlobStore,
    id: &BlobId,
    ceiling: u64,
) -> Result<(), RemoteError> {
    for _ in 0..BLOB_ATTEMPTS {
        if store.has(id) {
            return Ok(());
        }
        let offset = store.partial_len(id);
        let expecting = store.expect(conn.stable_id(), *id, offset, ceiling);
        let len = match ask(conn, Request::FetchBlob(BlobFetch { blob: *id, offset })).await? {
            Response::FetchStarted { len } => len,
            other => return Err(RemoteError::Unexpected(format!("{other:?}"))),
        };
        expecting.declare(len)?;
        let allowance = Duration::from_secs(10) + Duration::from_secs(len / MIN_RATE);
        wait_until(allowance, || {
            let has = store.has(id);
            async move { has }
        })
        .await;
    }
    if store.has(id) {
        Ok(())
    } else {
        Err(RemoteError::BlobNotDelivered {
            blob: *id,
            attempts: BLOB_ATTEMPTS,
        })
    }
}

/// Fetches a bundle the worker holds: the manifest (at most [`MAX_MANIFEST_LEN`] bytes), then
/// the files the store lacks, each of exactly the length the manifest gives.
pub async fn fetch_bundle(
    conn: &quinn::Connection,
    store: &BlobStore,
    bundle: &BlobId,
) -> Result<(), RemoteError> {
    fetch_blob(conn, store, bundle, MAX_MANIFEST_LEN).await?;
    let manifest = store.bundle(bundle)?;
    let total = manifest.total_len();
    if !store.has_all(manifest.files.iter().map(|f| &f.blob)) {
        store.check_space(total)?;
    }
    for f in &manifest.files {
        fetch_blob(conn, store, &f.blob, f.len).await?;
    }
    Ok(())
}

/// Polls `check` until it holds or `limit` passes: at once, then after pauses that double from
/// 2 ms up to 50 ms. What is waited for (a pushed blob sealed by its receiver) usually lands
/// within a few milliseconds, and each pause of a flat 50 ms cost a transfer that long.
async fn wait_until<F, Fut>(limit: Duration, check: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    let mut pause = Duration::from_millis(2);
    while start.elapsed() < limit {
        if check().await {
            return;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn waiting_checks_soon_then_backs_off_to_50_ms_and_stops_at_the_limit() {
        let start = Instant::now();
        let ready_at = start + Duration::from_millis(10);
        wait_until(Duration::from_secs(5), || async move {
            Instant::now() >= ready_at
        })
        .await;
        // Checked at 0, 2, 6 and 14 ms: seen 4 ms after it held, not at the first 50 ms tick.
        assert_eq!(start.elapsed(), Duration::from_millis(14));

        let start = Instant::now();
        let checks = std::sync::atomic::AtomicU32::new(0);
        wait_until(Duration::from_secs(1), || {
            checks.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async { false }
        })
        .await;
        let waited = start.elapsed();
        assert!(waited >= Duration::from_secs(1) && waited < Duration::from_millis(1060));
        // Checks at 0, 2, 6, 14, 30, 62 ms, then every 50 ms up to 962: 24 in a second.
        let n = checks.load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!(n, 24);
    }
}
