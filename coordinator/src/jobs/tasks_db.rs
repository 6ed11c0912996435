//! The task table of `jobs.db`: shards and training attempts, their leases and results.
//! A result commits only while its attempt holds the lease, so a stale or repeated commit is
//! ignored; expired leases go back to pending, or are set aside after `max_attempts`.
//!
//! The dispatch path (lease, renew, commit, release) returns futures: each write is queued when
//! called and resolves once the writer thread has committed the batch holding it, so a hundred
//! lanes wait on one commit instead of taking turns at a lock ([`JobDb::lease_shard`] resolves
//! once run, before the commit). Each is one write statement, run without a savepoint.

use super::db::{JobDb, JobDbError, TaskRow};
use super::db_writer::WriteMode;
use crate::store::now_ms;
use rusqlite::{params, OptionalExtension};
use std::future::Future;

/// Puts a job's leases that expired before ?2 back. It reads the leased tasks only (the partial
/// index `tasks_leased`): sharded stages run it every tick, with any number of done tasks.
const EXPIRE_LEASES: &str =
    "UPDATE tasks SET state = CASE WHEN attempts >= ?3 THEN 'set_aside' ELSE 'pending' END,
       last_error = COALESCE(last_error, 'lease expired'), lease_worker = NULL, lease_expires_ms = NULL
     WHERE job_id = ?1 AND state = 'leased' AND lease_expires_ms < ?2";

/// Whether a stage has a task in state ?3 (an index lookup on `tasks_by_stage`).
const ANY_IN_STATE: &str =
    "SELECT EXISTS (SELECT 1 FROM tasks WHERE job_id = ?1 AND stage = ?2 AND state = ?3)";

/// What is left of a stage, as [`JobDb::open_tasks`] tells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenTasks {
    /// Some task waits for a lease.
    pub pending: bool,
    /// Some task is leased.
    pub leased: bool,
}

impl JobDb {
    /// Creates the tasks of a stage unless they exist (one transaction); returns how many exist.
    pub fn ensure_tasks(
        &self,
        job: &str,
        stage: &str,
        payloads: &[String],
    ) -> Result<usize, JobDbError> {
        let (job, stage, payloads) = (job.to_string(), stage.to_string(), payloads.to_vec());
        self.write(move |c| {
            let n: i64 = c.query_row(
                "SELECT COUNT(*) FROM tasks WHERE job_id = ?1 AND stage = ?2",
                params![job, stage],
                |r| r.get(0),
            )?;
            if n == 0 {
                let mut insert = c.prepare(
                    "INSERT INTO tasks (id, job_id, stage, idx, state, payload) VALUES (?1, ?2, ?3, ?4, 'pending', ?5)",
                )?;
                for (i, p) in payloads.iter().enumerate() {
                    insert.execute(params![format!("{job}-{stage}-{i}"), job, stage, i as i64, p])?;
                }
            }
            Ok(if n == 0 { payloads.len() } else { n as usize })
        })
    }

    fn task_from(r: &rusqlite::Row<'_>) -> rusqlite::Result<TaskRow> {
        Self::task_from_at(r, 0)
    }

    /// A task from the [`Self::TASK_COLS`] that start at column `at`.
    fn task_from_at(r: &rusqlite::Row<'_>, at: usize) -> rusqlite::Result<TaskRow> {
        Ok(TaskRow {
            id: r.get(at)?,
            job_id: r.get(at + 1)?,
            stage: r.get(at + 2)?,
            idx: r.get(at + 3)?,
            state: r.get(at + 4)?,
            attempts: r.get::<_, i64>(at + 5)? as u32,
            lease_worker: r.get(at + 6)?,
            payload: r.get(at + 7)?,
            output: r.get(at + 8)?,
            last_error: r.get(at + 9)?,
            done_by: r.get(at + 10)?,
            seconds: r.get(at + 11)?,
        })
    }

    const TASK_COLS: &'static str = "id, job_id, stage, idx, state, attempts, lease_worker, payload, output, last_error, done_by, seconds";

    /// The tasks of a stage, by index.
    pub fn tasks(&self, job: &str, stage: &str) -> Result<Vec<TaskRow>, JobDbError> {
        self.read(|c| {
            let mut st = c.prepare(&format!(
                "SELECT {} FROM tasks WHERE job_id = ?1 AND stage = ?2 ORDER BY idx",
                Self::TASK_COLS
            ))?;
            let rows = st.query_map(params![job, stage], Self::task_from)?;
            rows.collect()
        })
    }

    /// Leases the next pending task of a stage to `worker` for `ttl_ms`; the attempt number is
    /// the task's new attempt count. Queued when called; resolves once the lease is committed.
    pub fn lease_next(
        &self,
        job: &str,
        stage: &str,
        worker: &str,
        ttl_ms: u64,
    ) -> impl Future<Output = Result<Option<TaskRow>, JobDbError>> {
        self.lease(WriteMode::ONE_STATEMENT, job, stage, worker, ttl_ms)
    }

    /// [`Self::lease_next`] answered as soon as the lease has run in the writer's transaction,
    /// before its batch commits (about a millisecond sooner under load): for shards, whose
    /// repeat is harmless. A coordinator killed before the commit forgets the lease, so the
    /// shard is leased again after restart, possibly with the same attempt number, to the same
    /// or another worker: the same payload under the same (shard, attempt), a worker answers
    /// it from its own copy or runs it again, and a result is committed once.
    pub fn lease_shard(
        &self,
        job: &str,
        stage: &str,
        worker: &str,
        ttl_ms: u64,
    ) -> impl Future<Output = Result<Option<TaskRow>, JobDbError>> {
        self.lease(WriteMode::ONE_STATEMENT_EARLY, job, stage, worker, ttl_ms)
    }

    /// One lease: reads the next pending task, then its one write, by the rowid the read found
    /// (a lookup by the text id would search the primary key's index again).
    fn lease(
        &self,
        mode: WriteMode,
        job: &str,
        stage: &str,
        worker: &str,
        ttl_ms: u64,
    ) -> impl Future<Output = Result<Option<TaskRow>, JobDbError>> {
        let (job, stage, worker) = (job.to_string(), stage.to_string(), worker.to_string());
        self.submit_as(mode, move |c| {
            let found = c
                .prepare_cached(&format!(
                    "SELECT rowid, {} FROM tasks WHERE job_id = ?1 AND stage = ?2 AND state = 'pending' ORDER BY idx LIMIT 1",
                    Self::TASK_COLS
                ))?
                .query_row(params![job, stage], |r| {
                    Ok((r.get::<_, i64>(0)?, Self::task_from_at(r, 1)?))
                })
                .optional()?;
            let Some((rowid, mut row)) = found else {
                return Ok(None);
            };
            c.prepare_cached(
                "UPDATE tasks SET state = 'leased', attempts = attempts + 1, lease_worker = ?2, lease_expires_ms = ?3 WHERE rowid = ?1",
            )?
            .execute(params![rowid, worker, now_ms() as i64 + ttl_ms as i64])?;
            row.state = "leased".into();
            row.attempts += 1;
            row.lease_worker = Some(worker);
            Ok(Some(row))
        })
    }

    /// Extends a lease held by `(task, attempt)`; false when the lease was lost.
    pub fn renew(
        &self,
        task: &str,
        attempt: u32,
        ttl_ms: u64,
    ) -> impl Future<Output = Result<bool, JobDbError>> {
        let task = task.to_string();
        self.submit_as(WriteMode::ONE_STATEMENT, move |c| {
            c.prepare_cached(
                "UPDATE tasks SET lease_expires_ms = ?3 WHERE id = ?1 AND attempts = ?2 AND state = 'leased'",
            )?
            .execute(params![task, attempt, now_ms() as i64 + ttl_ms as i64])
            .map(|n| n == 1)
        })
    }

    /// Commits a result of `(task, attempt)` if that attempt still holds the lease; returns
    /// whether it was committed (a stale or repeated commit is ignored).
    pub fn commit_task(
        &self,
        task: &str,
        attempt: u32,
        worker: &str,
        output: &str,
        seconds: f64,
    ) -> impl Future<Output = Result<bool, JobDbError>> {
        let (task, worker, output) = (task.to_string(), worker.to_string(), output.to_string());
        self.submit_as(WriteMode::ONE_STATEMENT, move |c| {
            c.prepare_cached(
                "UPDATE tasks SET state = 'done', output = ?4, done_by = ?3, seconds = ?5, lease_worker = NULL, lease_expires_ms = NULL
                 WHERE id = ?1 AND attempts = ?2 AND state = 'leased'",
            )?
            .execute(params![task, attempt, worker, output, seconds])
            .map(|n| n == 1)
        })
    }

    /// Gives a leased attempt back: pending again, or set aside after `max_attempts`.
    pub fn release(
        &self,
        task: &str,
        attempt: u32,
        error: &str,
        max_attempts: u32,
    ) -> impl Future<Output = Result<(), JobDbError>> {
        let (task, error) = (task.to_string(), error.to_string());
        self.submit_as(WriteMode::ONE_STATEMENT, move |c| {
            c.prepare_cached(
                "UPDATE tasks SET state = CASE WHEN attempts >= ?4 THEN 'set_aside' ELSE 'pending' END,
                   last_error = ?3, lease_worker = NULL, lease_expires_ms = NULL
                 WHERE id = ?1 AND attempts = ?2 AND state = 'leased'",
            )?
            .execute(params![task, attempt, error, max_attempts])
            .map(|_| ())
        })
    }

    /// Puts every expired lease of a job back (pending, or set aside after `max_attempts`);
    /// with `all`, every lease (used at start-up). Resolves to how many once committed.
    pub fn expire_leases(
        &self,
        job: &str,
        all: bool,
        max_attempts: u32,
    ) -> impl Future<Output = Result<usize, JobDbError>> {
        let now = if all { i64::MAX } else { now_ms() as i64 };
        let job = job.to_string();
        self.submit_as(WriteMode::ONE_STATEMENT, move |c| {
            c.prepare_cached(EXPIRE_LEASES)?
                .execute(params![job, now, max_attempts])
        })
    }

    /// The leased tasks of a job: (task id, attempt, worker).
    pub fn leases(&self, job: &str) -> Result<Vec<(String, u32, String)>, JobDbError> {
        self.read(|c| {
            let mut st = c.prepare(
                "SELECT id, attempts, lease_worker FROM tasks WHERE job_id = ?1 AND state = 'leased' AND lease_worker IS NOT NULL",
            )?;
            let rows = st.query_map([job], |r| {
                Ok((r.get(0)?, r.get::<_, i64>(1)? as u32, r.get(2)?))
            })?;
            rows.collect()
        })
    }

    /// Whether a stage has tasks waiting for a lease, and tasks leased: two index lookups, however
    /// many tasks the stage has (what a sharded stage's loop asks every tick).
    pub fn open_tasks(&self, job: &str, stage: &str) -> Result<OpenTasks, JobDbError> {
        self.read(|c| {
            let mut any = c.prepare_cached(ANY_IN_STATE)?;
            let mut has = |state: &str| any.query_row(params![job, stage, state], |r| r.get(0));
            Ok(OpenTasks {
                pending: has("pending")?,
                leased: has("leased")?,
            })
        })
    }

    /// Whether some task of a stage is done (one index lookup): a restarted stage has results
    /// to use.
    pub fn any_done(&self, job: &str, stage: &str) -> Result<bool, JobDbError> {
        self.read(|c| {
            let mut any = c.prepare_cached(ANY_IN_STATE)?;
            any.query_row(params![job, stage, "done"], |r| r.get(0))
        })
    }

    /// Counts of a stage's tasks by state (reads every task of the stage: for views, not loops).
    pub fn task_counts(&self, job: &str, stage: &str) -> Result<Vec<(String, u64)>, JobDbError> {
        self.read(|c| {
            let mut st = c.prepare(
                "SELECT state, COUNT(*) FROM tasks WHERE job_id = ?1 AND stage = ?2 GROUP BY state ORDER BY state",
            )?;
            let rows = st.query_map(params![job, stage], |r| {
                Ok((r.get(0)?, r.get::<_, i64>(1)? as u64))
            })?;
            rows.collect()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::executor::block_on;

    #[test]
    fn leases_commit_once_per_attempt_and_failing_tasks_are_set_aside() {
        let tmp = tempfile::tempdir().unwrap();
        let db = JobDb::open(tmp.path()).unwrap();
        db.create_job("j", "{}", &["generate"]).unwrap();
        assert_eq!(
            db.ensure_tasks("j", "generate", &["a".into(), "b".into()])
                .unwrap(),
            2
        );
        assert_eq!(
            db.ensure_tasks("j", "generate", &["x".into()]).unwrap(),
            2,
            "idempotent"
        );
        let open = |pending, leased| OpenTasks { pending, leased };
        assert_eq!(db.open_tasks("j", "generate").unwrap(), open(true, false));
        let t = block_on(db.lease_next("j", "generate", "w1", 60_000))
            .unwrap()
            .unwrap();
        assert_eq!((t.idx, t.attempts), (0, 1));
        assert_eq!(db.open_tasks("j", "generate").unwrap(), open(true, true));
        assert!(!db.any_done("j", "generate").unwrap());
        assert!(block_on(db.commit_task(&t.id, 1, "w1", "out", 1.0)).unwrap());
        assert!(db.any_done("j", "generate").unwrap());
        assert!(!db.any_done("j", "embed").unwrap(), "per stage");
        assert!(
            !block_on(db.commit_task(&t.id, 1, "w1", "out", 1.0)).unwrap(),
            "no double commit"
        );
        let t2 = block_on(db.lease_next("j", "generate", "w2", 60_000))
            .unwrap()
            .unwrap();
        assert_eq!(t2.idx, 1);
        // Expired at start-up: back to pending; the old attempt can no longer commit.
        assert_eq!(block_on(db.expire_leases("j", true, 3)).unwrap(), 1);
        assert!(!block_on(db.commit_task(&t2.id, 1, "w2", "late", 1.0)).unwrap());
        for attempt in 2..=3 {
            let t = block_on(db.lease_next("j", "generate", "w2", 60_000))
                .unwrap()
                .unwrap();
            assert_eq!(t.attempts, attempt);
            block_on(db.release(&t.id, attempt, "boom", 3)).unwrap();
        }
        assert!(block_on(db.lease_next("j", "generate", "w2", 60_000))
            .unwrap()
            .is_none());
        let counts = db.task_counts("j", "generate").unwrap();
        assert_eq!(counts, vec![("done".into(), 1), ("set_aside".into(), 1)]);
        assert_eq!(db.open_tasks("j", "generate").unwrap(), open(false, false));
    }

    #[test]
    fn the_per_tick_queries_do_not_read_every_task() {
        let tmp = tempfile::tempdir().unwrap();
        let db = JobDb::open(tmp.path()).unwrap();
        let plan = |sql: &str| {
            db.read(|c| {
                let mut st = c.prepare(&format!("EXPLAIN QUERY PLAN {sql}"))?;
                let rows = st.query_map(params!["j", 0, 3], |r| r.get::<_, String>(3))?;
                rows.collect::<rusqlite::Result<Vec<_>>>()
            })
            .unwrap()
            .join("; ")
        };
        let expire = plan(EXPIRE_LEASES);
        assert!(expire.contains("USING INDEX tasks_leased"), "{expire}");
        let exists = plan(ANY_IN_STATE);
        assert!(
            exists.contains("job_id=? AND stage=? AND state=?"),
            "{exists}"
        );
    }

    #[test]
    fn stage_outputs_are_cached_by_input_key() {
        let tmp = tempfile::tempdir().unwrap();
        let db = JobDb::open(tmp.path()).unwrap();
        db.create_job("j", "{}", &["ingest", "generate"]).unwrap();
        db.stage_done("j", "generate", "{\"q\":1}", Some("k1"))
            .unwrap();
        assert_eq!(
            db.cached("generate", "k1").unwrap().as_deref(),
            Some("{\"q\":1}")
        );
        assert_eq!(db.cached("generate", "k2").unwrap(), None);
        let stages = db.stages("j").unwrap();
        assert_eq!(stages[0].name, "ingest");
        assert_eq!(stages[1].state, "done");
        assert!(matches!(db.job("nope"), Err(JobDbError::NoJob(_))));
    }
}
