//! Discovery from a fixed list of `host:port` peers (the `--peer` option / `peers` config key).
//!
//! Static peers announce nothing, so what they are is unknown until the handshake: every
//! [`DiscoveredPeer`] has an **empty `node_id`**, no versions and no CA fingerprint, and is
//! reported under whichever [`ServiceKind`] was browsed. Names are resolved at once and again every
//! resolve interval (and on [`Discovery::verify`]); a peer is reported again when its addresses
//! change. A name that stops resolving keeps its last addresses (no `Lost` event): liveness is
//! the business of the QUIC heartbeats.

use super::{
    Advertisement, DiscoveredPeer, Discovery, DiscoveryError, DiscoveryEvent, DiscoverySource,
    ServiceKind, EVENT_CHANNEL_CAPACITY,
};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Default time between two resolutions of the peer names.
pub const DEFAULT_RESOLVE_INTERVAL: Duration = Duration::from_secs(60);
/// Shortest accepted resolve interval.
pub const MIN_RESOLVE_INTERVAL: Duration = Duration::from_secs(1);
/// Longest accepted resolve interval.
pub const MAX_RESOLVE_INTERVAL: Duration = Duration::from_secs(3600);
/// How long one name resolution may take.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long shutdown waits for the browse tasks.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(3);

/// One configured peer.
#[derive(Debug, Clone, PartialEq, Eq)]
struct StaticPeer {
    /// The `host:port` text as configured (what is resolved).
    spec: String,
}

/// [`Discovery`] from a fixed peer list; see the module documentation.
pub struct StaticDiscovery {
    peers: Arc<Vec<StaticPeer>>,
    interval: Duration,
    resolver: Resolver,
    cancel: CancellationToken,
    tasks: TaskTracker,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    shut_down: bool,
    /// One wake-up per browse task, poked by `verify`.
    refreshers: Vec<Arc<Notify>>,
}

/// How names are turned into addresses.
#[derive(Clone)]
enum Resolver {
    /// The system resolver (`tokio::net::lookup_host`).
    System,
    /// A fixed table, for tests: spec -> addresses (missing = resolution failure).
    #[cfg(test)]
    Table(Arc<Mutex<HashMap<String, Vec<SocketAddr>>>>),
}

impl Resolver {
    async fn resolve(&self, spec: &str) -> Result<Vec<SocketAddr>, String> {
        let found: Vec<SocketAddr> = match self {
            Resolver::System => {
                match tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host(spec)).await {
                    Ok(Ok(addrs)) => addrs.collect(),
                    Ok(Err(e)) => return Err(e.to_string()),
                    Err(_) => return Err(format!("no answer within {RESOLVE_TIMEOUT:?}")),
                }
            }
            #[cfg(test)]
            Resolver::Table(table) => table
                .lock()
                .unwrap()
                .get(spec)
                .cloned()
                .ok_or_else(|| "not in the test table".to_string())?,
        };
        let mut addrs = found;
        addrs.sort_by_key(|a| (a.is_ipv6(), *a));
        addrs.dedup();
        if addrs.is_empty() {
            Err("the name has no address".into())
        } else {
            Ok(addrs)
        }
    }
}

/// Checks the `host:port` syntax of a static peer entry.
fn parse_peer(spec: &str) -> Result<StaticPeer, DiscoveryError> {
    let bad = |reason: &str| DiscoveryError::InvalidStaticPeer {
        peer: spec.to_string(),
        reason: reason.to_string(),
    };
    let spec = spec.trim();
    if let Ok(addr) = spec.parse::<SocketAddr>() {
        if addr.port() == 0 {
            return Err(bad("port 0 cannot be dialed"));
        }
        return Ok(StaticPeer {
            spec: spec.to_string(),
        });
    }
    let (host, port) = spec
        .rsplit_once(':')
        .ok_or_else(|| bad("the port is missing"))?;
    if host.is_empty() {
        return Err(bad("the host is missing"));
    }
    if host.contains(':') || host.starts_with('[') {
        return Err(bad(
            "an IPv6 address must be written in brackets, e.g. [fd00::1]:7400",
        ));
    }
    match port.parse::<u16>() {
        Ok(0) => Err(bad("port 0 cannot be dialed")),
        Ok(_) => Ok(StaticPeer {
            spec: spec.to_string(),
        }),
        Err(_) => Err(bad("the port is not a number from 1 to 65535")),
    }
}

impl StaticDiscovery {
    /// A discovery over `peers` (`host:port` entries: IPv4, `[IPv6]` or a DNS name), resolved
    /// every [`DEFAULT_RESOLVE_INTERVAL`]. Fails on a malformed entry.
    pub fn new(peers: Vec<String>) -> Result<Self, DiscoveryError> {
        let peers = peers
            .iter()
            .map(|p| parse_peer(p))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            peers: Arc::new(peers),
            interval: DEFAULT_RESOLVE_INTERVAL,
            resolver: Resolver::System,
            cancel: CancellationToken::new(),
            tasks: TaskTracker::new(),
            state: Mutex::new(State::default()),
        })
    }

    /// Sets the re-resolution interval, clamped to [`MIN_RESOLVE_INTERVAL`]..=[`MAX_RESOLVE_INTERVAL`].
    pub fn with_resolve_interval(mut self, interval: Duration) -> Self {
        self.interval = interval.clamp(MIN_RESOLVE_INTERVAL, MAX_RESOLVE_INTERVAL);
        self
    }

    /// The configured entries, as given.
    pub fn peers(&self) -> Vec<String> {
        self.peers.iter().map(|p| p.spec.clone()).collect()
    }

    #[cfg(test)]
    fn with_table(mut self, table: Arc<Mutex<HashMap<String, Vec<SocketAddr>>>>) -> Self {
        self.resolver = Resolver::Table(table);
        self
    }
}

#[async_trait::async_trait]
impl Discovery for StaticDiscovery {
    /// Static peers advertise nothing: this accepts the advertisement and does nothing with it.
    fn advertise(&self, ad: &Advertisement) -> Result<(), DiscoveryError> {
        tracing::debug!(kind = %ad.kind, node_id = %ad.node_id, "static discovery: nothing to advertise");
        Ok(())
    }

    fn browse(&self, kind: ServiceKind) -> Result<mpsc::Receiver<DiscoveryEvent>, DiscoveryError> {
        let runtime =
            tokio::runtime::Handle::try_current().map_err(|_| DiscoveryError::NoRuntime)?;
        let refresh = Arc::new(Notify::new());
        {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if state.shut_down {
                return Err(DiscoveryError::ShutDown);
            }
            // Forget the wake-ups of browse tasks that ended (their receiver was dropped).
            state.refreshers.retain(|r| Arc::strong_count(r) > 1);
            state.refreshers.push(refresh.clone());
        }
        let (tx, rx) = mpsc::channel(EVENT_CHANNEL_CAPACITY);
        let task = ResolveTask {
            kind,
            peers: self.peers.clone(),
            interval: self.interval,
            resolver: self.resolver.clone(),
            refresh,
            cancel: self.cancel.child_token(),
            tx,
        };
        self.tasks.spawn_on(task.run(), &runtime);
        Ok(rx)
    }

    /// Static peers have no node id before the handshake: this re-resolves every peer name now
    /// (whatever `node_id` is), and reports changed addresses as `Found`.
    async fn verify(&self, _kind: ServiceKind, _node_id: &str) -> Result<(), DiscoveryError> {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.shut_down {
            return Err(DiscoveryError::ShutDown);
        }
        for refresh in &state.refreshers {
            refresh.notify_one();
        }
        Ok(())
    }

    async fn shutdown(&self) {
        {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            state.shut_down = true;
            state.refreshers.clear();
        }
        self.cancel.cancel();
        self.tasks.close();
        if tokio::time::timeout(SHUTDOWN_TIMEOUT, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("static discovery tasks did not stop in time");
        }
    }
}

impl Drop for StaticDiscovery {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Resolves the peer list periodically for one browse receiver.
struct ResolveTask {
    kind: ServiceKind,
    peers: Arc<Vec<StaticPeer>>,
    interval: Duration,
    resolver: Resolver,
    refresh: Arc<Notify>,
    cancel: CancellationToken,
    tx: mpsc::Sender<DiscoveryEvent>,
}

impl ResolveTask {
    async fn run(self) {
        let mut last: HashMap<String, Vec<SocketAddr>> = HashMap::new();
        loop {
            for peer in self.peers.iter() {
                let resolved = tokio::select! {
                    _ = self.cancel.cancelled() => return,
                    r = self.resolver.resolve(&peer.spec) => r,
                };
                let addrs = match resolved {
                    Ok(addrs) => addrs,
                    Err(error) => {
                        tracing::warn!(peer = %peer.spec, %error, "cannot resolve static peer; will retry");
                        continue;
                    }
                };
                if last.get(&peer.spec) == Some(&addrs) {
                    continue;
                }
                tracing::debug!(peer = %peer.spec, ?addrs, "static peer resolved");
                last.insert(peer.spec.clone(), addrs.clone());
                let event = DiscoveryEvent::Found(DiscoveredPeer {
                    kind: self.kind,
                    node_id: String::new(),
                    addrs,
                    versions: None,
                    ca_fingerprint: None,
                    source: DiscoverySource::Static,
                });
                tokio::select! {
                    _ = self.cancel.cancelled() => return,
                    sent = self.tx.send(event) => if sent.is_err() { return },
                }
            }
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = self.tx.closed() => return,
                _ = tokio::time::sleep(self.interval) => {}
                _ = self.refresh.notified() => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(event: DiscoveryEvent) -> DiscoveredPeer {
        match event {
            DiscoveryEvent::Found(p) => p,
            other => panic!("expected Found, got {other:?}"),
        }
    }

    async fn next(rx: &mut mpsc::Receiver<DiscoveryEvent>) -> DiscoveryEvent {
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("no event within 5 s")
            .expect("channel closed")
    }

    #[test]
    fn entries_are_checked() {
        for good in [
            "192.168.1.20:7400",
            "[fe80::1]:7400",
            "worker1.lan:7400",
            "localhost:1",
        ] {
            assert!(parse_peer(good).is_ok(), "{good}");
        }
        for (bad, why) in [
            ("192.168.1.20", "port is missing"),
            (":7400", "host is missing"),
            ("host:0", "port 0"),
            ("host:70000", "1 to 65535"),
            ("fe80::1:7400", "brackets"),
            ("10.0.0.1:0", "port 0"),
        ] {
            let msg = parse_peer(bad).unwrap_err().to_string();
            assert!(
                msg.contains(why) && msg.contains("host:port"),
                "{bad}: {msg}"
            );
        }
        assert!(StaticDiscovery::new(vec!["a:1".into(), "b".into()]).is_err());
    }

    #[tokio::test]
    async fn literal_and_localhost_peers_are_found_with_unknown_id() {
        let d =
            StaticDiscovery::new(vec!["10.1.2.3:7400".into(), "localhost:7401".into()]).unwrap();
        d.advertise(&Advertisement {
            kind: ServiceKind::Worker,
            node_id: "w1".into(),
            port: 1,
            versions: crate::protocol::SUPPORTED_VERSIONS,
            ca_fingerprint: "ab".into(),
        })
        .unwrap();
        let mut rx = d.browse(ServiceKind::Worker).unwrap();
        let first = found(next(&mut rx).await);
        assert_eq!(first.addrs, vec!["10.1.2.3:7400".parse().unwrap()]);
        assert_eq!(first.node_id, "");
        assert_eq!(first.source, DiscoverySource::Static);
        assert_eq!(first.kind, ServiceKind::Worker);
        assert_eq!((first.versions, first.ca_fingerprint), (None, None));
        let second = found(next(&mut rx).await);
        assert!(!second.addrs.is_empty());
        assert!(
            second
                .addrs
                .iter()
                .all(|a| a.ip().is_loopback() && a.port() == 7401),
            "{second:?}"
        );
        d.shutdown().await;
        assert!(
            next_or_closed(&mut rx).await.is_none(),
            "receiver must close"
        );
        assert!(matches!(
            d.browse(ServiceKind::Worker),
            Err(DiscoveryError::ShutDown)
        ));
    }

    async fn next_or_closed(rx: &mut mpsc::Receiver<DiscoveryEvent>) -> Option<DiscoveryEvent> {
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("receiver neither closed nor produced an event")
    }

    #[tokio::test]
    async fn address_change_is_reported_again_and_failures_keep_quiet() {
        let table = Arc::new(Mutex::new(HashMap::new()));
        let a1: SocketAddr = "192.168.1.20:7400".parse().unwrap();
        let a2: SocketAddr = "192.168.1.21:7400".parse().unwrap();
        table
            .lock()
            .unwrap()
            .insert("w.lan:7400".to_string(), vec![a1]);
        let d = StaticDiscovery::new(vec!["w.lan:7400".into(), "gone.lan:7400".into()])
            .unwrap()
            .with_table(table.clone());
        let mut rx = d.browse(ServiceKind::Coordinator).unwrap();
        let p = found(next(&mut rx).await);
        assert_eq!((p.kind, p.addrs), (ServiceKind::Coordinator, vec![a1]));

        // Same addresses: nothing new after a forced refresh.
        d.verify(ServiceKind::Coordinator, "").await.unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(300), rx.recv())
                .await
                .is_err(),
            "unchanged addresses must not be reported again"
        );

        table
            .lock()
            .unwrap()
            .insert("w.lan:7400".to_string(), vec![a2, a1]);
        d.verify(ServiceKind::Coordinator, "").await.unwrap();
        let p = found(next(&mut rx).await);
        assert_eq!(p.addrs, vec![a1, a2], "sorted, both addresses");

        // Resolution failure keeps the last addresses and reports nothing.
        table.lock().unwrap().clear();
        d.verify(ServiceKind::Coordinator, "").await.unwrap();
        assert!(tokio::time::timeout(Duration::from_millis(300), rx.recv())
            .await
            .is_err());
        d.shutdown().await;
        d.shutdown().await; // idempotent
        assert!(next_or_closed(&mut rx).await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn periodic_re_resolution_uses_the_interval() {
        let table = Arc::new(Mutex::new(HashMap::new()));
        let a1: SocketAddr = "10.0.0.1:1".parse().unwrap();
        let a2: SocketAddr = "10.0.0.2:1".parse().unwrap();
        table.lock().unwrap().insert("h:1".to_string(), vec![a1]);
        let d = StaticDiscovery::new(vec!["h:1".into()])
            .unwrap()
            .with_resolve_interval(Duration::from_millis(1)) // clamped to 1 s
            .with_table(table.clone());
        assert_eq!(d.interval, MIN_RESOLVE_INTERVAL);
        let mut rx = d.browse(ServiceKind::Worker).unwrap();
        assert_eq!(found(next(&mut rx).await).addrs, vec![a1]);
        table.lock().unwrap().insert("h:1".to_string(), vec![a2]);
        let started = tokio::time::Instant::now();
        assert_eq!(found(next(&mut rx).await).addrs, vec![a2]);
        assert!(started.elapsed() >= MIN_RESOLVE_INTERVAL);
        d.shutdown().await;
    }
}
