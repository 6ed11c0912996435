//! Discovery over multicast DNS (DNS-SD), with the `mdns-sd` daemon.
//!
//! A node announces one service instance per role, named after its node id, with TXT records
//! `id` (node id), `proto` (protocol versions as `min-max`), `port` (QUIC port), `ca` (cluster CA
//! fingerprint, hex) and `sw` (software version).
//!
//! Caveat: the `mdns-sd` daemon joins the mDNS multicast group on every interface when it starts,
//! before the interface selection of [`MdnsConfig::interfaces`] applies. Tests must therefore run
//! it only inside network namespaces they create.

use super::{
    validate_node_id, Advertisement, DiscoveredPeer, Discovery, DiscoveryError, DiscoveryEvent,
    DiscoverySource, ServiceKind, EVENT_CHANNEL_CAPACITY,
};
use crate::protocol::{VersionRange, SOFTWARE_VERSION};
use mdns_sd::{IfKind, ResolvedService, ScopedIp, ServiceDaemon, ServiceEvent, ServiceInfo};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long shutdown waits for each goodbye packet and for the browse tasks.
const SHUTDOWN_STEP_TIMEOUT: Duration = Duration::from_secs(3);

/// How often a browse task checks whether anyone still listens.
const IDLE_CHECK_INTERVAL: Duration = Duration::from_secs(30);

/// Longest accepted CA fingerprint, in hex characters (fits a TXT string).
const CA_FINGERPRINT_MAX_LEN: usize = 128;

/// mDNS settings (config section shape).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MdnsConfig {
    /// Interfaces to use, by name (`eth0`) or by one of their addresses; empty means all.
    pub interfaces: Vec<String>,
    /// UDP port of mDNS; `None` is the standard 5353 (other values are for tests only: every
    /// node must use the same port).
    pub port: Option<u16>,
    /// How long [`Discovery::verify`] waits for an answer before declaring the peer lost, in
    /// milliseconds; `None` is the RFC 6762 value of 10 s.
    pub verify_timeout_ms: Option<u64>,
}

/// The `[mdns]` section of the coordinator's and the worker's configuration files.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MdnsSettings {
    /// Use mDNS at all (advertise, browse).
    pub enabled: bool,
    /// Interfaces (names or addresses) mDNS uses; empty means all.
    pub interfaces: Vec<String>,
    /// UDP port of mDNS (5353 on a real network; tests may change it).
    pub port: u16,
}

impl Default for MdnsSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            interfaces: Vec::new(),
            port: 5353,
        }
    }
}

impl MdnsSettings {
    /// The [`MdnsConfig`] these settings ask for.
    pub fn to_config(&self) -> MdnsConfig {
        MdnsConfig {
            interfaces: self.interfaces.clone(),
            port: Some(self.port),
            verify_timeout_ms: None,
        }
    }
}

/// [`Discovery`] over multicast DNS. Dropping it without [`Discovery::shutdown`] stops its tasks
/// and daemon too, but without waiting for the goodbye packets.
pub struct MdnsDiscovery {
    daemon: ServiceDaemon,
    if_kinds: Vec<IfKind>,
    verify_timeout: Duration,
    cancel: CancellationToken,
    tasks: TaskTracker,
    state: Arc<Mutex<State>>,
}

#[derive(Default)]
struct State {
    shut_down: bool,
    /// (kind, node id) -> lowercased full service name, for unregistering.
    advertised: HashMap<(ServiceKind, String), String>,
    browsers: HashMap<ServiceKind, Browser>,
}

#[derive(Default)]
struct Browser {
    subscribers: Vec<mpsc::Sender<DiscoveryEvent>>,
    /// Lowercased full service name -> last reported peer.
    known: HashMap<String, DiscoveredPeer>,
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // A panic while holding the lock leaves plain maps behind: still usable.
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn mdns_err(action: &'static str) -> impl FnOnce(mdns_sd::Error) -> DiscoveryError {
    move |source| DiscoveryError::Mdns { action, source }
}

impl MdnsDiscovery {
    /// Starts the mDNS daemon on the configured port and interfaces.
    pub fn new(cfg: &MdnsConfig) -> Result<Self, DiscoveryError> {
        let port = cfg.port.unwrap_or(mdns_sd::MDNS_PORT);
        let daemon = ServiceDaemon::new_with_port(port).map_err(mdns_err("start the daemon"))?;
        let if_kinds: Vec<IfKind> = cfg
            .interfaces
            .iter()
            .map(|s| match s.parse::<IpAddr>() {
                Ok(ip) => IfKind::Addr(ip),
                Err(_) => IfKind::Name(s.clone()),
            })
            .collect();
        if !if_kinds.is_empty() {
            daemon
                .disable_interface(IfKind::All)
                .map_err(mdns_err("disable the unselected interfaces"))?;
            daemon
                .enable_interface(if_kinds.clone())
                .map_err(mdns_err("enable the selected interfaces"))?;
        }
        tracing::info!(port, interfaces = ?cfg.interfaces, "mDNS discovery started");
        Ok(Self {
            daemon,
            if_kinds,
            verify_timeout: cfg
                .verify_timeout_ms
                .map_or(mdns_sd::VERIFY_TIMEOUT_DEFAULT, Duration::from_millis),
            cancel: CancellationToken::new(),
            tasks: TaskTracker::new(),
            state: Arc::new(Mutex::new(State::default())),
        })
    }

    fn fullname_of(&self, kind: ServiceKind, node_id: &str) -> String {
        let browsed = lock(&self.state).browsers.get(&kind).and_then(|b| {
            b.known
                .iter()
                .find(|(_, p)| p.node_id == node_id)
                .map(|(name, _)| name.clone())
        });
        browsed.unwrap_or_else(|| format!("{node_id}.{}", kind.service_type()).to_lowercase())
    }
}

#[async_trait::async_trait]
impl Discovery for MdnsDiscovery {
    fn advertise(&self, ad: &Advertisement) -> Result<(), DiscoveryError> {
        validate_node_id(&ad.node_id)?;
        if ad.ca_fingerprint.is_empty()
            || ad.ca_fingerprint.len() > CA_FINGERPRINT_MAX_LEN
            || !ad.ca_fingerprint.bytes().all(|b| b.is_ascii_hexdigit())
        {
            return Err(DiscoveryError::InvalidCaFingerprint {
                fingerprint: ad.ca_fingerprint.clone(),
            });
        }
        if lock(&self.state).shut_down {
            return Err(DiscoveryError::ShutDown);
        }
        let props = [
            ("id", ad.node_id.clone()),
            ("proto", format!("{}-{}", ad.versions.min, ad.versions.max)),
            ("port", ad.port.to_string()),
            ("ca", ad.ca_fingerprint.to_ascii_lowercase()),
            ("sw", SOFTWARE_VERSION.to_string()),
        ];
        let props: HashMap<String, String> =
            props.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        let host = format!("{}.local.", ad.node_id.replace('_', "-"));
        let mut info = ServiceInfo::new(
            ad.kind.service_type(),
            &ad.node_id,
            &host,
            (),
            ad.port,
            props,
        )
        .map_err(mdns_err("build the service announcement"))?
        .enable_addr_auto();
        if !self.if_kinds.is_empty() {
            info.set_interfaces(self.if_kinds.clone());
        }
        let fullname = info.get_fullname().to_lowercase();
        self.daemon
            .register(info)
            .map_err(mdns_err("register the service"))?;
        tracing::info!(kind = %ad.kind, node_id = %ad.node_id, port = ad.port, "advertising over mDNS");
        lock(&self.state)
            .advertised
            .insert((ad.kind, ad.node_id.clone()), fullname);
        Ok(())
    }

    /// Browses of the same kind share one mDNS query (the daemon allows one per service type);
    /// a later receiver first gets the peers already known. The query stops when no receiver is
    /// left.
    fn browse(&self, kind: ServiceKind) -> Result<mpsc::Receiver<DiscoveryEvent>, DiscoveryError> {
        let runtime =
            tokio::runtime::Handle::try_current().map_err(|_| DiscoveryError::NoRuntime)?;
        let mut state = lock(&self.state);
        if state.shut_down {
            return Err(DiscoveryError::ShutDown);
        }
        if let Some(browser) = state.browsers.get_mut(&kind) {
            // The daemon allows one query per service type: share the running one.
            let (tx, rx) = mpsc::channel(EVENT_CHANNEL_CAPACITY.max(browser.known.len() + 1));
            for peer in browser.known.values() {
                // Cannot fail: the channel is new and large enough.
                let _ = tx.try_send(DiscoveryEvent::Found(peer.clone()));
            }
            browser.subscribers.push(tx);
            return Ok(rx);
        }
        let events = self
            .daemon
            .browse(kind.service_type())
            .map_err(mdns_err("start browsing"))?;
        let (tx, rx) = mpsc::channel(EVENT_CHANNEL_CAPACITY);
        state.browsers.insert(
            kind,
            Browser {
                subscribers: vec![tx],
                known: HashMap::new(),
            },
        );
        drop(state);
        let task = BrowseTask {
            kind,
            daemon: self.daemon.clone(),
            state: self.state.clone(),
            cancel: self.cancel.child_token(),
        };
        self.tasks.spawn_on(task.run(events), &runtime);
        tracing::debug!(%kind, "mDNS browsing started");
        Ok(rx)
    }

    /// Queries the instance's records again; if nobody answers within the verify timeout, the
    /// records are flushed and a `Lost` follows on the browse receivers (a peer no browse has seen
    /// is not in the cache: nothing happens).
    async fn verify(&self, kind: ServiceKind, node_id: &str) -> Result<(), DiscoveryError> {
        validate_node_id(node_id)?;
        if lock(&self.state).shut_down {
            return Err(DiscoveryError::ShutDown);
        }
        let fullname = self.fullname_of(kind, node_id);
        tracing::debug!(%kind, node_id, timeout = ?self.verify_timeout, "verifying peer over mDNS");
        self.daemon
            .verify(fullname, self.verify_timeout)
            .map_err(mdns_err("ask whether the peer is still there"))
    }

    async fn shutdown(&self) {
        let advertised: Vec<String> = {
            let mut state = lock(&self.state);
            if state.shut_down {
                return;
            }
            state.shut_down = true;
            state.advertised.drain().map(|(_, name)| name).collect()
        };
        for fullname in advertised {
            match self.daemon.unregister(&fullname) {
                Ok(done) => {
                    if tokio::time::timeout(SHUTDOWN_STEP_TIMEOUT, done.recv_async())
                        .await
                        .is_err()
                    {
                        tracing::warn!(%fullname, "mDNS goodbye not confirmed in time");
                    }
                }
                Err(error) => tracing::warn!(%fullname, %error, "mDNS unregister failed"),
            }
        }
        self.cancel.cancel();
        self.tasks.close();
        if tokio::time::timeout(SHUTDOWN_STEP_TIMEOUT, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("mDNS browse tasks did not stop in time");
        }
        // Close every receiver, including those of tasks that did not stop.
        lock(&self.state).browsers.clear();
        match self.daemon.shutdown() {
            Ok(done) => {
                let _ = tokio::time::timeout(SHUTDOWN_STEP_TIMEOUT, done.recv_async()).await;
            }
            Err(error) => tracing::debug!(%error, "mDNS daemon already stopped"),
        }
        tracing::info!("mDNS discovery shut down");
    }
}

impl Drop for MdnsDiscovery {
    fn drop(&mut self) {
        self.cancel.cancel();
        let shut_down = std::mem::replace(&mut lock(&self.state).shut_down, true);
        if !shut_down {
            // Best effort: without a runtime we cannot wait for the goodbye packets.
            let _ = self.daemon.shutdown();
        }
    }
}

/// The task that turns the daemon's events for one service type into [`DiscoveryEvent`]s.
struct BrowseTask {
    kind: ServiceKind,
    daemon: ServiceDaemon,
    state: Arc<Mutex<State>>,
    cancel: CancellationToken,
}

impl BrowseTask {
    async fn run(self, events: mdns_sd::Receiver<ServiceEvent>) {
        let mut idle_check = tokio::time::interval(IDLE_CHECK_INTERVAL);
        idle_check.reset(); // the first tick would be immediate
        'events: loop {
            let event = tokio::select! {
                _ = self.cancel.cancelled() => break,
                _ = idle_check.tick() => {
                    if self.stop_if_unwatched() {
                        return;
                    }
                    continue;
                }
                event = events.recv_async() => match event {
                    Ok(event) => event,
                    Err(_) => break, // daemon stopped
                },
            };
            let Some(out) = self.translate(event) else {
                continue;
            };
            let subscribers = match lock(&self.state).browsers.get(&self.kind) {
                Some(b) => b.subscribers.clone(),
                None => return,
            };
            for subscriber in subscribers {
                tokio::select! {
                    _ = self.cancel.cancelled() => break 'events,
                    // A closed subscriber is pruned below.
                    _ = subscriber.send(out.clone()) => {}
                }
            }
            if self.stop_if_unwatched() {
                return;
            }
        }
        self.stop(&mut lock(&self.state));
    }

    /// Prunes closed subscribers; when none is left, stops the query and returns true.
    fn stop_if_unwatched(&self) -> bool {
        let mut state = lock(&self.state);
        let Some(browser) = state.browsers.get_mut(&self.kind) else {
            return true;
        };
        browser.subscribers.retain(|s| !s.is_closed());
        if browser.subscribers.is_empty() {
            self.stop(&mut state);
            true
        } else {
            false
        }
    }

    /// Stops the daemon's query and forgets the browser. Called with the state locked, so the
    /// stop reaches the daemon before the query of a later `browse` of the same kind.
    fn stop(&self, state: &mut State) {
        if let Err(error) = self.daemon.stop_browse(self.kind.service_type()) {
            tracing::debug!(kind = %self.kind, %error, "stop_browse failed (daemon stopped?)");
        }
        state.browsers.remove(&self.kind);
        tracing::debug!(kind = %self.kind, "mDNS browsing stopped");
    }

    /// Updates the known peers and returns the event to report, if anything changed.
    fn translate(&self, event: ServiceEvent) -> Option<DiscoveryEvent> {
        let mut state = lock(&self.state);
        let browser = state.browsers.get_mut(&self.kind)?;
        match event {
            ServiceEvent::ServiceResolved(service) => {
                let peer = peer_from_resolved(self.kind, &service)?;
                let key = service.fullname.to_lowercase();
                if browser.known.get(&key) == Some(&peer) {
                    return None; // duplicate resolve
                }
                tracing::debug!(kind = %self.kind, node_id = %peer.node_id, addrs = ?peer.addrs, "mDNS peer found");
                browser.known.insert(key, peer.clone());
                Some(DiscoveryEvent::Found(peer))
            }
            ServiceEvent::ServiceRemoved(_, fullname) => {
                let peer = browser.known.remove(&fullname.to_lowercase())?;
                tracing::debug!(kind = %self.kind, node_id = %peer.node_id, "mDNS peer lost");
                Some(DiscoveryEvent::Lost {
                    kind: self.kind,
                    node_id: peer.node_id,
                })
            }
            _ => None,
        }
    }
}

/// Builds a peer from a resolved service, or `None` (logged) when it is unusable.
fn peer_from_resolved(kind: ServiceKind, service: &ResolvedService) -> Option<DiscoveredPeer> {
    let instance = service
        .fullname
        .strip_suffix(kind.service_type())
        .and_then(|s| s.strip_suffix('.'))
        .unwrap_or(&service.fullname);
    let node_id = match service.get_property_val_str("id") {
        Some(id) if validate_node_id(id).is_ok() => id.to_string(),
        _ => instance.to_string(),
    };
    if validate_node_id(&node_id).is_err() {
        tracing::warn!(fullname = %service.fullname, "ignoring mDNS service without a valid node id");
        return None;
    }
    let versions = service.get_property_val_str("proto").and_then(|v| {
        v.parse::<VersionRange>()
            .map_err(
                |error| tracing::warn!(%node_id, %error, "ignoring malformed `proto` TXT record"),
            )
            .ok()
    });
    let ca_fingerprint = service
        .get_property_val_str("ca")
        .filter(|ca| !ca.is_empty())
        .map(str::to_ascii_lowercase);
    let port = service.get_port();
    if let Some(txt_port) = service.get_property_val_str("port") {
        if txt_port.parse::<u16>() != Ok(port) {
            tracing::warn!(%node_id, srv_port = port, %txt_port, "TXT port differs from SRV port; using SRV");
        }
    }
    let mut addrs: Vec<SocketAddr> = service
        .get_addresses()
        .iter()
        .map(|ip| socket_addr(ip, port))
        .collect();
    addrs.sort_by_key(|a| (a.is_ipv6(), *a));
    addrs.dedup();
    if addrs.is_empty() {
        return None;
    }
    Some(DiscoveredPeer {
        kind,
        node_id,
        addrs,
        versions,
        ca_fingerprint,
        source: DiscoverySource::Mdns,
    })
}

/// A socket address for `ip`; link-local IPv6 addresses keep their interface as scope id.
fn socket_addr(ip: &ScopedIp, port: u16) -> SocketAddr {
    match ip {
        ScopedIp::V4(v4) => SocketAddr::V4(SocketAddrV4::new(*v4.addr(), port)),
        ScopedIp::V6(v6) => {
            let addr = *v6.addr();
            let scope = if addr.is_unicast_link_local() {
                v6.scope_id().index
            } else {
                0
            };
            SocketAddr::V6(SocketAddrV6::new(addr, port, 0, scope))
        }
        // `ScopedIp` is non-exhaustive: a future kind falls back to the plain address.
        other => SocketAddr::new(other.to_ip_addr(), port),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_shape() {
        let cfg: MdnsConfig =
            serde_json::from_str(r#"{"interfaces": ["eth0", "192.168.1.5"], "port": 5454}"#)
                .unwrap();
        assert_eq!(cfg.interfaces, ["eth0", "192.168.1.5"]);
        assert_eq!(cfg.port, Some(5454));
        assert_eq!(cfg.verify_timeout_ms, None);
        assert_eq!(
            serde_json::from_str::<MdnsConfig>("{}").unwrap(),
            MdnsConfig::default()
        );
    }
}
