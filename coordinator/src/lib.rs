//! The ragd cluster coordinator: finds the workers of its cluster on the LAN, enrols them, talks
//! to them over mutual-TLS QUIC, tracks whether each is alive, and runs fine-tuning jobs on them
//! with the engine (`ragd-engine`).
//!
//! - [`config`]: layered, validated configuration;
//! - [`cluster`]: `init` (the cluster CA, keys and state database) and the join token;
//! - [`daemon`]: `serve`, the daemon: its tasks, their start and ordered shutdown;
//! - [`pki`] and [`store`]: the cluster CA and the durable state (SQLite) in the state directory;
//! - [`server`]: the listening endpoint, where workers enrol;
//! - [`supervisor`]: dials workers, heartbeats, reconnects (liveness);
//! - [`registry`] and [`policy`]: the live worker table and the TLS admission policy;
//! - [`jobs`]: fine-tuning jobs (durable state, sharded generation, placement, training, failover);
//! - [`report`]: the self-contained HTML report of a job;
//! - [`admin`]: the local admin socket used by the CLI; [`admin_handler`]: what the daemon (or,
//!   without one, the state directory) answers on it.

pub mod admin;
pub mod admin_handler;
pub mod backoff;
pub mod cluster;
pub mod config;
pub mod daemon;
pub mod jobs;
pub mod pki;
pub mod policy;
pub mod registry;
pub mod report;
pub mod server;
pub mod store;
pub mod supervisor;
mod table;

pub use admin_handler::admin_request;
pub use cluster::{current_token, init, InitOutcome};
pub use daemon::serve;
pub use table::render_workers;

use ragd_shared::identity;
use std::path::PathBuf;

/// Errors of the coordinator's top-level operations.
#[derive(Debug, thiserror::Error)]
pub enum CoordError {
    /// Configuration problem.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// State database problem.
    #[error(transparent)]
    Store(#[from] store::StoreError),
    /// Keys or certificates problem.
    #[error("cluster identity: {0}")]
    Identity(#[from] identity::IdentityError),
    /// Discovery could not start.
    #[error("discovery: {0}")]
    Discovery(#[from] ragd_shared::discovery::DiscoveryError),
    /// Admin channel problem.
    #[error(transparent)]
    Admin(#[from] admin::AdminError),
    /// The state directory is already initialised.
    #[error("{0} already holds a cluster; `ragd-coord token show` prints its join token (use `init --force` to replace it, which orphans every enrolled worker)")]
    AlreadyInitialised(PathBuf),
    /// Filesystem problem.
    #[error("{path}: {source}")]
    Io {
        /// The path involved.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The QUIC endpoint could not be bound.
    #[error("cannot listen on {addr}: {source} (is another coordinator running? change `listen`)")]
    Bind {
        /// Address.
        addr: std::net::SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// The job machinery could not start.
    #[error(transparent)]
    Jobs(#[from] jobs::JobError),
    /// The daemon answered with an error.
    #[error("{0}")]
    Daemon(String),
}
