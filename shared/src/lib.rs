//! Wire protocol, cluster identity, discovery and common types shared by `ragd-coord` and `ragd-worker`.
//!
//! Everything that crosses the network is defined here, so both binaries always agree on it:
//! - [`protocol`]: versions, handshake, request/response messages, capabilities (what goes on the wire);
//! - [`codec`]: the only place that calls bincode; length-prefixed frames with a size limit.

pub mod codec;
pub mod protocol;
pub mod transfer;
