//! Finding the other nodes of a cluster on the LAN.
//!
//! One trait, [`Discovery`], with three implementations:
//! - [`MdnsDiscovery`]: multicast DNS service discovery (`_ragd-worker._udp.local.`,
//!   `_ragd-coord._udp.local.`), the zero-configuration default;
//! - [`StaticDiscovery`]: a fixed list of `host:port` peers from the configuration, for networks
//!   where multicast does not work (several interfaces, VPNs, Wi-Fi client isolation);
//! - [`MemoryDiscovery`]: an in-process registry for unit tests.
//!
//! Discovery only *finds* peers; it proves nothing. Everything a [`DiscoveredPeer`] says (node id,
//! CA fingerprint, versions) is a hint to be checked by the mutual-TLS handshake, and liveness is
//! judged by QUIC heartbeats, not by discovery.

mod mdns;
mod memory;
mod static_peers;

pub use mdns::{MdnsConfig, MdnsDiscovery, MdnsSettings};
pub use memory::MemoryDiscovery;
pub use static_peers::{
    StaticDiscovery, DEFAULT_RESOLVE_INTERVAL, MAX_RESOLVE_INTERVAL, MIN_RESOLVE_INTERVAL,
};

use crate::protocol::VersionRange;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::SocketAddr;

/// Capacity of the event channel returned by [`Discovery::browse`].
pub const EVENT_CHANNEL_CAPACITY: usize = 256;

/// Which role a node advertises or looks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServiceKind {
    /// A worker node (`_ragd-worker._udp.local.`).
    Worker,
    /// A coordinator node (`_ragd-coord._udp.local.`).
    Coordinator,
}

impl ServiceKind {
    /// Both kinds.
    pub const ALL: [ServiceKind; 2] = [ServiceKind::Worker, ServiceKind::Coordinator];

    /// The DNS-SD service type, with the `.local.` domain.
    pub const fn service_type(self) -> &'static str {
        match self {
            ServiceKind::Worker => "_ragd-worker._udp.local.",
            ServiceKind::Coordinator => "_ragd-coord._udp.local.",
        }
    }

    /// The kind whose [`ServiceKind::service_type`] is `ty`, if any.
    pub fn from_service_type(ty: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.service_type() == ty)
    }
}

impl fmt::Display for ServiceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ServiceKind::Worker => "worker",
            ServiceKind::Coordinator => "coordinator",
        })
    }
}

impl std::str::FromStr for ServiceKind {
    type Err = DiscoveryError;

    /// Parses `worker` or `coordinator` (also `coord`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "worker" => Ok(ServiceKind::Worker),
            "coordinator" | "coord" => Ok(ServiceKind::Coordinator),
            _ => Err(DiscoveryError::UnknownKind {
                value: s.to_string(),
            }),
        }
    }
}

/// What a node announces about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Advertisement {
    /// The role announced.
    pub kind: ServiceKind,
    /// The node id; also the mDNS instance name (see [`validate_node_id`]).
    pub node_id: String,
    /// The UDP port of the node's QUIC endpoint.
    pub port: u16,
    /// The protocol versions the node speaks.
    pub versions: VersionRange,
    /// Hex fingerprint of the cluster CA the node belongs to (lets a coordinator skip foreign
    /// clusters' workers before dialing).
    pub ca_fingerprint: String,
}

/// Where a [`DiscoveredPeer`] came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiscoverySource {
    /// Multicast DNS.
    Mdns,
    /// The static peer list of the configuration.
    Static,
    /// The in-process test registry.
    Memory,
}

/// A peer found on the network. Everything in it is unauthenticated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiscoveredPeer {
    /// The role of the peer.
    pub kind: ServiceKind,
    /// The peer's node id; an **empty string means unknown until the handshake** (static peers).
    pub node_id: String,
    /// Where to dial it, IPv4 first; link-local IPv6 addresses carry their scope id.
    pub addrs: Vec<SocketAddr>,
    /// Protocol versions it announces, if known.
    pub versions: Option<VersionRange>,
    /// Hex fingerprint of its cluster CA, if announced.
    pub ca_fingerprint: Option<String>,
    /// How it was found.
    pub source: DiscoverySource,
}

/// A change in what is visible on the network. `Found` is an upsert: the same node is reported
/// again when its addresses or announced data change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DiscoveryEvent {
    /// A peer appeared or changed.
    Found(DiscoveredPeer),
    /// A peer left (goodbye packet, failed [`Discovery::verify`], or withdrawn).
    Lost {
        /// Its role.
        kind: ServiceKind,
        /// Its node id.
        node_id: String,
    },
}

/// Finds peers and announces this node.
#[async_trait::async_trait]
pub trait Discovery: Send + Sync + 'static {
    /// Announces this node until [`Discovery::shutdown`]; announcing the same kind and node id
    /// again replaces the announcement.
    fn advertise(&self, ad: &Advertisement) -> Result<(), DiscoveryError>;

    /// Reports the peers of `kind`, those already known first, then changes. The receiver closes
    /// on [`Discovery::shutdown`]. Must be called inside a tokio runtime.
    fn browse(
        &self,
        kind: ServiceKind,
    ) -> Result<tokio::sync::mpsc::Receiver<DiscoveryEvent>, DiscoveryError>;

    /// Asks the network now whether `node_id` is still there (call it when the QUIC connection to
    /// that peer drops). Returns once the question is asked; if the peer does not answer, a
    /// [`DiscoveryEvent::Lost`] follows on the browse receivers.
    async fn verify(&self, kind: ServiceKind, node_id: &str) -> Result<(), DiscoveryError>;

    /// Withdraws this node's announcements, stops browsing (closing every receiver) and releases
    /// the network resources. Idempotent.
    async fn shutdown(&self);
}

/// Longest accepted node id, in bytes (a DNS label holds 63).
pub const NODE_ID_MAX_LEN: usize = 63;

/// Checks that `node_id` can be used as an mDNS instance name: 1 to 63 bytes of ASCII letters,
/// digits, `-` and `_`.
pub fn validate_node_id(node_id: &str) -> Result<(), DiscoveryError> {
    let reason = if node_id.is_empty() {
        Some("it is empty")
    } else if node_id.len() > NODE_ID_MAX_LEN {
        Some("it is longer than 63 bytes")
    } else if !node_id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        Some("only ASCII letters, digits, '-' and '_' are allowed")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(DiscoveryError::InvalidNodeId {
            node_id: node_id.to_string(),
            reason,
        }),
        None => Ok(()),
    }
}

/// What went wrong while discovering or advertising.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// The mDNS daemon refused or failed an operation.
    #[error(
        "mDNS failed to {action}: {source}; check that a multicast-capable interface is up \
         (or set `interfaces` in the mDNS config), or use static peers instead"
    )]
    Mdns {
        /// What was being done.
        action: &'static str,
        /// The daemon's error.
        #[source]
        source: mdns_sd::Error,
    },
    /// A node id cannot be announced.
    #[error("invalid node id {node_id:?}: {reason}; choose another node id")]
    InvalidNodeId {
        /// The refused id.
        node_id: String,
        /// Why.
        reason: &'static str,
    },
    /// The CA fingerprint of an advertisement is not usable in a TXT record.
    #[error(
        "invalid CA fingerprint {fingerprint:?}: it must be 1 to 128 hex digits; \
         pass the cluster CA fingerprint as printed by the coordinator"
    )]
    InvalidCaFingerprint {
        /// The refused fingerprint.
        fingerprint: String,
    },
    /// A static peer entry is malformed.
    #[error("invalid static peer {peer:?}: {reason}; write it as host:port, e.g. 192.168.1.20:7400 or worker1.lan:7400")]
    InvalidStaticPeer {
        /// The entry as configured.
        peer: String,
        /// Why.
        reason: String,
    },
    /// An unknown service kind was named.
    #[error("unknown service kind {value:?}; use `worker` or `coordinator`")]
    UnknownKind {
        /// The text given.
        value: String,
    },
    /// `browse` was called outside a tokio runtime.
    #[error("discovery browsing needs a tokio runtime; call `browse` from inside one")]
    NoRuntime,
    /// The discovery was shut down.
    #[error("discovery has been shut down; create a new one")]
    ShutDown,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_map_to_service_types_and_back() {
        for kind in ServiceKind::ALL {
            assert_eq!(
                ServiceKind::from_service_type(kind.service_type()),
                Some(kind)
            );
            assert_eq!(kind.to_string().parse::<ServiceKind>().unwrap(), kind);
        }
        assert_eq!(
            ServiceKind::Worker.service_type(),
            "_ragd-worker._udp.local."
        );
        assert_eq!(
            ServiceKind::Coordinator.service_type(),
            "_ragd-coord._udp.local."
        );
        assert_eq!(
            "coord".parse::<ServiceKind>().unwrap(),
            ServiceKind::Coordinator
        );
        let err = "router".parse::<ServiceKind>().unwrap_err().to_string();
        assert!(err.contains("router") && err.contains("`worker`"), "{err}");
        assert_eq!(ServiceKind::from_service_type("_http._tcp.local."), None);
    }

    #[test]
    fn node_ids_must_fit_an_instance_name() {
        for good in ["w1", "worker-01", "node_A", &"x".repeat(63)] {
            assert!(validate_node_id(good).is_ok(), "{good}");
        }
        for (bad, why) in [
            ("", "empty"),
            (&"x".repeat(64) as &str, "63"),
            ("a.b", "only ASCII"),
            ("a b", "only ASCII"),
            ("naïve", "only ASCII"),
        ] {
            let msg = validate_node_id(bad).unwrap_err().to_string();
            assert!(msg.contains(why), "{bad:?}: {msg}");
        }
    }

    #[test]
    fn the_trait_is_usable_as_an_object() {
        let boxed: Box<dyn Discovery> = Box::new(MemoryDiscovery::new());
        let shared: std::sync::Arc<dyn Discovery> = std::sync::Arc::from(boxed);
        assert!(shared
            .advertise(&Advertisement {
                kind: ServiceKind::Worker,
                node_id: "w".into(),
                port: 1,
                versions: crate::protocol::SUPPORTED_VERSIONS,
                ca_fingerprint: "ab".into(),
            })
            .is_ok());
    }
}
