//! Dials the workers the discovery finds, keeps one session per worker, and tracks liveness.
//!
//! Each session: connect (mutual TLS; the worker's certificate must be the one issued to an
//! enrolled, non-removed worker), handshake, then a heartbeat every `heartbeat_interval`. After
//! `heartbeat_misses` consecutive failures, or when the connection closes, the worker is marked
//! Unreachable, mDNS is asked to verify it, and the session redials with jittered exponential
//! backoff. A dead worker is therefore Unreachable within `(heartbeat_misses + 1) *
//! heartbeat_interval` of its death.
//!
//! Only enrolled workers get a session: an advertised id the cluster has not enrolled is held in
//! a bounded waiting list (it may be enrolling right now) and dialled once it is enrolled; a
//! session ends when its worker is removed. So what anyone advertising on the LAN can make the
//! coordinator do is bounded by [`MAX_WAITING`] remembered names.

use crate::config::CoordinatorConfig;
use crate::policy::EnrolledWorkers;
use crate::registry::{Connected, Registry};
use ragd_shared::backoff::Backoff;
use ragd_shared::blobs::{self, BlobStore};
use ragd_shared::discovery::{
    DiscoveredPeer, Discovery, DiscoveryEvent, DiscoverySource, ServiceKind,
};
use ragd_shared::identity::{peer_identity, Fingerprint, WORKER_SERVER_NAME};
use ragd_shared::netguard::LanGuard;
use ragd_shared::protocol::handshake::{Hello, Role};
use ragd_shared::protocol::messages::{HeartbeatRequest, Request, Response};
use ragd_shared::transport::{self, TransportError, DEFAULT_FRAME_TIMEOUT};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Heartbeats ask for full capabilities every this many beats.
const CAPABILITY_REFRESH_BEATS: u64 = 15;
/// How long one dial may wait for the worker to answer.
const DIAL_TIMEOUT: Duration = Duration::from_secs(5);
/// Advertised worker ids not (yet) enrolled that are remembered; more are ignored.
pub const MAX_WAITING: usize = 256;
/// How often the waiting list is checked for ids enrolled since.
const WAITING_RECHECK: Duration = Duration::from_secs(1);

/// Shared state of the dialing side.
pub struct Supervisor {
    endpoint: quinn::Endpoint,
    client_config: quinn::ClientConfig,
    registry: Arc<Registry>,
    policy: Arc<EnrolledWorkers>,
    discovery: Vec<Arc<dyn Discovery>>,
    guard: LanGuard,
    ca_fingerprint: Fingerprint,
    coordinator_id: String,
    heartbeat_interval: Duration,
    heartbeat_misses: u32,
    reconnect: (Duration, Duration),
    live: Mutex<HashMap<String, quinn::Connection>>,
    blobs: BlobStore,
}

/// The supervisor's sessions: one task per target, the address channel of each, and the
/// advertised ids waiting to be enrolled.
#[derive(Default)]
struct Sessions {
    tasks: JoinSet<TargetKey>,
    targets: HashMap<TargetKey, watch::Sender<Vec<SocketAddr>>>,
    waiting: HashMap<String, DiscoveredPeer>,
    /// Whether a full waiting list was reported already.
    reported_full: bool,
}

impl Sessions {
    /// Remembers an advertised id that is not enrolled (bounded by [`MAX_WAITING`]).
    fn wait(&mut self, id: &str, peer: DiscoveredPeer) {
        if self.waiting.len() >= MAX_WAITING && !self.waiting.contains_key(id) {
            if !self.reported_full {
                self.reported_full = true;
                tracing::warn!(
                    limit = MAX_WAITING,
                    "too many advertised workers that are not enrolled; ignoring more"
                );
            }
            return;
        }
        tracing::debug!(worker = %id, "advertised worker is not enrolled; waiting for its enrolment");
        self.waiting.insert(id.to_string(), peer);
    }
}

/// A dial target: a known worker id (mDNS) or, for static peers, an address until the handshake
/// tells who is there.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum TargetKey {
    Id(String),
    Static(String),
}

impl Supervisor {
    /// Builds the supervisor; `client_config` is the coordinator's mutual-TLS client config and
    /// `blobs` the store that blobs pushed by workers land in.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: &CoordinatorConfig,
        endpoint: quinn::Endpoint,
        client_config: quinn::ClientConfig,
        registry: Arc<Registry>,
        policy: Arc<EnrolledWorkers>,
        discovery: Vec<Arc<dyn Discovery>>,
        ca_fingerprint: Fingerprint,
        coordinator_id: String,
        blobs: BlobStore,
    ) -> Arc<Self> {
        Arc::new(Self {
            endpoint,
            client_config,
            registry,
            policy,
            discovery,
            guard: cfg.lan_guard(),
            ca_fingerprint,
            coordinator_id,
            heartbeat_interval: cfg.heartbeat_interval,
            heartbeat_misses: cfg.heartbeat_misses,
            reconnect: (cfg.reconnect_initial, cfg.reconnect_max),
            live: Mutex::new(HashMap::new()),
            blobs,
        })
    }

    /// The live connection to worker `id`, if it is connected.
    pub fn connection(&self, id: &str) -> Option<quinn::Connection> {
        self.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .filter(|c| c.close_reason().is_none())
            .cloned()
    }

    /// Closes the live connection to `id` (after a removal); its redials then fail at TLS.
    pub fn disconnect(&self, id: &str, why: &str) {
        if let Some(conn) = self
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id)
        {
            conn.close(transport::CLOSE_SUPERSEDED, why.as_bytes());
        }
    }

    /// Consumes discovery events until `cancel` fires, running one session task per target.
    pub async fn run(
        self: Arc<Self>,
        mut events: mpsc::Receiver<DiscoveryEvent>,
        cancel: CancellationToken,
    ) {
        let mut sessions = Sessions::default();
        let mut recheck = tokio::time::interval(WAITING_RECHECK);
        recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let event = tokio::select! {
                _ = cancel.cancelled() => break,
                Some(ended) = sessions.tasks.join_next(), if !sessions.tasks.is_empty() => {
                    if let Ok(key) = ended {
                        sessions.targets.remove(&key);
                    }
                    continue;
                }
                _ = recheck.tick(), if !sessions.waiting.is_empty() => {
                    let enrolled: Vec<String> = sessions
                        .waiting
                        .keys()
                        .filter(|id| self.policy.contains(id))
                        .cloned()
                        .collect();
                    for id in enrolled {
                        if let Some(peer) = sessions.waiting.remove(&id) {
                            self.target(&mut sessions, TargetKey::Id(id), peer, &cancel);
                        }
                    }
                    continue;
                }
                event = events.recv() => match event {
                    Some(e) => e,
                    None => { cancel.cancelled().await; break; }
                },
            };
            match event {
                DiscoveryEvent::Found(peer) => {
                    let Some(key) = self.accept_peer(&peer) else {
                        continue;
                    };
                    if let TargetKey::Id(id) = &key {
                        if !self.policy.contains(id) && !sessions.targets.contains_key(&key) {
                            sessions.wait(id, peer);
                            continue;
                        }
                    }
                    self.target(&mut sessions, key, peer, &cancel);
                }
                DiscoveryEvent::Lost { kind, node_id } => {
                    if kind == ServiceKind::Worker {
                        tracing::debug!(worker = %node_id, "mDNS says the worker left; heartbeats decide");
                    }
                }
            }
        }
        sessions.tasks.shutdown().await;
        for (_, conn) in self.live.lock().unwrap_or_else(|p| p.into_inner()).drain() {
            conn.close(transport::CLOSE_SHUTDOWN, b"coordinator shutting down");
        }
    }

    /// Points the session of `key` at the peer's addresses, starting the session if none runs.
    fn target(
        self: &Arc<Self>,
        sessions: &mut Sessions,
        key: TargetKey,
        peer: DiscoveredPeer,
        cancel: &CancellationToken,
    ) {
        let addrs = peer.addrs.clone();
        if let Some(tx) = sessions.targets.get(&key) {
            tx.send_if_modified(|old| {
                let changed = *old != addrs;
                *old = addrs;
                changed
            });
            return;
        }
        let (tx, rx) = watch::channel(addrs);
        sessions.targets.insert(key.clone(), tx);
        let found_by = match peer.source {
            DiscoverySource::Mdns => "mdns",
            DiscoverySource::Static => "static",
            DiscoverySource::Memory => "memory",
        };
        let this = self.clone();
        let cancel = cancel.child_token();
        sessions.tasks.spawn(async move {
            this.session(key.clone(), rx, found_by, cancel).await;
            key
        });
    }

    /// Filters discovered peers: workers of this cluster only. Returns the session key.
    fn accept_peer(&self, peer: &DiscoveredPeer) -> Option<TargetKey> {
        if peer.kind != ServiceKind::Worker {
            return None;
        }
        if let Some(fp) = &peer.ca_fingerprint {
            if *fp != self.ca_fingerprint.to_string() {
                tracing::debug!(worker = %peer.node_id, "ignoring a worker of another cluster");
                return None;
            }
        }
        if let Some(v) = &peer.versions {
            if let Err(e) = ragd_shared::protocol::SUPPORTED_VERSIONS.negotiate(v) {
                tracing::warn!(worker = %peer.node_id, error = %e, "not dialling an incompatible worker");
                return None;
            }
        }
        if peer.node_id.is_empty() {
            let name = peer
                .addrs
                .first()
                .map(|a| a.to_string())
                .unwrap_or_default();
            Some(TargetKey::Static(name))
        } else {
            Some(TargetKey::Id(peer.node_id.clone()))
        }
    }

    async fn session(
        self: Arc<Self>,
        key: TargetKey,
        addrs: watch::Receiver<Vec<SocketAddr>>,
        found_by: &'static str,
        cancel: CancellationToken,
    ) {
        let mut backoff = Backoff::new(self.reconnect.0, self.reconnect.1);
        let mut known_id = match &key {
            TargetKey::Id(id) => Some(id.clone()),
            TargetKey::Static(_) => None,
        };
        let mut failures = 0u32;
        while !cancel.is_cancelled() {
            if let TargetKey::Id(id) = &key {
                if !self.policy.contains(id) {
                    tracing::info!(worker = %id, "worker was removed: no longer dialling it");
                    break;
                }
            }
            let candidates = addrs.borrow().clone();
            match self.connect(&candidates, known_id.as_deref()).await {
                Ok((conn, id, version, caps)) => {
                    failures = 0;
                    backoff.reset();
                    known_id = Some(id.clone());
                    self.registry.connected(Connected {
                        id: id.clone(),
                        addr: conn.remote_address(),
                        found_by,
                        version,
                        capabilities: caps,
                    });
                    self.live
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(id.clone(), conn.clone());
                    // Blobs the worker pushes (fetched models, checkpoints) land in our store.
                    let intake_cancel = cancel.child_token();
                    let intake = tokio::spawn(blobs::accept_blobs(
                        conn.clone(),
                        self.blobs.clone(),
                        intake_cancel.clone(),
                    ));
                    let why = self.heartbeat_loop(&conn, &id, &cancel).await;
                    intake_cancel.cancel();
                    let _ = intake.await;
                    self.live
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&id);
                    if cancel.is_cancelled() {
                        break;
                    }
                    tracing::warn!(worker = %id, reason = %why, "worker unreachable");
                    self.registry.unreachable(&id, &why);
                    // Ask discovery (mDNS) to check the worker now; the answer arrives as events.
                    for discovery in &self.discovery {
                        let _ = tokio::time::timeout(
                            Duration::from_secs(5),
                            discovery.verify(ServiceKind::Worker, &id),
                        )
                        .await;
                    }
                }
                Err(e) => {
                    failures += 1;
                    if let Some(id) = &known_id {
                        self.registry.unreachable(id, &e);
                    }
                    if failures == 1 || failures.is_power_of_two() {
                        tracing::warn!(target_peer = ?key, attempts = failures, error = %e, "cannot reach worker");
                    }
                }
            }
            let delay = backoff.next_delay();
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// Dials the first reachable allowed address and runs the handshake.
    async fn connect(
        &self,
        addrs: &[SocketAddr],
        expected_id: Option<&str>,
    ) -> Result<
        (
            quinn::Connection,
            String,
            u16,
            Option<ragd_shared::protocol::capabilities::Capabilities>,
        ),
        String,
    > {
        let mut last_error = String::from("no address to dial");
        let mut addrs = addrs.to_vec();
        addrs.sort_by_key(|a| !a.is_ipv4());
        for addr in &addrs {
            if let Err(e) = self.guard.check(addr.ip()) {
                last_error = e.to_string();
                continue;
            }
            // Per worker: the packet size bound follows the route to it.
            let mut client_config = self.client_config.clone();
            client_config.transport_config(transport::transport_config(
                self.heartbeat_interval,
                self.heartbeat_interval * (self.heartbeat_misses + 2),
                *addr,
            ));
            let connecting =
                match self
                    .endpoint
                    .connect_with(client_config, *addr, WORKER_SERVER_NAME)
                {
                    Ok(c) => c,
                    Err(e) => {
                        last_error = format!("{addr}: {e}");
                        continue;
                    }
                };
            let conn = match tokio::time::timeout(DIAL_TIMEOUT, connecting).await {
                Ok(Ok(conn)) => conn,
                Ok(Err(e)) => {
                    last_error = format!("{addr}: {e}");
                    continue;
                }
                Err(_) => {
                    last_error = format!("{addr}: no answer within {DIAL_TIMEOUT:?}");
                    continue;
                }
            };
            let hello = Hello::new(Role::Coordinator, self.coordinator_id.clone());
            let welcome =
                match transport::client_handshake(&conn, &hello, DEFAULT_FRAME_TIMEOUT).await {
                    Ok(w) => w,
                    Err(e) => {
                        last_error = e.to_string();
                        conn.close(transport::CLOSE_REFUSED, b"handshake failed");
                        continue;
                    }
                };
            let Some(identity) = peer_identity(&conn) else {
                last_error = format!("{addr}: worker presented no certificate");
                conn.close(transport::CLOSE_REFUSED, b"no certificate");
                continue;
            };
            if let Some(expected) = expected_id {
                if identity.node_id != expected {
                    last_error = format!(
                        "{addr} answered as worker {:?}, expected {expected:?}",
                        identity.node_id
                    );
                    conn.close(transport::CLOSE_REFUSED, b"unexpected worker id");
                    continue;
                }
            }
            if welcome.node_id != identity.node_id {
                tracing::warn!(cert = %identity.node_id, said = %welcome.node_id, "worker's Welcome id differs from its certificate; using the certificate");
            }
            tracing::info!(worker = %identity.node_id, %addr, version = welcome.version, "worker connected");
            return Ok((
                conn,
                identity.node_id,
                welcome.version,
                welcome.capabilities,
            ));
        }
        Err(last_error)
    }

    /// Sends heartbeats until the worker misses too many or the connection ends; returns why.
    async fn heartbeat_loop(
        &self,
        conn: &quinn::Connection,
        id: &str,
        cancel: &CancellationToken,
    ) -> String {
        let mut ticker = tokio::time::interval(self.heartbeat_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut seq = 0u64;
        let mut misses = 0u32;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return "coordinator shutting down".into(),
                reason = conn.closed() => return format!("connection closed: {reason}"),
                _ = ticker.tick() => {}
            }
            seq += 1;
            let req = Request::Heartbeat(HeartbeatRequest {
                seq,
                want_capabilities: seq.is_multiple_of(CAPABILITY_REFRESH_BEATS),
            });
            match transport::request(conn, &req, self.heartbeat_interval).await {
                Ok(Response::Heartbeat(reply)) if reply.seq == seq => {
                    misses = 0;
                    self.registry.heartbeat(id, reply.load, reply.capabilities);
                }
                Ok(other) => {
                    misses += 1;
                    tracing::warn!(worker = %id, reply = ?other, "unexpected heartbeat reply");
                }
                Err(TransportError::Connection { source, .. }) => {
                    return format!("connection lost: {source}");
                }
                Err(e) => {
                    misses += 1;
                    tracing::debug!(worker = %id, misses, error = %e, "heartbeat missed");
                }
            }
            if misses >= self.heartbeat_misses {
                conn.close(transport::CLOSE_SHUTDOWN, b"heartbeats missed");
                return format!("{misses} heartbeats missed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ragd_shared::discovery::DiscoverySource;

    fn advertised(id: &str) -> DiscoveredPeer {
        DiscoveredPeer {
            kind: ServiceKind::Worker,
            node_id: id.into(),
            addrs: vec!["127.0.0.1:9".parse().unwrap()],
            versions: None,
            ca_fingerprint: None,
            source: DiscoverySource::Mdns,
        }
    }

    #[test]
    fn advertised_ids_that_are_not_enrolled_are_remembered_up_to_the_bound() {
        let mut sessions = Sessions::default();
        for i in 0..MAX_WAITING + 100 {
            sessions.wait(&format!("w{i}"), advertised(&format!("w{i}")));
        }
        assert_eq!(sessions.waiting.len(), MAX_WAITING);
        assert!(sessions.reported_full);
        // A name already waiting is refreshed, not refused, when the list is full.
        sessions.wait("w0", advertised("w0"));
        assert_eq!(sessions.waiting.len(), MAX_WAITING);
        assert!(
            sessions.targets.is_empty() && sessions.tasks.is_empty(),
            "nothing dialled"
        );
    }
}
