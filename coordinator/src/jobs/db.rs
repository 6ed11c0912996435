//! Durable job state: `jobs.db` (SQLite, WAL, synchronous NORMAL) in the state directory.
//!
//! Tables: jobs, stages (each stage's state and output), tasks (shards and training attempts with
//! their lease), events (the job's log), losses, calibrations, stage_cache (outputs by input key)
//! and models (the registry). Every state change is one transaction, so a coordinator killed at
//! any moment restarts from a consistent state: leased tasks go back to pending, a committed task
//! result is never committed twice ([`JobDb::commit_task`] checks the attempt).

use crate::store::now_ms;
use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Errors of the job database.
#[derive(Debug, thiserror::Error)]
pub enum JobDbError {
    /// SQLite failed.
    #[error("job database {path}: {source}")]
    Sqlite {
        /// The database file.
        path: PathBuf,
        /// Cause.
        source: rusqlite::Error,
    },
    /// No such job.
    #[error("no job {0:?}; `ragd-coord jobs` lists them")]
    NoJob(String),
}

/// A task row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskRow {
    /// Task id.
    pub id: String,
    /// Job.
    pub job_id: String,
    /// Stage.
    pub stage: String,
    /// Shard index.
    pub idx: i64,
    /// `pending`, `leased`, `done`, `set_aside`.
    pub state: String,
    /// Attempts started.
    pub attempts: u32,
    /// Holder of the lease.
    pub lease_worker: Option<String>,
    /// Input (JSON).
    pub payload: String,
    /// Output (JSON) once done.
    pub output: Option<String>,
    /// Last error.
    pub last_error: Option<String>,
    /// Who completed it.
    pub done_by: Option<String>,
    /// Seconds the completing attempt took.
    pub seconds: Option<f64>,
}

/// A stage row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageRow {
    /// Stage name.
    pub name: String,
    /// `pending`, `running`, `done`, `failed`.
    pub state: String,
    /// Output (JSON).
    pub output: Option<String>,
    /// Where it ran.
    pub ran_on: Option<String>,
    /// Why there.
    pub why: Option<String>,
    /// Start (unix ms).
    pub started_ms: Option<u64>,
    /// End (unix ms).
    pub finished_ms: Option<u64>,
}

/// A job row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRow {
    /// Job id.
    pub id: String,
    /// The submitted spec (JSON).
    pub spec: String,
    /// `running`, `succeeded`, `failed`, `cancelled`.
    pub state: String,
    /// Created (unix ms).
    pub created_ms: u64,
    /// Last change (unix ms).
    pub updated_ms: u64,
    /// Why it failed.
    pub error: Option<String>,
}

/// A registered model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelRow {
    /// Model id (the job's id).
    pub id: String,
    /// Where the model directory is.
    pub path: String,
    /// Evaluation summary (JSON).
    pub eval: String,
    /// Whether it is the promoted (active) model.
    pub active: bool,
    /// Registered (unix ms).
    pub created_ms: u64,
    /// Last promoted (unix ms).
    pub promoted_ms: Option<u64>,
}

/// Handle to `jobs.db`.
#[derive(Debug)]
pub struct JobDb {
    path: PathBuf,
    conn: Mutex<Connection>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, spec TEXT NOT NULL, state TEXT NOT NULL,
  created_ms INTEGER NOT NULL, updated_ms INTEGER NOT NULL, error TEXT);
CREATE TABLE IF NOT EXISTS stages (job_id TEXT NOT NULL, name TEXT NOT NULL, state TEXT NOT NULL,
  output TEXT, ran_on TEXT, why TEXT, started_ms INTEGER, finished_ms INTEGER,
  PRIMARY KEY (job_id, name));
CREATE TABLE IF NOT EXISTS tasks (id TEXT PRIMARY KEY, job_id TEXT NOT NULL, stage TEXT NOT NULL,
  idx INTEGER NOT NULL, state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
  lease_worker TEXT, lease_expires_ms INTEGER, payload TEXT NOT NULL, output TEXT,
  last_error TEXT, done_by TEXT, seconds REAL);
CREATE INDEX IF NOT EXISTS tasks_by_stage ON tasks (job_id, stage, state, idx);
CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL,
  ts_ms INTEGER NOT NULL, message TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS losses (job_id TEXT NOT NULL, step INTEGER NOT NULL, loss REAL NOT NULL,
  PRIMARY KEY (job_id, step));
CREATE TABLE IF NOT EXISTS calibrations (worker TEXT NOT NULL, model TEXT NOT NULL,
  device TEXT NOT NULL, pairs_per_sec REAL NOT NULL, measured_ms INTEGER NOT NULL,
  PRIMARY KEY (worker, model));
CREATE TABLE IF NOT EXISTS stage_cache (stage TEXT NOT NULL, input_key TEXT NOT NULL,
  output TEXT NOT NULL, PRIMARY KEY (stage, input_key));
CREATE TABLE IF NOT EXISTS checkpoints (job_id TEXT PRIMARY KEY, step INTEGER NOT NULL,
  bundle TEXT NOT NULL, worker TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS models (id TEXT PRIMARY KEY, path TEXT NOT NULL, eval TEXT NOT NULL,
  active INTEGER NOT NULL DEFAULT 0, created_ms INTEGER NOT NULL, promoted_ms INTEGER);
";

impl JobDb {
    /// Opens (creating) `jobs.db` in `dir`.
    pub fn open(dir: &Path) -> Result<Self, JobDbError> {
        let path = dir.join("jobs.db");
        let err = |source| JobDbError::Sqlite {
            path: path.clone(),
            source,
        };
        let conn = Connection::open(&path).map_err(err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(err)?;
        // WAL with synchronous=NORMAL: a commit survives the coordinator being killed (SIGKILL)
        // at any moment; only an OS crash or power loss can drop the last commits, and those are
        // task results or leases that are then redone (commits are idempotent by attempt). FULL
        // fsynced every lease and commit and halved dispatch throughput (bench_coordinator).
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(err)?;
        conn.execute_batch(SCHEMA).map_err(err)?;
        Ok(Self {
            path,
            conn: Mutex::new(conn),
        })
    }

    pub(super) fn with<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>,
    ) -> Result<T, JobDbError> {
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut conn).map_err(|source| JobDbError::Sqlite {
            path: self.path.clone(),
            source,
        })
    }

    /// Records a new job and its stages (one transaction).
    pub fn create_job(&self, id: &str, spec: &str, stages: &[&str]) -> Result<(), JobDbError> {
        let now = now_ms() as i64;
        self.with(|c| {
            let tx = c.transaction()?;
            tx.execute(
                "INSERT INTO jobs (id, spec, state, created_ms, updated_ms) VALUES (?1, ?2, 'running', ?3, ?3)",
                params![id, spec, now],
            )?;
            for s in stages {
                tx.execute(
                    "INSERT INTO stages (job_id, name, state) VALUES (?1, ?2, 'pending')",
                    params![id, s],
                )?;
            }
            tx.execute(
                "INSERT INTO events (job_id, ts_ms, message) VALUES (?1, ?2, 'job submitted')",
                params![id, now],
            )?;
            tx.commit()
        })
    }

    /// Sets a job's state (and error).
    pub fn set_job_state(
        &self,
        id: &str,
        state: &str,
        error: Option<&str>,
    ) -> Result<(), JobDbError> {
        self.with(|c| {
            c.execute(
                "UPDATE jobs SET state = ?2, error = ?3, updated_ms = ?4 WHERE id = ?1",
                params![id, state, error, now_ms() as i64],
            )
            .map(|_| ())
        })
    }

    fn job_from(r: &rusqlite::Row<'_>) -> rusqlite::Result<JobRow> {
        Ok(JobRow {
            id: r.get(0)?,
            spec: r.get(1)?,
            state: r.get(2)?,
            created_ms: r.get::<_, i64>(3)? as u64,
            updated_ms: r.get::<_, i64>(4)? as u64,
            error: r.get(5)?,
        })
    }

    /// One job.
    pub fn job(&self, id: &str) -> Result<JobRow, JobDbError> {
        self.with(|c| {
            c.query_row(
                "SELECT id, spec, state, created_ms, updated_ms, error FROM jobs WHERE id = ?1",
                [id],
                Self::job_from,
            )
            .optional()
        })?
        .ok_or_else(|| JobDbError::NoJob(id.to_string()))
    }

    /// Every job, newest first.
    pub fn jobs(&self) -> Result<Vec<JobRow>, JobDbError> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT id, spec, state, created_ms, updated_ms, error FROM jobs ORDER BY created_ms DESC",
            )?;
            let rows = st.query_map([], Self::job_from)?;
            rows.collect()
        })
    }

    /// The stages of a job, in pipeline order.
    pub fn stages(&self, job: &str) -> Result<Vec<StageRow>, JobDbError> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT name, state, output, ran_on, why, started_ms, finished_ms FROM stages WHERE job_id = ?1 ORDER BY rowid",
            )?;
            let rows = st.query_map([job], |r| {
                Ok(StageRow {
                    name: r.get(0)?,
                    state: r.get(1)?,
                    output: r.get(2)?,
                    ran_on: r.get(3)?,
                    why: r.get(4)?,
                    started_ms: r.get::<_, Option<i64>>(5)?.map(|v| v as u64),
                    finished_ms: r.get::<_, Option<i64>>(6)?.map(|v| v as u64),
                })
            })?;
            rows.collect()
        })
    }

    /// Marks a stage running.
    pub fn stage_started(&self, job: &str, stage: &str) -> Result<(), JobDbError> {
        self.with(|c| {
            c.execute(
                "UPDATE stages SET state = 'running', started_ms = COALESCE(started_ms, ?3) WHERE job_id = ?1 AND name = ?2",
                params![job, stage, now_ms() as i64],
            )
            .map(|_| ())
        })
    }

    /// Records where a stage runs and why.
    pub fn stage_placed(
        &self,
        job: &str,
        stage: &str,
        ran_on: &str,
        why: &str,
    ) -> Result<(), JobDbError> {
        self.with(|c| {
            c.execute(
                "UPDATE stages SET ran_on = ?3, why = ?4 WHERE job_id = ?1 AND name = ?2",
                params![job, stage, ran_on, why],
            )
            .map(|_| ())
        })
    }

    /// Marks a stage done with its output; optionally caches the output under `input_key`.
    pub fn stage_done(
        &self,
        job: &str,
        stage: &str,
        output: &str,
        input_key: Option<&str>,
    ) -> Result<(), JobDbError> {
        self.with(|c| {
            let tx = c.transaction()?;
            tx.execute(
                "UPDATE stages SET state = 'done', output = ?3, finished_ms = ?4 WHERE job_id = ?1 AND name = ?2",
                params![job, stage, output, now_ms() as i64],
            )?;
            if let Some(key) = input_key {
                tx.execute(
                    "INSERT OR REPLACE INTO stage_cache (stage, input_key, output) VALUES (?1, ?2, ?3)",
                    params![stage, key, output],
                )?;
            }
            tx.commit()
        })
    }

    /// A cached output of `stage` for `input_key`.
    pub fn cached(&self, stage: &str, input_key: &str) -> Result<Option<String>, JobDbError> {
        self.with(|c| {
            c.query_row(
                "SELECT output FROM stage_cache WHERE stage = ?1 AND input_key = ?2",
                params![stage, input_key],
                |r| r.get(0),
            )
            .optional()
        })
    }

    /// Appends a line to the job's log.
    pub fn event(&self, job: &str, message: &str) -> Result<(), JobDbError> {
        tracing::info!(job, "{message}");
        self.with(|c| {
            c.execute(
                "INSERT INTO events (job_id, ts_ms, message) VALUES (?1, ?2, ?3)",
                params![job, now_ms() as i64, message],
            )
            .map(|_| ())
        })
    }

    /// The job's log after sequence number `after`: (seq, unix ms, message).
    pub fn events(&self, job: &str, after: i64) -> Result<Vec<(i64, u64, String)>, JobDbError> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT seq, ts_ms, message FROM events WHERE job_id = ?1 AND seq > ?2 ORDER BY seq",
            )?;
            let rows = st.query_map(params![job, after], |r| {
                Ok((r.get(0)?, r.get::<_, i64>(1)? as u64, r.get(2)?))
            })?;
            rows.collect()
        })
    }

    /// Creates the tasks of a stage unless they exist (one transaction); returns how many exist.
    pub fn ensure_tasks(
        &self,
        job: &str,
        stage: &str,
        payloads: &[String],
    ) -> Result<usize, JobDbError> {
        self.with(|c| {
            let tx = c.transaction()?;
            let n: i64 = tx.query_row(
                "SELECT COUNT(*) FROM tasks WHERE job_id = ?1 AND stage = ?2",
                params![job, stage],
                |r| r.get(0),
            )?;
            if n == 0 {
                for (i, p) in payloads.iter().enumerate() {
                    tx.execute(
                        "INSERT INTO tasks (id, job_id, stage, idx, state, payload) VALUES (?1, ?2, ?3, ?4, 'pending', ?5)",
                        params![format!("{job}-{stage}-{i}"), job, stage, i as i64, p],
                    )?;
                }
            }
            tx.commit()?;
            Ok(if n == 0 { payloads.len() } else { n as usize })
        })
    }

    fn task_from(r: &rusqlite::Row<'_>) -> rusqlite::Result<TaskRow> {
        Ok(TaskRow {
            id: r.get(0)?,
            job_id: r.get(1)?,
            stage: r.get(2)?,
            idx: r.get(3)?,
            state: r.get(4)?,
            attempts: r.get::<_, i64>(5)? as u32,
            lease_worker: r.get(6)?,
            payload: r.get(7)?,
            output: r.get(8)?,
            last_error: r.get(9)?,
            done_by: r.get(10)?,
            seconds: r.get(11)?,
        })
    }

    const TASK_COLS: &'static str = "id, job_id, stage, idx, state, attempts, lease_worker, payload, output, last_error, done_by, seconds";

    /// The tasks of a stage, by index.
    pub fn tasks(&self, job: &str, stage: &str) -> Result<Vec<TaskRow>, JobDbError> {
        self.with(|c| {
            let mut st = c.prepare(&format!(
                "SELECT {} FROM tasks WHERE job_id = ?1 AND stage = ?2 ORDER BY idx",
                Self::TASK_COLS
            ))?;
            let rows = st.query_map(params![job, stage], Self::task_from)?;
            rows.collect()
        })
    }

    /// Leases the next pending task of a stage to `worker` for `ttl_ms`; the attempt number is
    /// the task's new attempt count.
    pub fn lease_next(
        &self,
        job: &str,
        stage: &str,
        worker: &str,
        ttl_ms: u64,
    ) -> Result<Option<TaskRow>, JobDbError> {
        let now = now_ms() as i64;
        self.with(|c| {
            let tx = c.transaction()?;
            let row = tx
                .query_row(
                    &format!(
                        "SELECT {} FROM tasks WHERE job_id = ?1 AND stage = ?2 AND state = 'pending' ORDER BY idx LIMIT 1",
                        Self::TASK_COLS
                    ),
                    params![job, stage],
                    Self::task_from,
                )
                .optional()?;
            let Some(mut row) = row else {
                return Ok(None);
            };
            tx.execute(
                "UPDATE tasks SET state = 'leased', attempts = attempts + 1, lease_worker = ?2, lease_expires_ms = ?3 WHERE id = ?1",
                params![row.id, worker, now + ttl_ms as i64],
            )?;
            tx.commit()?;
            row.state = "leased".into();
            row.attempts += 1;
            row.lease_worker = Some(worker.to_string());
            Ok(Some(row))
        })
    }

    /// Extends a lease held by `(task, attempt)`; false when the lease was lost.
    pub fn renew(&self, task: &str, attempt: u32, ttl_ms: u64) -> Result<bool, JobDbError> {
        self.with(|c| {
            c.execute(
                "UPDATE tasks SET lease_expires_ms = ?3 WHERE id = ?1 AND attempts = ?2 AND state = 'leased'",
                params![task, attempt, now_ms() as i64 + ttl_ms as i64],
            )
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
    ) -> Result<bool, JobDbError> {
        self.with(|c| {
            c.execute(
                "UPDATE tasks SET state = 'done', output = ?4, done_by = ?3, seconds = ?5, lease_worker = NULL, lease_expires_ms = NULL
                 WHERE id = ?1 AND attempts = ?2 AND state = 'leased'",
                params![task, attempt, worker, output, seconds],
            )
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
    ) -> Result<(), JobDbError> {
        self.with(|c| {
            c.execute(
                "UPDATE tasks SET state = CASE WHEN attempts >= ?4 THEN 'set_aside' ELSE 'pending' END,
                   last_error = ?3, lease_worker = NULL, lease_expires_ms = NULL
                 WHERE id = ?1 AND attempts = ?2 AND state = 'leased'",
                params![task, attempt, error, max_attempts],
            )
            .map(|_| ())
        })
    }

    /// Puts every expired lease of a job back (pending, or set aside after `max_attempts`);
    /// with `all`, every lease (used at start-up). Returns how many.
    pub fn expire_leases(
        &self,
        job: &str,
        all: bool,
        max_attempts: u32,
    ) -> Result<usize, JobDbError> {
        let now = if all { i64::MAX } else { now_ms() as i64 };
        self.with(|c| {
            c.execute(
                "UPDATE tasks SET state = CASE WHEN attempts >= ?3 THEN 'set_aside' ELSE 'pending' END,
                   last_error = COALESCE(last_error, 'lease expired'), lease_worker = NULL, lease_expires_ms = NULL
                 WHERE job_id = ?1 AND state = 'leased' AND lease_expires_ms < ?2",
                params![job, now, max_attempts],
            )
        })
    }

    /// The leased tasks of a job: (task id, attempt, worker).
    pub fn leases(&self, job: &str) -> Result<Vec<(String, u32, String)>, JobDbError> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT id, attempts, lease_worker FROM tasks WHERE job_id = ?1 AND state = 'leased' AND lease_worker IS NOT NULL",
            )?;
            let rows = st.query_map([job], |r| {
                Ok((r.get(0)?, r.get::<_, i64>(1)? as u32, r.get(2)?))
            })?;
            rows.collect()
        })
    }

    /// Counts of a stage's tasks by state.
    pub fn task_counts(&self, job: &str, stage: &str) -> Result<Vec<(String, u64)>, JobDbError> {
        self.with(|c| {
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
        let t = db
            .lease_next("j", "generate", "w1", 60_000)
            .unwrap()
            .unwrap();
        assert_eq!((t.idx, t.attempts), (0, 1));
        assert!(db.commit_task(&t.id, 1, "w1", "out", 1.0).unwrap());
        assert!(
            !db.commit_task(&t.id, 1, "w1", "out", 1.0).unwrap(),
            "no double commit"
        );
        let t2 = db
            .lease_next("j", "generate", "w2", 60_000)
            .unwrap()
            .unwrap();
        assert_eq!(t2.idx, 1);
        // Expired at start-up: back to pending; the old attempt can no longer commit.
        assert_eq!(db.expire_leases("j", true, 3).unwrap(), 1);
        assert!(!db.commit_task(&t2.id, 1, "w2", "late", 1.0).unwrap());
        for attempt in 2..=3 {
            let t = db
                .lease_next("j", "generate", "w2", 60_000)
                .unwrap()
                .unwrap();
            assert_eq!(t.attempts, attempt);
            db.release(&t.id, attempt, "boom", 3).unwrap();
        }
        assert!(db
            .lease_next("j", "generate", "w2", 60_000)
            .unwrap()
            .is_none());
        let counts = db.task_counts("j", "generate").unwrap();
        assert_eq!(counts, vec![("done".into(), 1), ("set_aside".into(), 1)]);
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
