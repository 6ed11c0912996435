//! The admin protocol: what `ragd-coord` commands ask the coordinator daemon over its local
//! Unix socket (`ragd_coordinator::admin` carries it), and the worker table it answers with.
//!
//! One [`AdminRequest`] frame, one [`AdminResponse`] frame per connection, encoded by
//! [`crate::codec`]. Append variants and fields only.

use super::capabilities::{Capabilities, Load};
use super::job_spec::JobSpec;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;

/// A request from the CLI to the daemon. Append variants only.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum AdminRequest {
    /// List every known worker.
    ListWorkers,
    /// Revoke a worker.
    RemoveWorker {
        /// Worker id.
        id: String,
    },
    /// Print the current join token.
    ShowToken,
    /// Replace the join secret and print the new token.
    RotateToken,
    /// Start a job; answered with the job id.
    Submit {
        /// What to run.
        spec: Box<JobSpec>,
    },
    /// List jobs.
    ListJobs,
    /// One job in detail.
    ShowJob {
        /// Job id.
        id: String,
    },
    /// A job's log lines after sequence number `after`.
    JobLogs {
        /// Job id.
        id: String,
        /// Last sequence number already seen.
        after: i64,
    },
    /// Cancel a running job.
    CancelJob {
        /// Job id.
        id: String,
    },
    /// List registered models.
    ListModels,
    /// Promote a model.
    PromoteModel {
        /// Model id (its job's id).
        id: String,
        /// Promote even if it evaluates worse than its base.
        force: bool,
    },
    /// Go back to the previously promoted embedder.
    RollbackModel,
    /// Go back to the previously promoted model of a kind (`embedder` or `reranker`).
    RollbackModelKind {
        /// The kind.
        kind: String,
    },
    /// Revoke a worker and replace the join secret in the same step (the removed machine knew
    /// it); answered with `RemovedRotated`.
    RemoveWorkerRotatingToken {
        /// Worker id.
        id: String,
    },
    /// Write a job's HTML report again from what `jobs.db` holds (next to its model and in its
    /// job directory); answered with its path.
    WriteReport {
        /// Job id.
        id: String,
    },
}

/// The daemon's answer. Append variants only.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum AdminResponse {
    /// Answer to `ListWorkers`.
    Workers(Vec<WorkerRecord>),
    /// Answer to `RemoveWorker`.
    Removed {
        /// Worker id.
        id: String,
    },
    /// Answer to `ShowToken` / `RotateToken`.
    Token(String),
    /// The request failed.
    Error(String),
    /// A JSON answer (jobs, models).
    Json(String),
    /// Answer to `RemoveWorkerRotatingToken`.
    RemovedRotated {
        /// Worker id.
        id: String,
        /// The new join token.
        token: String,
    },
}

/// Where a worker stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WorkerState {
    /// Connected, answering heartbeats, with free work slots.
    Ready,
    /// Connected and answering, but every work slot is in use.
    Busy,
    /// Enrolled but not answering (never seen since start, or heartbeats missed).
    Unreachable,
    /// Removed by the admin; its certificate is refused.
    Removed,
}

impl std::fmt::Display for WorkerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WorkerState::Ready => "ready",
            WorkerState::Busy => "busy",
            WorkerState::Unreachable => "unreachable",
            WorkerState::Removed => "removed",
        })
    }
}

/// Everything the coordinator knows about one worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerRecord {
    /// Worker id (from its certificate).
    pub id: String,
    /// Current state.
    pub state: WorkerState,
    /// When the state last changed (unix ms).
    pub state_since_ms: u64,
    /// Last successful heartbeat or handshake (unix ms).
    pub last_seen_ms: Option<u64>,
    /// Address of the current or last connection.
    pub addr: Option<SocketAddr>,
    /// How the worker was found ("mdns" or "static").
    pub found_by: Option<String>,
    /// Negotiated protocol version of the current or last connection.
    pub protocol_version: Option<u16>,
    /// Capabilities from the handshake, refreshed by heartbeats.
    pub capabilities: Option<Capabilities>,
    /// Load from the last heartbeat.
    pub load: Option<Load>,
    /// Why the worker is unreachable, when it is.
    pub last_error: Option<String>,
}

impl WorkerRecord {
    /// A worker first seen in `state` at `at_ms` (unix ms).
    pub fn new(id: &str, state: WorkerState, at_ms: u64) -> Self {
        Self {
            id: id.to_string(),
            state,
            state_since_ms: at_ms,
            last_seen_ms: None,
            addr: None,
            found_by: None,
            protocol_version: None,
            capabilities: None,
            load: None,
            last_error: None,
        }
    }

    /// Moves to `state` at `at_ms` (unix ms), if it is a change.
    pub fn set_state(&mut self, state: WorkerState, at_ms: u64) {
        if self.state != state {
            tracing::info!(worker = %self.id, from = %self.state, to = %state, "worker state changed");
            self.state = state;
            self.state_since_ms = at_ms;
        }
    }
}
