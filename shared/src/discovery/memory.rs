//! An in-process discovery registry, for unit tests of the coordinator and workers.
//!
//! [`MemoryDiscovery::new`] creates a simulated network; clones share it *as the same node*, and
//! [`MemoryDiscovery::node`] gives another node on the same network. Advertisements are reported
//! with the address `127.0.0.1:<port>`. [`MemoryDiscovery::withdraw`] is a clean departure (`Lost`
//! at once, like an mDNS goodbye); [`MemoryDiscovery::crash`] is a silent one, noticed only by
//! [`Discovery::verify`] (like a killed process on mDNS).

use super::{
    Advertisement, DiscoveredPeer, Discovery, DiscoveryError, DiscoveryEvent, DiscoverySource,
    ServiceKind, EVENT_CHANNEL_CAPACITY,
};
use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::mpsc;

/// [`Discovery`] over an in-process registry; see the module documentation.
#[derive(Clone)]
pub struct MemoryDiscovery {
    registry: Arc<Mutex<Registry>>,
    node: u64,
}

#[derive(Default)]
struct Registry {
    next_node: u64,
    /// (kind, node id) -> (advertising node handle, peer).
    ads: HashMap<(ServiceKind, String), (u64, DiscoveredPeer)>,
    /// Advertisements that vanished silently; `verify` turns them into `Lost`.
    crashed: HashSet<(ServiceKind, String)>,
    subscribers: Vec<Subscriber>,
    shut_down: HashSet<u64>,
}

struct Subscriber {
    node: u64,
    kind: ServiceKind,
    tx: mpsc::Sender<DiscoveryEvent>,
}

impl Registry {
    /// Sends `event` to the subscribers of `kind`, pruning closed ones. Never blocks: a subscriber
    /// more than [`EVENT_CHANNEL_CAPACITY`] events behind loses the event (logged).
    fn publish(&mut self, kind: ServiceKind, event: &DiscoveryEvent) {
        self.subscribers.retain(|s| {
            if s.kind != kind {
                return !s.tx.is_closed();
            }
            match s.tx.try_send(event.clone()) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    tracing::error!(%kind, "memory discovery subscriber is full; event dropped");
                    true
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            }
        });
    }

    fn remove(&mut self, key: &(ServiceKind, String)) -> bool {
        if self.ads.remove(key).is_some() {
            let event = DiscoveryEvent::Lost {
                kind: key.0,
                node_id: key.1.clone(),
            };
            self.publish(key.0, &event);
            true
        } else {
            false
        }
    }
}

impl Default for MemoryDiscovery {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryDiscovery {
    /// A new, empty simulated network, and this node on it.
    pub fn new() -> Self {
        Self {
            registry: Arc::new(Mutex::new(Registry {
                next_node: 1,
                ..Registry::default()
            })),
            node: 0,
        }
    }

    /// Another node on the same simulated network (its own advertisements and shutdown).
    pub fn node(&self) -> Self {
        let mut reg = self.lock();
        let node = reg.next_node;
        reg.next_node += 1;
        Self {
            registry: self.registry.clone(),
            node,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Removes every advertisement of `node_id` (any node, any kind) and reports it `Lost`, like
    /// an mDNS goodbye. Returns whether anything was advertised under that id.
    pub fn withdraw(&self, node_id: &str) -> bool {
        let mut reg = self.lock();
        let mut any = false;
        for kind in ServiceKind::ALL {
            any |= reg.remove(&(kind, node_id.to_string()));
        }
        any
    }

    /// Removes every advertisement of `node_id` *without* telling anyone, like a killed process;
    /// a later [`Discovery::verify`] of it reports `Lost`. Returns whether anything was advertised.
    pub fn crash(&self, node_id: &str) -> bool {
        let mut reg = self.lock();
        let mut any = false;
        for kind in ServiceKind::ALL {
            let key = (kind, node_id.to_string());
            if reg.ads.remove(&key).is_some() {
                reg.crashed.insert(key);
                any = true;
            }
        }
        any
    }

    /// The peers of `kind` currently advertised on the simulated network.
    pub fn advertised(&self, kind: ServiceKind) -> Vec<DiscoveredPeer> {
        let mut peers: Vec<_> = self
            .lock()
            .ads
            .iter()
            .filter(|((k, _), _)| *k == kind)
            .map(|(_, (_, p))| p.clone())
            .collect();
        peers.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        peers
    }
}

#[async_trait::async_trait]
impl Discovery for MemoryDiscovery {
    fn advertise(&self, ad: &Advertisement) -> Result<(), DiscoveryError> {
        super::validate_node_id(&ad.node_id)?;
        let mut reg = self.lock();
        if reg.shut_down.contains(&self.node) {
            return Err(DiscoveryError::ShutDown);
        }
        let peer = DiscoveredPeer {
            kind: ad.kind,
            node_id: ad.node_id.clone(),
            addrs: vec![SocketAddr::from((Ipv4Addr::LOCALHOST, ad.port))],
            versions: Some(ad.versions),
            ca_fingerprint: Some(ad.ca_fingerprint.to_ascii_lowercase()),
            source: DiscoverySource::Memory,
        };
        let key = (ad.kind, ad.node_id.clone());
        reg.crashed.remove(&key);
        let unchanged = reg.ads.get(&key).is_some_and(|(_, old)| *old == peer);
        reg.ads.insert(key, (self.node, peer.clone()));
        if !unchanged {
            reg.publish(ad.kind, &DiscoveryEvent::Found(peer));
        }
        Ok(())
    }

    fn browse(&self, kind: ServiceKind) -> Result<mpsc::Receiver<DiscoveryEvent>, DiscoveryError> {
        let mut reg = self.lock();
        if reg.shut_down.contains(&self.node) {
            return Err(DiscoveryError::ShutDown);
        }
        let existing: Vec<DiscoveredPeer> = reg
            .ads
            .iter()
            .filter(|((k, _), _)| *k == kind)
            .map(|(_, (_, p))| p.clone())
            .collect();
        let (tx, rx) = mpsc::channel(EVENT_CHANNEL_CAPACITY.max(existing.len() + 1));
        for peer in existing {
            // Cannot fail: the channel is new and large enough.
            let _ = tx.try_send(DiscoveryEvent::Found(peer));
        }
        reg.subscribers.push(Subscriber {
            node: self.node,
            kind,
            tx,
        });
        Ok(rx)
    }

    /// Reports `Lost` if `node_id` crashed (see [`MemoryDiscovery::crash`]); otherwise nothing.
    async fn verify(&self, kind: ServiceKind, node_id: &str) -> Result<(), DiscoveryError> {
        let mut reg = self.lock();
        if reg.shut_down.contains(&self.node) {
            return Err(DiscoveryError::ShutDown);
        }
        if reg.crashed.remove(&(kind, node_id.to_string())) {
            let event = DiscoveryEvent::Lost {
                kind,
                node_id: node_id.to_string(),
            };
            reg.publish(kind, &event);
        }
        Ok(())
    }

    /// Withdraws this node's advertisements (reported `Lost`) and closes its receivers.
    async fn shutdown(&self) {
        let mut reg = self.lock();
        if !reg.shut_down.insert(self.node) {
            return;
        }
        let mine: Vec<_> = reg
            .ads
            .iter()
            .filter(|(_, (owner, _))| *owner == self.node)
            .map(|(key, _)| key.clone())
            .collect();
        reg.subscribers.retain(|s| s.node != self.node);
        for key in mine {
            reg.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::VersionRange;
    use std::time::Duration;

    fn ad(kind: ServiceKind, id: &str, port: u16) -> Advertisement {
        Advertisement {
            kind,
            node_id: id.into(),
            port,
            versions: VersionRange::new(1, 2),
            ca_fingerprint: "ABCD".into(),
        }
    }

    fn drain(rx: &mut mpsc::Receiver<DiscoveryEvent>) -> Vec<DiscoveryEvent> {
        let mut out = vec![];
        while let Ok(e) = rx.try_recv() {
            out.push(e);
        }
        out
    }

    fn found_ids(events: &[DiscoveryEvent]) -> Vec<String> {
        let mut ids: Vec<_> = events
            .iter()
            .filter_map(|e| match e {
                DiscoveryEvent::Found(p) => Some(p.node_id.clone()),
                _ => None,
            })
            .collect();
        ids.sort();
        ids
    }

    #[tokio::test]
    async fn browse_gets_existing_then_future_of_its_kind_only() {
        let net = MemoryDiscovery::new();
        let w1 = net.node();
        let w2 = net.node();
        w1.advertise(&ad(ServiceKind::Worker, "w1", 7001)).unwrap();
        w1.advertise(&ad(ServiceKind::Coordinator, "c-not-a-worker", 7000))
            .unwrap();
        let mut rx = net.browse(ServiceKind::Worker).unwrap();
        let first = drain(&mut rx);
        assert_eq!(found_ids(&first), ["w1"]);
        let DiscoveryEvent::Found(p) = &first[0] else {
            panic!("{first:?}")
        };
        assert_eq!(p.addrs, vec!["127.0.0.1:7001".parse().unwrap()]);
        assert_eq!(p.versions, Some(VersionRange::new(1, 2)));
        assert_eq!(p.ca_fingerprint.as_deref(), Some("abcd"));
        assert_eq!(p.source, DiscoverySource::Memory);

        w2.advertise(&ad(ServiceKind::Worker, "w2", 7002)).unwrap();
        // Same advertisement again: no duplicate event. A changed one: reported again.
        w2.advertise(&ad(ServiceKind::Worker, "w2", 7002)).unwrap();
        w2.advertise(&ad(ServiceKind::Worker, "w2", 7003)).unwrap();
        let later = drain(&mut rx);
        assert_eq!(found_ids(&later), ["w2", "w2"]);
        assert_eq!(net.advertised(ServiceKind::Worker).len(), 2);
    }

    #[tokio::test]
    async fn withdraw_reports_lost_and_crash_needs_verify() {
        let net = MemoryDiscovery::new();
        let w = net.node();
        w.advertise(&ad(ServiceKind::Worker, "w1", 7001)).unwrap();
        w.advertise(&ad(ServiceKind::Worker, "w2", 7002)).unwrap();
        let mut rx = net.browse(ServiceKind::Worker).unwrap();
        drain(&mut rx);

        assert!(net.withdraw("w1"));
        assert!(!net.withdraw("w1"));
        assert_eq!(
            drain(&mut rx),
            [DiscoveryEvent::Lost {
                kind: ServiceKind::Worker,
                node_id: "w1".into()
            }]
        );

        assert!(net.crash("w2"));
        assert!(drain(&mut rx).is_empty(), "a crash is silent");
        net.verify(ServiceKind::Worker, "w2").await.unwrap();
        assert_eq!(
            drain(&mut rx),
            [DiscoveryEvent::Lost {
                kind: ServiceKind::Worker,
                node_id: "w2".into()
            }]
        );
        net.verify(ServiceKind::Worker, "w2").await.unwrap();
        assert!(drain(&mut rx).is_empty(), "Lost is reported once");
    }

    #[tokio::test]
    async fn shutdown_withdraws_own_ads_and_closes_own_receivers() {
        let net = MemoryDiscovery::new();
        let w = net.node();
        w.advertise(&ad(ServiceKind::Worker, "w1", 7001)).unwrap();
        let mut own_rx = w.browse(ServiceKind::Coordinator).unwrap();
        let mut rx = net.browse(ServiceKind::Worker).unwrap();
        drain(&mut rx);
        w.shutdown().await;
        w.shutdown().await; // idempotent
        assert_eq!(
            drain(&mut rx),
            [DiscoveryEvent::Lost {
                kind: ServiceKind::Worker,
                node_id: "w1".into()
            }]
        );
        let closed = tokio::time::timeout(Duration::from_secs(1), own_rx.recv())
            .await
            .unwrap();
        assert!(closed.is_none(), "the node's receivers close on shutdown");
        assert!(matches!(
            w.advertise(&ad(ServiceKind::Worker, "w1", 1)),
            Err(DiscoveryError::ShutDown)
        ));
        // The rest of the network still works.
        net.node()
            .advertise(&ad(ServiceKind::Worker, "w3", 7003))
            .unwrap();
        assert_eq!(found_ids(&drain(&mut rx)), ["w3"]);
    }

    #[test]
    fn bad_node_id_is_refused() {
        let net = MemoryDiscovery::new();
        let err = net
            .advertise(&ad(ServiceKind::Worker, "has.dot", 1))
            .unwrap_err();
        assert!(err.to_string().contains("has.dot"), "{err}");
    }
}
