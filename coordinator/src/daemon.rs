//! `serve`: the coordinator daemon. Every task it starts is owned by one `JoinSet` under one
//! cancellation token; shutdown is ordered (jobs, then tasks, then the endpoint, then mDNS).

use crate::admin::{self, AdminRequest};
use crate::admin_handler::AdminHandler;
use crate::admission::{Admission, AdmissionLimits};
use crate::cluster::open_initialised;
use crate::config::CoordinatorConfig;
use crate::jobs::db::JobDb;
use crate::jobs::drive::JobCtx;
use crate::jobs::{self, JobService};
use crate::pki::CoordinatorPki;
use crate::policy::EnrolledWorkers;
use crate::registry::Registry;
use crate::server;
use crate::store::Store;
use crate::supervisor::Supervisor;
use crate::CoordError;
use ragd_shared::blobs::{BlobStore, Intake};
use ragd_shared::discovery::{
    Advertisement, Discovery, DiscoveryEvent, MdnsDiscovery, ServiceKind, StaticDiscovery,
};
use ragd_shared::identity;
use ragd_shared::protocol::SUPPORTED_VERSIONS;
use ragd_shared::transport;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Connection attempts quinn queues before the accept loop sees them (each is refused or
/// admitted at once there).
const ENROLMENT_INCOMING_QUEUE: usize = 256;

/// Runs the coordinator daemon until `cancel` fires, then shuts down in order: stop accepting,
/// close worker connections, drain the endpoint, withdraw the mDNS advertisement.
pub async fn serve(cfg: CoordinatorConfig, cancel: CancellationToken) -> Result<(), CoordError> {
    let dir = cfg.state_dir()?;
    let store = Arc::new(open_initialised(&dir)?);
    let coordinator_id = store.coordinator_id()?;
    let pki = Arc::new(CoordinatorPki::load(&dir)?);
    let ca_fingerprint = pki.ca_fingerprint();

    let (policy, registry) = admitted_workers(&store)?;
    let (endpoint, listen) = bind_endpoint(&cfg, &pki, &policy)?;
    let client_config =
        identity::coordinator_client_config(pki.ca.cert_pem(), &pki.credentials, policy.clone())?;
    let discoveries = start_discovery(&cfg, &coordinator_id, listen.port(), &ca_fingerprint)?;
    // Workers push only what a job fetches (see `ragd_shared::blobs::Intake`).
    let blobs =
        BlobStore::open_with(&dir.join("blobs"), Intake::Expected).map_err(jobs::JobError::from)?;
    let mut tasks = JoinSet::new();
    let events_rx = forward_worker_events(&discoveries, &mut tasks, &cancel)?;

    let supervisor = Supervisor::new(
        &cfg,
        endpoint.clone(),
        client_config,
        registry.clone(),
        policy.clone(),
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
        admission: Admission::new(AdmissionLimits::default()),
    });
    tasks.spawn(enrolment.run(endpoint.clone(), cancel.clone()));

    let listener = admin::bind(&dir)?;
    let admin_handler = AdminHandler {
        store: store.clone(),
        pki: pki.clone(),
        registry: registry.clone(),
        policy: policy.clone(),
        supervisor: supervisor.clone(),
        jobs: job_service.clone(),
    };
    let handler = move |req: AdminRequest| {
        let h = admin_handler.clone();
        async move { h.handle(req).await }
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

/// The admission policy and the live worker table, from the enrolled workers on record.
fn admitted_workers(store: &Store) -> Result<(Arc<EnrolledWorkers>, Arc<Registry>), CoordError> {
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
    Ok((policy, registry))
}

/// The QUIC endpoint workers enrol on and that dials them, and the address it got.
///
/// Only enrolling workers dial in (the coordinator dials enrolled ones), so every incoming
/// connection gets the small budget of a peer without a certificate: the enrolment transport
/// settings and a bounded queue of connection attempts. Outgoing connections to workers use
/// the supervisor's client settings.
fn bind_endpoint(
    cfg: &CoordinatorConfig,
    pki: &CoordinatorPki,
    policy: &Arc<EnrolledWorkers>,
) -> Result<(quinn::Endpoint, SocketAddr), CoordError> {
    let mut server_config =
        identity::coordinator_server_config(pki.ca.cert_pem(), &pki.credentials, policy.clone())?;
    server_config.transport_config(transport::enrolment_transport_config(
        server::ENROLMENT_WINDOW,
    ));
    server_config.max_incoming(ENROLMENT_INCOMING_QUEUE);
    server_config.incoming_buffer_size(16 * 1024);
    server_config.incoming_buffer_size_total(1024 * 1024);
    let bind = |source| CoordError::Bind {
        addr: cfg.listen,
        source,
    };
    let endpoint = transport::bind_endpoint(cfg.listen, Some(server_config)).map_err(bind)?;
    let listen = endpoint.local_addr().map_err(bind)?;
    Ok((endpoint, listen))
}

/// The configured ways of finding workers (static peers; mDNS, advertising this coordinator).
fn start_discovery(
    cfg: &CoordinatorConfig,
    coordinator_id: &str,
    port: u16,
    ca_fingerprint: &identity::Fingerprint,
) -> Result<Vec<Arc<dyn Discovery>>, CoordError> {
    let mut discoveries: Vec<Arc<dyn Discovery>> = Vec::new();
    if !cfg.peers.is_empty() {
        discoveries.push(Arc::new(StaticDiscovery::new(cfg.peers.clone())?));
    }
    if cfg.mdns.enabled {
        let mdns = MdnsDiscovery::new(&cfg.mdns.to_config())?;
        mdns.advertise(&Advertisement {
            kind: ServiceKind::Coordinator,
            node_id: coordinator_id.to_string(),
            port,
            versions: SUPPORTED_VERSIONS,
            ca_fingerprint: ca_fingerprint.to_string(),
        })?;
        discoveries.push(Arc::new(mdns));
    }
    Ok(discoveries)
}

/// Merges every discovery's worker events into one channel, one owned task per discovery.
fn forward_worker_events(
    discoveries: &[Arc<dyn Discovery>],
    tasks: &mut JoinSet<()>,
    cancel: &CancellationToken,
) -> Result<mpsc::Receiver<DiscoveryEvent>, CoordError> {
    let (events_tx, events_rx) = mpsc::channel::<DiscoveryEvent>(256);
    for d in discoveries {
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
    Ok(events_rx)
}
