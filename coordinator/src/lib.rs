//! The ragd cluster coordinator: finds the workers of its cluster on the LAN, enrols them, talks
//! to them over mutual-TLS QUIC, tracks whether each is alive, and runs fine-tuning jobs on them
//! with the engine (`ragd-engine`).
//!
//! - [`config`]: layered, validated configuration;
//! - [`cluster`]: `init` (the cluster CA, keys and state database) and the join token;
//! - [`daemon`]: `serve`, the daemon: its tasks, their start and ordered shutdown;
//! - [`pki`] and [`store`]: the cluster CA and the durable state (SQLite) in the state directory;
//! - [`server`]: the listening endpoint, where workers enrol; [`admission`]: the bounded budget
//!   of peers that have not authenticated there;
//! - [`supervisor`]: dials workers, heartbeats, reconnects (liveness);
//! - [`registry`] and [`policy`]: the live worker table and the TLS admission policy;
//! - [`jobs`]: fine-tuning jobs (durable state, sharded generation, placement, training, failover);
//! - [`report`]: the self-contained HTML report of a job;
//! - [`admin`]: the local admin socket used by the CLI; [`admin_handler`]: what the daemon (or,
//!   without one, the state directory) answers on it.

pub mod admin;
pub mod admin_handler;
pub mod admission;
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
    #[error("{0} already holds a cluster; `ragd-coord token show` prints its join token (use `init --force` to replace it: the old state is moved aside, every enrolled worker must re-join)")]
    AlreadyInitialised(PathBuf),
    /// `init --force` while a daemon serves the state directory.
    #[error("a coordinator daemon is serving {0}: stop it before `init --force`")]
    DaemonRunning(PathBuf),
    /// Another `init` is building an identity in the state directory.
    #[error("another `ragd-coord init` is running ({0}); wait for it to finish")]
    InitInProgress(PathBuf),
    /// The old state directory could not be renamed aside.
    #[error("cannot move the old state {from} aside to {to}: {source} (move or remove it yourself, then rerun `init`)")]
    MoveAside {
        /// The state directory.
        from: PathBuf,
        /// Where it was to go.
        to: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
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
