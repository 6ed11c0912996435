//! Durable job state: `jobs.db` (SQLite, WAL, synchronous NORMAL) in the state directory, written
//! by one owned thread that commits in batches ([`super::db_writer`]).
//!
//! Tables: jobs, stages (each stage's state and output), tasks (shards and training attempts with
//! their lease), events (the job's log), losses, calibrations, stage_cache (outputs by input key)
//! and models (the registry). Every state change is one transaction, so a coordinator killed at
//! any moment restarts from a consistent state: leased tasks go back to pending, a committed task
//! result is never committed twice ([`JobDb::commit_task`] checks the attempt).

use super::db_busy::wait_for_locks;
use super::db_writer::{Queued, WriteFailure, WriteMode, Writer};
use crate::store::now_ms;
use rusqlite::config::DbConfig;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use serde::{Deserialize, Serialize};
use std::future::Future;
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
    /// The batch a write was part of did not commit (the write did not happen).
    #[error("job database {path}: commit failed: {reason}")]
    Commit {
        /// The database file.
        path: PathBuf,
        /// Cause.
        reason: String,
    },
    /// The writer thread could not be started.
    #[error("job database {path}: cannot start its writer thread: {source} (the system is out of threads or memory; free some and restart the coordinator)")]
    WriterStart {
        /// The database file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The writer thread has stopped (the coordinator is shutting down).
    #[error("job database {path}: its writer has stopped (the coordinator is shutting down)")]
    WriterGone {
        /// The database file.
        path: PathBuf,
    },
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

impl TaskRow {
    /// This attempt of the task, as the protocol names it.
    pub fn task_ref(&self) -> ragd_shared::protocol::jobs::TaskRef {
        ragd_shared::protocol::jobs::TaskRef {
            task_id: self.id.clone(),
            attempt: self.attempts,
        }
    }
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
    /// Model id (the job's id; `JOB-reranker` for its reranker).
    pub id: String,
    /// `embedder` or `reranker`: each kind has its own active model.
    pub kind: String,
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

/// Handle to `jobs.db`: writes go to its writer thread ([`super::db_writer`]) and commit in
/// batches; reads use a read-only connection of their own (WAL: readers never block the writer).
#[derive(Debug)]
pub struct JobDb {
    path: PathBuf,
    reader: Mutex<Connection>,
    writer: Writer,
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
CREATE INDEX IF NOT EXISTS tasks_leased ON tasks (job_id, lease_expires_ms) WHERE state = 'leased';
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
  active INTEGER NOT NULL DEFAULT 0, created_ms INTEGER NOT NULL, promoted_ms INTEGER,
  kind TEXT NOT NULL DEFAULT 'embedder');
";

impl JobDb {
    /// Opens (creating) `jobs.db` in `dir`.
    pub fn open(dir: &Path) -> Result<Self, JobDbError> {
        let path = dir.join("jobs.db");
        let err = |source| JobDbError::Sqlite {
            path: path.clone(),
            source,
        };
        let mut conn = Connection::open(&path).map_err(err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(err)?;
        // WAL with synchronous=NORMAL: a commit survives the coordinator being killed (SIGKILL)
        // at any moment; only an OS crash or power loss can drop the last commits, and those are
        // task results or leases that are then redone (commits are idempotent by attempt). FULL
        // fsynced every lease and commit and halved dispatch throughput (bench_coordinator).
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(err)?;
        wait_for_locks(&mut conn).map_err(err)?;
        // Checkpoints run on the writer's own checkpointer thread, never inside a commit.
        conn.pragma_update(None, "wal_autocheckpoint", 0)
            .map_err(err)?;
        // Plans do not depend on bound values: without this, SQLite (built with STAT4) parses
        // the lease query again on every call because its parameters changed.
        conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)
            .map_err(err)?;
        conn.execute_batch(SCHEMA).map_err(err)?;
        // jobs.db written before rerankers existed has no `kind` column: every model is an embedder.
        let has_kind = conn
            .prepare("SELECT 1 FROM pragma_table_info('models') WHERE name = 'kind'")
            .and_then(|mut st| st.exists([]))
            .map_err(err)?;
        if !has_kind {
            conn.execute_batch(
                "ALTER TABLE models ADD COLUMN kind TEXT NOT NULL DEFAULT 'embedder'",
            )
            .map_err(err)?;
        }
        let mut reader = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(err)?;
        wait_for_locks(&mut reader).map_err(err)?;
        reader
            .set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)
            .map_err(err)?;
        let mut checkpoint_conn = Connection::open(&path).map_err(err)?;
        wait_for_locks(&mut checkpoint_conn).map_err(err)?;
        let writer = Writer::spawn(conn, checkpoint_conn, path.clone()).map_err(|source| {
            JobDbError::WriterStart {
                path: path.clone(),
                source,
            }
        })?;
        Ok(Self {
            path,
            reader: Mutex::new(reader),
            writer,
        })
    }

    /// Runs a query on the read connection.
    pub(super) fn read<T>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T>,
    ) -> Result<T, JobDbError> {
        let conn = self.reader.lock().unwrap_or_else(|p| p.into_inner());
        f(&conn).map_err(|source| JobDbError::Sqlite {
            path: self.path.clone(),
            source,
        })
    }

    /// Queues a write for the writer thread; the future resolves once its batch is committed.
    pub(super) fn submit<T, F>(&self, f: F) -> impl Future<Output = Result<T, JobDbError>>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        self.submit_as(WriteMode::DURABLE, f)
    }

    /// Queues a write with its own [`WriteMode`] (when it is answered, whether it needs a
    /// savepoint).
    pub(super) fn submit_as<T, F>(
        &self,
        mode: WriteMode,
        f: F,
    ) -> impl Future<Output = Result<T, JobDbError>>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let (op, answer) = Queued::new(mode, f);
        let sent = self.writer.send(Box::new(op)).is_ok();
        let path = self.path.clone();
        async move {
            if !sent {
                return Err(JobDbError::WriterGone { path });
            }
            match answer.await {
                Ok(Ok(v)) => Ok(v),
                Ok(Err(WriteFailure::Sqlite(source))) => Err(JobDbError::Sqlite { path, source }),
                Ok(Err(WriteFailure::Commit(reason))) => Err(JobDbError::Commit { path, reason }),
                Err(_) => Err(JobDbError::WriterGone { path }),
            }
        }
    }

    /// Batches the writer has run.
    #[cfg(test)]
    pub(super) fn writer_batches(&self) -> u64 {
        self.writer.batches()
    }

    /// Checkpoints the writer's checkpointer has run.
    #[cfg(test)]
    pub(super) fn writer_checkpoints(&self) -> u64 {
        self.writer.checkpoints()
    }

    /// A write from synchronous code: queues it and blocks until its batch is committed.
    pub(super) fn write<T, F>(&self, f: F) -> Result<T, JobDbError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        futures::executor::block_on(self.submit(f))
    }

    /// Records a new job and its stages (one transaction).
    pub fn create_job(&self, id: &str, spec: &str, stages: &[&str]) -> Result<(), JobDbError> {
        let now = now_ms() as i64;
        let (id, spec) = (id.to_string(), spec.to_string());
        let stages: Vec<String> = stages.iter().map(|s| s.to_string()).collect();
        self.write(move |c| {
            c.execute(
                "INSERT INTO jobs (id, spec, state, created_ms, updated_ms) VALUES (?1, ?2, 'running', ?3, ?3)",
                params![id, spec, now],
            )?;
            for s in &stages {
                c.execute(
                    "INSERT INTO stages (job_id, name, state) VALUES (?1, ?2, 'pending')",
                    params![id, s],
                )?;
            }
            c.execute(
                "INSERT INTO events (job_id, ts_ms, message) VALUES (?1, ?2, 'job submitted')",
                params![id, now],
            )?;
            Ok(())
        })
    }

    /// Sets a job's state (and error).
    pub fn set_job_state(
        &self,
        id: &str,
        state: &str,
        error: Option<&str>,
    ) -> Result<(), JobDbError> {
        let (id, state) = (id.to_string(), state.to_string());
        let error = error.map(str::to_string);
        self.write(move |c| {
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
        self.read(|c| {
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
        self.read(|c| {
            let mut st = c.prepare(
                "SELECT id, spec, state, created_ms, updated_ms, error FROM jobs ORDER BY created_ms DESC",
            )?;
            let rows = st.query_map([], Self::job_from)?;
            rows.collect()
        })
    }

    /// The stages of a job, in pipeline order.
    pub fn stages(&self, job: &str) -> Result<Vec<StageRow>, JobDbError> {
        self.read(|c| {
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
        let (job, stage) = (job.to_string(), stage.to_string());
        self.write(move |c| {
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
        let (job, stage) = (job.to_string(), stage.to_string());
        let (ran_on, why) = (ran_on.to_string(), why.to_string());
        self.write(move |c| {
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
        let (job, stage, output) = (job.to_string(), stage.to_string(), output.to_string());
        let input_key = input_key.map(str::to_string);
        self.write(move |c| {
            c.execute(
                "UPDATE stages SET state = 'done', output = ?3, finished_ms = ?4 WHERE job_id = ?1 AND name = ?2",
                params![job, stage, output, now_ms() as i64],
            )?;
            if let Some(key) = input_key {
                c.execute(
                    "INSERT OR REPLACE INTO stage_cache (stage, input_key, output) VALUES (?1, ?2, ?3)",
                    params![stage, key, output],
                )?;
            }
            Ok(())
        })
    }

    /// A cached output of `stage` for `input_key`.
    pub fn cached(&self, stage: &str, input_key: &str) -> Result<Option<String>, JobDbError> {
        self.read(|c| {
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
        let (job, message) = (job.to_string(), message.to_string());
        self.write(move |c| {
            c.execute(
                "INSERT INTO events (job_id, ts_ms, message) VALUES (?1, ?2, ?3)",
                params![job, now_ms() as i64, message],
            )
            .map(|_| ())
        })
    }

    /// The job's log after sequence number `after`: (seq, unix ms, message).
    pub fn events(&self, job: &str, after: i64) -> Result<Vec<(i64, u64, String)>, JobDbError> {
        self.read(|c| {
            let mut st = c.prepare(
                "SELECT seq, ts_ms, message FROM events WHERE job_id = ?1 AND seq > ?2 ORDER BY seq",
            )?;
            let rows = st.query_map(params![job, after], |r| {
                Ok((r.get(0)?, r.get::<_, i64>(1)? as u64, r.get(2)?))
            })?;
            rows.collect()
        })
    }
}
