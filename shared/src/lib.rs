//! Wire protocol, cluster identity, discovery and common types shared by `ragd-coord` and `ragd-worker`.
//!
//! Everything that crosses the network is defined here, so both binaries always agree on it:
//! - [`protocol`]: versions, handshake, request/response messages, capabilities (what goes on the wire);
//! - [`codec`]: the only place that calls bincode; length-prefixed frames with a size limit;
//! - [`transport`]: handshake and request/response plumbing on quinn connections;
//! - [`identity`]: the cluster CA, node certificates, join tokens and the mutual-TLS configs;
//! - [`discovery`]: finding peers (mDNS, static list, in-memory);
//! - [`netguard`]: the LAN-only guard;
//! - [`blobs`]: content-addressed blob stores and bundles (directories), resumable verified pushes;
//! - [`udp_socket`]: the UDP socket under the endpoints, its receive buffer sized to one datagram per read;
//! - [`transfer`]: bulk transfers (datasets, models) on unidirectional streams, BLAKE3-verified;
//! - [`daemon`]: shutdown signal, tracing set-up and layered config loading, as both binaries do them.

pub mod backoff;
pub mod blobs;
pub mod codec;
pub mod daemon;
pub mod discovery;
pub mod identity;
pub mod netguard;
pub mod path_mtu;
pub mod protocol;
pub mod transfer;
pub mod transport;
pub mod udp_socket;
