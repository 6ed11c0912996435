//! The ragd cluster coordinator: finds the workers of its cluster on the LAN, enrols them, talks
//! to them over mutual-TLS QUIC and tracks whether each is alive.
//!
//! - [`config`]: layered, validated configuration;
//! - [`pki`] and [`store`]: the cluster CA and the durable state (SQLite) in the state directory;
//! - [`server`]: the listening endpoint, where workers enrol;
//! - [`supervisor`]: dials workers, heartbeats, reconnects (liveness);
//! - [`registry`] and [`policy`]: the live worker table and the TLS admission policy;
//! - [`jobs`]: fine-tuning jobs (durable state, sharded generation, placement, training, failover);
//! - [`report`]: the self-contained HTML report of a job;
//! - [`admin`]: the local admin socket used by the CLI.

pub mod admin;
pub mod backoff;
pub mod config;
pub mod jobs;
pub mod pki;
pub mod policy;
pub mod registry;
pub mod report;
pub mod server;
pub mod store;
pub mod supervisor;
mod table;

pub use table::render_workers;

use admin::{AdminRequest, AdminResponse};
use config::CoordinatorConfig;
use jobs::db::JobDb;
use jobs::drive::JobCtx;
use jobs::{JobService, JobSpec};
use pki::CoordinatorPki;
use policy::EnrolledWorkers;
use ragd_shared::blobs::BlobStore;
use ragd_shared::discovery::{
    Advertisement, Discovery, DiscoveryEvent, MdnsDiscovery, ServiceKind, StaticDiscovery,
};
use ragd_shared::identity::{self, JoinSecret, JoinToken};
use ragd_shared::protocol::SUPPORTED_VERSIONS;
use ragd_shared::transport;
use registry::Registry;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use store::Store;
use supervisor::Supervisor;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

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

/// What `init` created.
#[derive(Debug)]
pub struct InitOutcome {
    /// The state directory.
    pub state_dir: PathBuf,
    /// The coordinator's id.
    pub coordinator_id: String,
    /// The join token for workers.
    pub token: JoinToken,
}

/// Creates the cluster CA, the coordinator's certificate and the state database.
pub fn init(
    cfg: &CoordinatorConfig,
    coordinator_id: &str,
    force: bool,
) -> Result<InitOutcome, CoordError> {
    identity::validate_node_id(coordinator_id)?;
    let dir = cfg.state_dir()?;
    if dir.join("state.db").exists() && !force {
        return Err(CoordError::AlreadyInitialised(dir));
    }
    create_private_dir(&dir)?;
    if force {
        for f in ["state.db", "state.db-wal", "state.db-shm"] {
            let _ = std::fs::remove_file(dir.join(f));
        }
    }
    let pki = CoordinatorPki::create(&dir, "ragd cluster", coordinator_id)?;
    let store = Store::open(&dir)?;
    let secret = JoinSecret::generate()?;
    store.initialise(coordinator_id, &secret)?;
    tracing::info!(state_dir = %dir.display(), coordinator = coordinator_id, "cluster initialised");
    Ok(InitOutcome {
        state_dir: dir,
        coordinator_id: coordinator_id.to_string(),
        token: JoinToken {
            ca_fingerprint: pki.ca_fingerprint(),
            secret,
        },
    })
}

fn create_private_dir(dir: &Path) -> Result<(), CoordError> {
    let io = |source| CoordError::Io {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io)
}

/// The current join token, read from the state directory (works without the daemon).
pub fn current_token(cfg: &CoordinatorConfig) -> Result<JoinToken, CoordError> {
    let dir = cfg.state_dir()?;
    let store = open_initialised(&dir)?;
    let pki = CoordinatorPki::load(&dir)?;
    Ok(JoinToken {
        ca_fingerprint: pki.ca_fingerprint(),
        secret: store.join_secret()?,
    })
}

fn open_initialised(dir: &Path) -> Result<Store, CoordError> {
    if !dir.join("state.db").exists() {
        return Err(store::StoreError::NotInitialised(dir.to_path_buf()).into());
    }
    let store = Store::open(dir)?;
    store.coordinator_id()?;
    Ok(store)
}

/// Sends an admin request to the running daemon; for requests that only touch durable state,
/// falls back to the state directory when no daemon runs.
pub async fn admin_request(
    cfg: &CoordinatorConfig,
    req: AdminRequest,
) -> Result<AdminResponse, CoordError> {
    let dir = cfg.state_dir()?;
    match admin::call(&dir, &req).await {
        Ok(AdminResponse::Error(e)) => Err(CoordError::Daemon(e)),
        Ok(resp) => Ok(resp),
        Err(admin::AdminError::NotRunning { path }) => match req {
            AdminRequest::ListWorkers => Err(admin::AdminError::NotRunning { path }.into()),
            other => {
                let store = open_initialised(&dir)?;
                let pki = CoordinatorPki::load(&dir)?;
                Ok(offline_admin(&store, &pki, other))
            }
        },
        Err(e) => Err(e.into()),
    }
}

fn offline_admin(store: &Store, pki: &CoordinatorPki, req: AdminRequest) -> AdminResponse {
    let token = |secret| {
        JoinToken {
            ca_fingerprint: pki.ca_fingerprint(),
            secret,
        }
        .to_string()
    };
    let result = match req {
        AdminRequest::ListWorkers => {
            return AdminResponse::Error("listing needs the running daemon".into())
        }
        AdminRequest::RemoveWorker { id } => {
            store.remove(&id).map(|_| AdminResponse::Removed { id })
        }
        AdminRequest::ShowToken => store.join_secret().map(|s| AdminResponse::Token(token(s))),
        AdminRequest::RotateToken => store
            .rotate_join_secret()
            .map(|s| AdminResponse::Token(token(s))),
        _ => {
            return AdminResponse::Error(
                "jobs and models need the running daemon: start it with `ragd-coord serve`".into(),
            )
        }
    };
    result.unwrap_or_else(|e| AdminResponse::Error(e.to_string()))
}

/// Answers the job and model requests of the admin channel (`None` for the others).
fn job_admin(jobs: &Arc<JobService>, req: &AdminRequest) -> Option<AdminResponse> {
    let json = |r: Result<serde_json::Value, String>| match r {
        Ok(v) => AdminResponse::Json(v.to_string()),
        Err(e) => AdminResponse::Error(e),
    };
    let e = |e: jobs::JobError| e.to_string();
    Some(match req {
        AdminRequest::Submit { spec_json } => json(
            serde_json::from_str::<JobSpec>(spec_json)
                .map_err(|e| format!("bad job spec: {e}"))
                .and_then(|spec| jobs.submit(spec))
                .map(|id| serde_json::json!({ "id": id })),
        ),
        AdminRequest::ListJobs => json(jobs.list_json().map_err(e)),
        AdminRequest::ShowJob { id } => json(jobs.show_json(id).map_err(e)),
        AdminRequest::JobLogs { id, after } => json(
            jobs.logs(id, *after)
                .map(|l| serde_json::json!(l))
                .map_err(e),
        ),
        AdminRequest::CancelJob { id } => json(
            jobs.cancel(id)
                .map(|()| serde_json::json!({ "cancelled": id })),
        ),
        AdminRequest::ListModels => json(jobs.models_json().map_err(e)),
        AdminRequest::PromoteModel { id, force } => json(
            jobs.promote(id, *force)
                .map(|path| serde_json::json!({ "promoted": id, "path": path })),
        ),
        AdminRequest::RollbackModel => json(
            jobs.rollback("embedder")
                .map(|id| serde_json::json!({ "promoted": id })),
        ),
        AdminRequest::RollbackModelKind { kind } => json(
            jobs.rollback(kind)
                .map(|id| serde_json::json!({ "promoted": id })),
        ),
        _ => return None,
    })
}

/// Runs the coordinator daemon until `cancel` fires, then shuts down in order: stop accepting,
/// close worker connections, drain the endpoint, withdraw the mDNS advertisement.
pub async fn serve(cfg: CoordinatorConfig, cancel: CancellationToken) -> Result<(), CoordError> {
    let dir = cfg.state_dir()?;
    let store = Arc::new(open_initialised(&dir)?);
    let coordinator_id = store.coordinator_id()?;
    let pki = Arc::new(CoordinatorPki::load(&dir)?);
    let ca_fingerprint = pki.ca_fingerprint();

    let enrolled = store.workers()?;
    let policy = Arc::new(EnrolledWorkers::new(
        enrolled
            .iter()
            .filter(|w| w.removed_at_ms.is_none())
            .map(|w| (w.id.clone(), w.cert_fingerprint)),
    ));
    let registry = Arc::new(Registry::default());
    for w in &enrolled {
        registry.insert_enrolled(&w.id, w.removed_at_ms.is_some());
    }

    let mut server_config =
        identity::coordinator_server_config(pki.ca.cert_pem(), &pki.credentials, policy.clone())?;
    let idle = cfg.heartbeat_interval * (cfg.heartbeat_misses + 2);
    server_config.transport_config(transport::transport_config(cfg.heartbeat_interval, idle));
    let endpoint =
        quinn::Endpoint::server(server_config, cfg.listen).map_err(|source| CoordError::Bind {
            addr: cfg.listen,
            source,
        })?;
    let listen = endpoint.local_addr().map_err(|source| CoordError::Bind {
        addr: cfg.listen,
        source,
    })?;
    let client_config =
        identity::coordinator_client_config(pki.ca.cert_pem(), &pki.credentials, policy.clone())?;

    let mut discoveries: Vec<Arc<dyn Discovery>> = Vec::new();
    if !cfg.peers.is_empty() {
        discoveries.push(Arc::new(StaticDiscovery::new(cfg.peers.clone())?));
    }
    if cfg.mdns.enabled {
        let mdns = MdnsDiscovery::new(&cfg.mdns.to_config())?;
        mdns.advertise(&Advertisement {
            kind: ServiceKind::Coordinator,
            node_id: coordinator_id.clone(),
            port: listen.port(),
            versions: SUPPORTED_VERSIONS,
            ca_fingerprint: ca_fingerprint.to_string(),
        })?;
        discoveries.push(Arc::new(mdns));
    }

    let blobs = BlobStore::open(&dir.join("blobs")).map_err(jobs::JobError::from)?;
    let mut tasks = JoinSet::new();
    let (events_tx, events_rx) = mpsc::channel::<DiscoveryEvent>(256);
    for d in &discoveries {
        let mut rx = d.browse(ServiceKind::Worker)?;
        let tx = events_tx.clone();
        let cancel = cancel.clone();
        tasks.spawn(async move {
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    ev = rx.recv() => match ev {
                        Some(ev) => if tx.send(ev).await.is_err() { break },
                        None => break,
                    },
                }
            }
        });
    }
    drop(events_tx);

    let supervisor = Supervisor::new(
        &cfg,
        endpoint.clone(),
        client_config,
        registry.clone(),
        discoveries.clone(),
        ca_fingerprint,
        coordinator_id.clone(),
        blobs.clone(),
    );
    tasks.spawn(supervisor.clone().run(events_rx, cancel.clone()));
    let job_service = JobService::start(
        JobCtx {
            db: Arc::new(JobDb::open(&dir).map_err(jobs::JobError::from)?),
            blobs: blobs.clone(),
            supervisor: supervisor.clone(),
            registry: registry.clone(),
            state_dir: dir.clone(),
            poll_interval: cfg.heartbeat_interval.min(Duration::from_millis(500)),
            lease_ttl: (cfg.unreachable_bound() * 3).max(Duration::from_secs(30)),
            live: Arc::default(),
        },
        cancel.child_token(),
    )?;

    let enrolment = Arc::new(server::EnrolmentService {
        pki: pki.clone(),
        store: store.clone(),
        policy: policy.clone(),
        registry: registry.clone(),
        guard: cfg.lan_guard(),
        coordinator_id: coordinator_id.clone(),
    });
    tasks.spawn(enrolment.run(endpoint.clone(), cancel.clone()));

    let listener = admin::bind(&dir)?;
    let handler = {
        let (store, pki, registry, policy, supervisor, jobs) = (
            store.clone(),
            pki.clone(),
            registry.clone(),
            policy.clone(),
            supervisor.clone(),
            job_service.clone(),
        );
        move |req: AdminRequest| {
            let (store, pki, registry, policy, supervisor, jobs) = (
                store.clone(),
                pki.clone(),
                registry.clone(),
                policy.clone(),
                supervisor.clone(),
                jobs.clone(),
            );
            async move {
                if let Some(resp) = job_admin(&jobs, &req) {
                    return resp;
                }
                match req {
                    AdminRequest::ListWorkers => AdminResponse::Workers(registry.snapshot()),
                    AdminRequest::RemoveWorker { id } => {
                        let resp = offline_admin(
                            &store,
                            &pki,
                            AdminRequest::RemoveWorker { id: id.clone() },
                        );
                        if matches!(resp, AdminResponse::Removed { .. }) {
                            policy.revoke(&id);
                            registry.removed(&id);
                            supervisor.disconnect(&id, "removed by the cluster admin");
                            tracing::info!(worker = %id, "worker removed");
                        }
                        resp
                    }
                    other => offline_admin(&store, &pki, other),
                }
            }
        }
    };
    tasks.spawn(admin::serve(listener, dir.clone(), handler, cancel.clone()));

    tracing::info!(
        %listen,
        coordinator = %coordinator_id,
        ca = %ca_fingerprint,
        peers = cfg.peers.len(),
        mdns = cfg.mdns.enabled,
        unreachable_within = ?cfg.unreachable_bound(),
        "coordinator serving"
    );

    cancel.cancelled().await;
    tracing::info!("shutting down");
    job_service.shutdown().await;
    while tasks.join_next().await.is_some() {}
    endpoint.close(transport::CLOSE_SHUTDOWN, b"coordinator shutting down");
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    for d in &discoveries {
        d.shutdown().await;
    }
    Ok(())
}
