//! The writer of `jobs.db`: one OS thread owns the database's only write connection and commits
//! what callers queue in batches (group commit).
//!
//! A caller queues an operation (a closure over the connection) and waits for its reply, which
//! comes only once the batch holding it is committed: an acknowledged write is durable. The
//! thread takes the first queued operation, then every other one already queued (up to
//! [`MAX_BATCH`]), runs them in one `BEGIN IMMEDIATE` transaction, each in its own savepoint (an
//! operation that fails is rolled back alone and gets its own error), commits once and replies to
//! all. Under load a hundred leases and commits cost one commit instead of a hundred, and no
//! caller holds a lock while another waits; when idle, a lone operation commits at once.
//!
//! Ownership: [`Writer`] holds the queue's sender and the thread's handle; dropping it closes the
//! queue, the thread finishes what is queued and exits, and the drop joins it.

use rusqlite::Connection;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

/// Most operations in one transaction.
pub(super) const MAX_BATCH: usize = 512;

/// One queued write: run inside the batch's transaction, then told how the commit went.
pub(super) trait WriteOp: Send {
    /// Runs the operation in its own savepoint on the writer's connection.
    fn apply(&mut self, conn: &Connection);
    /// Replies to the caller: `Ok` once the batch is committed, or the batch's failure.
    fn finish(self: Box<Self>, batch: Result<(), &rusqlite::Error>);
}

/// The writer thread and the queue to it.
#[derive(Debug)]
pub(super) struct Writer {
    queue: Option<mpsc::Sender<Box<dyn WriteOp>>>,
    thread: Option<JoinHandle<()>>,
    batches: Arc<AtomicU64>,
}

impl Writer {
    /// Starts the thread that owns `conn` (already configured: WAL, schema).
    pub(super) fn spawn(conn: Connection, path: PathBuf) -> std::io::Result<Self> {
        let (queue, rx) = mpsc::channel::<Box<dyn WriteOp>>();
        let batches = Arc::new(AtomicU64::new(0));
        let counted = batches.clone();
        let thread = std::thread::Builder::new()
            .name("ragd-jobs-db".into())
            .spawn(move || run(conn, rx, path, &counted))?;
        Ok(Self {
            queue: Some(queue),
            thread: Some(thread),
            batches,
        })
    }

    /// Batches run so far (committed or not).
    #[cfg(test)]
    pub(super) fn batches(&self) -> u64 {
        self.batches.load(Ordering::SeqCst)
    }

    /// Queues `op`; gives it back if the thread has stopped.
    pub(super) fn send(&self, op: Box<dyn WriteOp>) -> Result<(), Box<dyn WriteOp>> {
        match &self.queue {
            Some(q) => q.send(op).map_err(|e| e.0),
            None => Err(op),
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        drop(self.queue.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        tracing::debug!(
            batches = self.batches.load(Ordering::SeqCst),
            "job database writer stopped"
        );
    }
}

fn run(conn: Connection, rx: mpsc::Receiver<Box<dyn WriteOp>>, path: PathBuf, batches: &AtomicU64) {
    let mut batch: Vec<Box<dyn WriteOp>> = Vec::with_capacity(MAX_BATCH);
    while let Ok(first) = rx.recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        let n = batch.len();
        let outcome = commit_batch(&conn, &mut batch);
        batches.fetch_add(1, Ordering::SeqCst);
        if let Err(e) = &outcome {
            tracing::warn!(db = %path.display(), ops = n, error = %e, "job database batch not committed");
        } else {
            tracing::trace!(ops = n, "job database batch committed");
        }
        for op in batch.drain(..) {
            op.finish(outcome.as_ref().map(|_| ()));
        }
    }
}

/// Runs `batch` in one transaction; on failure nothing of it is kept.
fn commit_batch(conn: &Connection, batch: &mut [Box<dyn WriteOp>]) -> rusqlite::Result<()> {
    run_cached(conn, "BEGIN IMMEDIATE")?;
    for op in batch.iter_mut() {
        op.apply(conn);
    }
    if let Err(e) = run_cached(conn, "COMMIT") {
        let _ = conn.execute_batch("ROLLBACK");
        return Err(e);
    }
    Ok(())
}

/// Runs a statement without parameters from the connection's statement cache (the transaction
/// and savepoint statements run for every write: parsing them each time cost a third of the
/// writer's time in `bench_coordinator`).
fn run_cached(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(|_| ())
}

/// Runs `f` in a savepoint: kept if it succeeds, rolled back (alone) if it fails.
pub(super) fn in_savepoint<T>(
    conn: &Connection,
    f: impl FnOnce(&Connection) -> rusqlite::Result<T>,
) -> rusqlite::Result<T> {
    run_cached(conn, "SAVEPOINT op")?;
    match f(conn) {
        Ok(v) => {
            run_cached(conn, "RELEASE op")?;
            Ok(v)
        }
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK TO op; RELEASE op");
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::db::{JobDb, JobDbError};
    use futures::executor::block_on;
    use futures::future::join_all;
    use std::collections::BTreeSet;
    use std::sync::mpsc;

    /// Queues a write that holds the writer until `go` is sent; returns once the writer runs it.
    fn hold_writer(
        db: &JobDb,
    ) -> (
        mpsc::Sender<()>,
        impl std::future::Future<Output = Result<(), JobDbError>>,
    ) {
        let (go, wait) = mpsc::channel::<()>();
        let (running, started) = mpsc::channel::<()>();
        let held = db.submit(move |_| {
            running.send(()).unwrap();
            wait.recv().unwrap();
            Ok(())
        });
        started.recv().unwrap();
        (go, held)
    }

    fn db_with_tasks(n: usize) -> (tempfile::TempDir, JobDb) {
        let tmp = tempfile::tempdir().unwrap();
        let db = JobDb::open(tmp.path()).unwrap();
        db.create_job("j", "{}", &["generate"]).unwrap();
        let payloads: Vec<String> = (0..n).map(|i| format!("p{i}")).collect();
        db.ensure_tasks("j", "generate", &payloads).unwrap();
        (tmp, db)
    }

    #[test]
    fn writes_queued_while_the_writer_is_busy_commit_as_one_batch() {
        let (_tmp, db) = db_with_tasks(60);
        let (go, held) = hold_writer(&db);
        let before = db.writer_batches();
        // Queued when called, all while the writer is held.
        let leases: Vec<_> = (0..50)
            .map(|i| db.lease_next("j", "generate", &format!("w{i}"), 60_000))
            .collect();
        go.send(()).unwrap();
        block_on(held).unwrap();
        let rows: Vec<_> = block_on(join_all(leases))
            .into_iter()
            .map(|r| r.unwrap().expect("a pending task"))
            .collect();
        let idx: BTreeSet<i64> = rows.iter().map(|r| r.idx).collect();
        assert_eq!(idx, (0..50).collect(), "every lease got its own task");
        assert_eq!(
            db.writer_batches() - before,
            2,
            "the held write's batch, then one for the fifty leases"
        );
        let counts = db.task_counts("j", "generate").unwrap();
        assert_eq!(counts, vec![("leased".into(), 50), ("pending".into(), 10)]);
    }

    #[test]
    fn a_failing_write_is_rolled_back_alone() {
        let (_tmp, db) = db_with_tasks(2);
        let (go, held) = hold_writer(&db);
        let lease = db.lease_next("j", "generate", "w", 60_000);
        let bad = db.submit(|c| {
            c.execute("UPDATE tasks SET state = 'done' WHERE idx = 1", [])?;
            c.execute("INSERT INTO no_such_table VALUES (1)", [])
        });
        let other = db.lease_next("j", "generate", "w", 60_000);
        go.send(()).unwrap();
        block_on(held).unwrap();
        assert_eq!(block_on(lease).unwrap().unwrap().idx, 0);
        let err = block_on(bad).unwrap_err();
        assert!(
            err.to_string().contains("no_such_table"),
            "the failing write gets its own error: {err}"
        );
        // Its first statement was rolled back with it: task 1 is still pending and leasable.
        assert_eq!(block_on(other).unwrap().unwrap().idx, 1);
    }

    #[test]
    fn writes_survive_reopening_and_the_writer_stops_with_the_handle() {
        let (tmp, db) = db_with_tasks(1);
        let t = block_on(db.lease_next("j", "generate", "w", 60_000))
            .unwrap()
            .unwrap();
        assert!(block_on(db.commit_task(&t.id, t.attempts, "w", "out", 0.5)).unwrap());
        drop(db); // joins the writer thread
        let db = JobDb::open(tmp.path()).unwrap();
        let rows = db.tasks("j", "generate").unwrap();
        assert_eq!(rows[0].state, "done");
        assert_eq!(rows[0].output.as_deref(), Some("out"));
    }
}
