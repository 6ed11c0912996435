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
//! Checkpoints (copying the WAL back into the database file, with its fsyncs) run on a second
//! thread with its own connection, never inside a commit: SQLite's automatic checkpoint ran on
//! the committing connection and stalled every queued caller for 5-14 ms about once per 1,000
//! pages (`bench_coordinator`). The writer nudges the checkpointer every
//! [`CHECKPOINT_EVERY_COMMITS`] commits; it also runs every [`CHECKPOINT_INTERVAL`]. Its
//! checkpoints are PASSIVE (they never wait for the writer) unless the WAL has grown past
//! [`WAL_RESTART_FRAMES`], when one RESTART checkpoint waits for the writer and lets the WAL
//! start over, so the file stays bounded under a write stream that never pauses (how long it
//! may hold the writer up: [`super::db_busy`]).
//!
//! Two kinds of write skip part of that ([`WriteMode`]): a write of one statement needs no
//! savepoint (SQLite backs out a failing statement by itself), and a write whose loss in a crash
//! costs nothing but a repeat (a shard's lease: the shard stays pending and runs again; its
//! result is committed by (shard, attempt)) can be answered as soon as it has run, before its
//! batch commits.
//!
//! Ownership: [`Writer`] holds the queue's sender and both threads' handles; dropping it closes
//! the queue, the writer finishes what is queued and exits, then the checkpointer runs a last
//! checkpoint and exits; the drop joins both.

use futures::channel::oneshot;
use rusqlite::Connection;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

/// Most operations in one transaction.
pub(super) const MAX_BATCH: usize = 512;
/// Commits after which the writer asks for a checkpoint.
pub(super) const CHECKPOINT_EVERY_COMMITS: u64 = 64;
/// Longest time between checkpoints while the database is written to.
pub(super) const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(500);
/// WAL frames (pages) above which a checkpoint waits for the writer so the WAL can restart
/// (16,384 frames: 64 MiB at SQLite's default 4 KiB pages).
pub(super) const WAL_RESTART_FRAMES: i64 = 16_384;

/// One queued write: run inside the batch's transaction, then told how the commit went.
pub(super) trait WriteOp: Send {
    /// Runs the operation in its own savepoint on the writer's connection.
    fn apply(&mut self, conn: &Connection);
    /// Replies to the caller: `Ok` once the batch is committed, or the batch's failure.
    fn finish(self: Box<Self>, batch: Result<(), &rusqlite::Error>);
}

/// How a queued write runs and when its caller hears of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct WriteMode {
    /// Answer once the write has run in the batch's transaction, before the batch commits: the
    /// caller may act on a write that a crash or a failed commit then loses. Only for writes
    /// whose loss costs a repeat, never a wrong state.
    pub answer_when_applied: bool,
    /// Run the write in its own savepoint, so that a failure rolls back its earlier statements
    /// alone. A write of one statement (or reads, then its one write last) can go without:
    /// SQLite backs out a failing statement by itself, and savepoints journal every page the
    /// write touches a second time.
    pub savepoint: bool,
}

impl WriteMode {
    /// Answered once committed, in a savepoint: what every write gets unless it says otherwise.
    pub const DURABLE: Self = Self {
        answer_when_applied: false,
        savepoint: true,
    };
    /// One write statement (last, after any reads), answered once committed.
    pub const ONE_STATEMENT: Self = Self {
        answer_when_applied: false,
        savepoint: false,
    };
    /// One write statement, answered as soon as it has run (a shard's lease).
    pub const ONE_STATEMENT_EARLY: Self = Self {
        answer_when_applied: true,
        savepoint: false,
    };
}

/// Why a queued write failed: its own statement, or the commit of its batch.
#[derive(Debug)]
pub(super) enum WriteFailure {
    /// The write failed (and was backed out alone).
    Sqlite(rusqlite::Error),
    /// The write ran but its batch was not committed (or it was never run).
    Commit(String),
}

/// A queued write: its closure, its result once run, and where to answer.
pub(super) struct Queued<T, F> {
    mode: WriteMode,
    f: Option<F>,
    result: Option<rusqlite::Result<T>>,
    reply: Option<oneshot::Sender<Result<T, WriteFailure>>>,
}

impl<T, F> Queued<T, F> {
    /// A write of `f`, and the receiver of its answer.
    pub(super) fn new(mode: WriteMode, f: F) -> (Self, oneshot::Receiver<Result<T, WriteFailure>>) {
        let (reply, answer) = oneshot::channel();
        let op = Self {
            mode,
            f: Some(f),
            result: None,
            reply: Some(reply),
        };
        (op, answer)
    }
}

impl<T, F> WriteOp for Queued<T, F>
where
    T: Send,
    F: FnOnce(&Connection) -> rusqlite::Result<T> + Send,
{
    fn apply(&mut self, conn: &Connection) {
        let Some(f) = self.f.take() else { return };
        let result = if self.mode.savepoint {
            in_savepoint(conn, f)
        } else {
            f(conn)
        };
        if self.mode.answer_when_applied {
            if let Some(reply) = self.reply.take() {
                let _ = reply.send(result.map_err(WriteFailure::Sqlite));
            }
        } else {
            self.result = Some(result);
        }
    }

    fn finish(self: Box<Self>, batch: Result<(), &rusqlite::Error>) {
        let Some(reply) = self.reply else {
            if let Err(e) = batch {
                tracing::warn!(error = %e,
                    "a write answered before its batch committed is lost (a lease: its shard runs again)");
            }
            return;
        };
        let out = match (self.result, batch) {
            (Some(Err(e)), _) => Err(WriteFailure::Sqlite(e)),
            (Some(Ok(v)), Ok(())) => Ok(v),
            (_, Err(e)) => Err(WriteFailure::Commit(e.to_string())),
            (None, Ok(())) => Err(WriteFailure::Commit("the write was not run".into())),
        };
        let _ = reply.send(out);
    }
}

/// The writer thread and the queue to it.
#[derive(Debug)]
pub(super) struct Writer {
    queue: Option<mpsc::Sender<Box<dyn WriteOp>>>,
    thread: Option<JoinHandle<()>>,
    checkpointer: Option<JoinHandle<()>>,
    batches: Arc<AtomicU64>,
    checkpoints: Arc<AtomicU64>,
}

impl Writer {
    /// Starts the thread that owns `conn` (already configured: WAL, schema, automatic
    /// checkpoints off) and the checkpointer that owns `checkpoint_conn` (a second read-write
    /// connection to the same file).
    pub(super) fn spawn(
        conn: Connection,
        checkpoint_conn: Connection,
        path: PathBuf,
    ) -> std::io::Result<Self> {
        let (nudge, nudged) = mpsc::sync_channel::<()>(1);
        let checkpoints = Arc::new(AtomicU64::new(0));
        let counted_checkpoints = checkpoints.clone();
        let checkpoint_path = path.clone();
        let checkpointer = std::thread::Builder::new()
            .name("ragd-jobs-ckpt".into())
            .spawn(move || {
                checkpoint_loop(
                    checkpoint_conn,
                    nudged,
                    &checkpoint_path,
                    &counted_checkpoints,
                )
            })?;
        let (queue, rx) = mpsc::channel::<Box<dyn WriteOp>>();
        let batches = Arc::new(AtomicU64::new(0));
        let counted = batches.clone();
        let thread = std::thread::Builder::new()
            .name("ragd-jobs-db".into())
            .spawn(move || run(conn, rx, nudge, path, &counted))?;
        Ok(Self {
            queue: Some(queue),
            thread: Some(thread),
            checkpointer: Some(checkpointer),
            batches,
            checkpoints,
        })
    }

    /// Checkpoints run so far.
    #[cfg(test)]
    pub(super) fn checkpoints(&self) -> u64 {
        self.checkpoints.load(Ordering::SeqCst)
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
        // The writer's exit dropped the nudge sender: the checkpointer runs its last
        // checkpoint and ends.
        if let Some(t) = self.checkpointer.take() {
            let _ = t.join();
        }
        tracing::debug!(
            batches = self.batches.load(Ordering::SeqCst),
            checkpoints = self.checkpoints.load(Ordering::SeqCst),
            "job database writer stopped"
        );
    }
}

fn run(
    conn: Connection,
    rx: mpsc::Receiver<Box<dyn WriteOp>>,
    nudge: mpsc::SyncSender<()>,
    path: PathBuf,
    batches: &AtomicU64,
) {
    let mut batch: Vec<Box<dyn WriteOp>> = Vec::with_capacity(MAX_BATCH);
    let mut since_checkpoint = 0u64;
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
            since_checkpoint += 1;
            if since_checkpoint >= CHECKPOINT_EVERY_COMMITS {
                since_checkpoint = 0;
                // Full means a nudge is already waiting: one is enough.
                let _ = nudge.try_send(());
            }
        }
        for op in batch.drain(..) {
            op.finish(outcome.as_ref().map(|_| ()));
        }
    }
}

/// The checkpointer: a checkpoint when nudged, every [`CHECKPOINT_INTERVAL`] and once more when
/// the writer has stopped (its nudge sender dropped).
fn checkpoint_loop(
    mut conn: Connection,
    nudged: mpsc::Receiver<()>,
    path: &Path,
    count: &AtomicU64,
) {
    loop {
        let last = match nudged.recv_timeout(CHECKPOINT_INTERVAL) {
            Ok(()) | Err(mpsc::RecvTimeoutError::Timeout) => false,
            Err(mpsc::RecvTimeoutError::Disconnected) => true,
        };
        match checkpoint(&mut conn) {
            Ok(frames) => tracing::trace!(frames, "job database checkpoint"),
            Err(e) => {
                tracing::warn!(db = %path.display(), error = %e, "job database checkpoint failed")
            }
        }
        count.fetch_add(1, Ordering::SeqCst);
        if last {
            return;
        }
    }
}

/// One PASSIVE checkpoint (a RESTART one when the WAL is past [`WAL_RESTART_FRAMES`]); returns
/// the WAL's frames when it began. The RESTART holds the write lock while it waits for readers,
/// so it waits only briefly ([`super::db_busy::RESTART_WAIT`]) and, when a reader is still busy,
/// leaves the WAL to the next checkpoint; past four times the threshold it waits as long as any
/// connection does ([`super::db_busy::WAIT_LIMIT`]), so the WAL stays bounded under readers that
/// never pause.
fn checkpoint(conn: &mut Connection) -> rusqlite::Result<i64> {
    let frames = |conn: &Connection, mode: &str| {
        conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |row| {
            row.get::<_, i64>(1)
        })
    };
    let wal = frames(conn, "PASSIVE")?;
    if wal > 4 * WAL_RESTART_FRAMES {
        tracing::debug!(
            frames = wal,
            "job database WAL is large: restarting it, waiting for readers"
        );
        frames(conn, "RESTART")?;
    } else if wal > WAL_RESTART_FRAMES {
        tracing::debug!(frames = wal, "job database WAL is large: restarting it");
        // A RESTART that gives up says so in its row (busy = 1), not with an error.
        super::db_busy::waiting_briefly(conn, |c| frames(c, "RESTART"))?;
    }
    Ok(wal)
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
fn in_savepoint<T>(
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

    /// Runs `fut` on a thread of its own; its output comes on the returned channel.
    fn in_background<T: Send + 'static>(
        fut: impl std::future::Future<Output = T> + Send + 'static,
    ) -> mpsc::Receiver<T> {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(block_on(fut));
        });
        rx
    }

    #[test]
    fn a_shard_lease_is_answered_before_its_batch_commits() {
        let (_tmp, db) = db_with_tasks(3);
        let (go, held) = hold_writer(&db);
        let shard = in_background(db.lease_shard("j", "generate", "w1", 60_000));
        let durable = in_background(db.lease_next("j", "generate", "w2", 60_000));
        // Queued after both leases, so in their batch: it holds that batch open.
        let (finish, waiting) = mpsc::channel::<()>();
        let (running, started) = mpsc::channel::<()>();
        let last = db.submit(move |_| {
            running.send(()).unwrap();
            waiting.recv().unwrap();
            Ok(())
        });
        go.send(()).unwrap();
        block_on(held).unwrap();
        started.recv().unwrap();
        let leased = shard
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("the shard lease was not answered while its batch was open")
            .unwrap()
            .expect("a pending task");
        assert_eq!((leased.idx, leased.attempts), (0, 1));
        assert!(
            durable
                .recv_timeout(std::time::Duration::from_millis(200))
                .is_err(),
            "a durable lease was answered before its batch committed"
        );
        finish.send(()).unwrap();
        block_on(last).unwrap();
        let other = durable.recv().unwrap().unwrap().expect("a pending task");
        assert_eq!(other.idx, 1, "the second lease saw the first one's write");
        let counts = db.task_counts("j", "generate").unwrap();
        assert_eq!(counts, vec![("leased".into(), 2), ("pending".into(), 1)]);
    }

    #[test]
    fn a_failing_one_statement_write_is_backed_out_alone_without_a_savepoint() {
        let (_tmp, db) = db_with_tasks(2);
        let (go, held) = hold_writer(&db);
        let lease = db.lease_next("j", "generate", "w", 60_000);
        // A second row with task 1's id: the insert fails on the primary key.
        let bad = db.submit_as(super::WriteMode::ONE_STATEMENT, |c| {
            c.execute(
                "INSERT INTO tasks (id, job_id, stage, idx, state, payload)
                 SELECT id, job_id, stage, idx + 100, state, payload FROM tasks ORDER BY idx DESC",
                [],
            )
        });
        let commit = db.commit_task("j-generate-0", 1, "w", "out", 0.1);
        go.send(()).unwrap();
        block_on(held).unwrap();
        assert_eq!(block_on(lease).unwrap().unwrap().idx, 0);
        let err = block_on(bad).unwrap_err();
        assert!(err.to_string().contains("UNIQUE"), "{err}");
        assert!(block_on(commit).unwrap(), "the batch's other writes commit");
        let rows = db.tasks("j", "generate").unwrap();
        assert_eq!(rows.len(), 2, "none of the failing insert's rows is kept");
        assert_eq!(rows[0].state, "done");
    }

    #[test]
    fn the_checkpointer_copies_committed_pages_into_the_database_file() {
        let tmp = tempfile::tempdir().unwrap();
        let db = JobDb::open(tmp.path()).unwrap();
        db.create_job("j", "{}", &["generate"]).unwrap();
        let file_len = || std::fs::metadata(tmp.path().join("jobs.db")).unwrap().len();
        let before = db.writer_checkpoints();
        // About 2 MB of payloads in one commit: with automatic checkpoints off, only the
        // checkpointer can move them from the WAL into jobs.db.
        let payloads: Vec<String> = (0..2000).map(|i| format!("{i:0>1000}")).collect();
        db.ensure_tasks("j", "generate", &payloads).unwrap();
        let deadline = std::time::Instant::now() + 4 * super::CHECKPOINT_INTERVAL;
        while db.writer_checkpoints() < before + 2 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        // Two checkpoints after the commit began: at least one started after it ended.
        assert!(
            db.writer_checkpoints() >= before + 2,
            "no checkpoint within {:?}",
            4 * super::CHECKPOINT_INTERVAL
        );
        assert!(
            file_len() >= 2_000_000,
            "jobs.db is {} bytes after a checkpoint: the payloads stayed in the WAL",
            file_len()
        );
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
