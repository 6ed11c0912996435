//! Fine-tuning jobs: a submitted job runs the pipeline ingest -> generate (sharded over the
//! workers with an LLM) -> prepare (filter, split, mine) -> train (on the best node) -> evaluate
//! -> export, with its state in [`db::JobDb`] so it survives a coordinator restart.
//!
//! - what a user submits is `ragd_shared::protocol::job_spec` ([`JobSpec`]): it crosses the admin socket;
//! - [`db`]: durable jobs, stages, tasks and leases, events, losses, calibrations, models;
//! - `db_writer`: the one thread that writes `jobs.db`, committing queued writes in batches;
//! - `reporting`: the job's `report.html` from what `jobs.db` holds;
//! - `tasks_db`: the task table: leases, attempts, idempotent commits;
//! - `records`: losses, calibrations, checkpoints and the model registry in `jobs.db`;
//! - [`remote`]: task and blob operations on a worker connection;
//! - [`drive`]: runs one task attempt on a worker to its end, renewing the lease;
//! - [`generate`]: the sharded generation stage (workers pull shards as they have capacity);
//! - [`prepare`]: filtering, split and mining on the best embedding node;
//! - [`placement`]: the training cost model (calibrated throughput, transfers, memory, queue);
//! - [`train`]: training with checkpoints brought home and failover to the next best node;
//! - [`local`]: the stages the coordinator runs itself (ingest, prepare, evaluate, export);
//! - [`service`]: the job table the admin socket talks to (submit, list, show, cancel).

pub mod db;
mod db_busy;
mod db_writer;
pub mod drive;
pub mod embed;
pub mod export;
pub mod generate;
pub mod local;
pub mod placement;
pub mod prepare;
mod records;
pub mod remote;
mod reporting;
pub mod rerank;
pub mod service;
pub mod shards;
mod tasks_db;
pub mod train;
mod views;

pub use ragd_shared::protocol::job_spec::{JobSpec, ModelKind};
pub use service::JobService;

/// Errors that end a job.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The job database failed.
    #[error(transparent)]
    Db(#[from] db::JobDbError),
    /// A blob store operation failed.
    #[error(transparent)]
    Blob(#[from] ragd_shared::blobs::BlobError),
    /// A remote operation failed for good.
    #[error(transparent)]
    Remote(#[from] remote::RemoteError),
    /// A stage cannot go on.
    #[error("{stage}: {message}")]
    Stage {
        /// The stage.
        stage: &'static str,
        /// What went wrong and what to do.
        message: String,
    },
    /// The job was cancelled.
    #[error("cancelled")]
    Cancelled,
    /// A model could not be written where the user asked.
    #[error("export: {0}")]
    Export(#[from] export::ExportError),
}

impl JobError {
    /// A stage error.
    pub fn stage(stage: &'static str, message: impl std::fmt::Display) -> Self {
        Self::Stage {
            stage,
            message: message.to_string(),
        }
    }
}
