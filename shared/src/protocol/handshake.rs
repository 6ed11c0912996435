//! The first exchange on every connection: `Hello` from the dialing side, `Welcome` or `Refused` back.
//!
//! The handshake runs on the first bidirectional stream the dialer opens. TLS has already proven
//! who the peer is; the handshake agrees on the protocol version and tells the accepting side what
//! the dialer wants. A refusal is always sent with a reason before the connection is closed, so the
//! other side can print something a person can act on.

use super::capabilities::Capabilities;
use super::{VersionMismatch, VersionRange};
use serde::{Deserialize, Serialize};
use std::fmt;

/// What a node is in the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Role {
    /// The cluster coordinator (`ragd-coord`).
    Coordinator,
    /// An enrolled worker (`ragd-worker`).
    Worker,
    /// A worker that holds no certificate yet and comes to enrol with a join token.
    Enrollee,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Coordinator => "coordinator",
            Role::Worker => "worker",
            Role::Enrollee => "enrolling worker",
        })
    }
}

/// Sent by the dialing side as the first frame of the first stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Protocol versions the dialer speaks.
    pub versions: VersionRange,
    /// What the dialer is.
    pub role: Role,
    /// The dialer's node id (worker id, or the coordinator's id).
    pub node_id: String,
    /// The dialer's software version, for diagnostics only.
    pub software: String,
}

/// The accepting side's answer to a [`Hello`].
// Sent once per connection: the size difference between the variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum HelloReply {
    /// The connection is accepted.
    Welcome(Welcome),
    /// The connection is refused; the accepting side closes it after sending this.
    Refused(Refusal),
}

/// Acceptance of a connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    /// The negotiated protocol version, the newest both sides speak.
    pub version: u16,
    /// The accepting node's id.
    pub node_id: String,
    /// The accepting node's software version, for diagnostics only.
    pub software: String,
    /// What the accepting node can do (a worker fills this in; a coordinator leaves it empty).
    pub capabilities: Option<Capabilities>,
}

/// Why a connection or request was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RefusalReason {
    /// The two sides share no protocol version.
    IncompatibleVersion(VersionMismatch),
    /// The peer's role is not one this node accepts on this connection.
    WrongRole {
        /// The role the peer claimed.
        claimed: Role,
    },
    /// The peer's certificate names a node this cluster has not enrolled (or has removed).
    NotEnrolled,
    /// The join token's secret was wrong or has been rotated.
    BadJoinToken,
    /// The peer's address is outside the networks this node accepts.
    AddressNotAllowed,
    /// The peer sent something that is not a valid ragd message.
    Malformed,
    /// The worker id asked for is enrolled already (the admin must remove or replace it first).
    AlreadyEnrolled,
}

/// A refusal with the reason and a message meant for a person.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    /// Machine-readable reason.
    pub reason: RefusalReason,
    /// What went wrong and what to do about it.
    pub message: String,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl Hello {
    /// A Hello for this build's supported versions.
    pub fn new(role: Role, node_id: impl Into<String>) -> Self {
        Self {
            versions: super::SUPPORTED_VERSIONS,
            role,
            node_id: node_id.into(),
            software: super::SOFTWARE_VERSION.to_string(),
        }
    }
}

impl Refusal {
    /// The refusal for a version mismatch, with both ranges and what to upgrade in the message.
    pub fn incompatible(mismatch: VersionMismatch) -> Self {
        Self {
            message: mismatch.to_string(),
            reason: RefusalReason::IncompatibleVersion(mismatch),
        }
    }
}
