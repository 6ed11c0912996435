//! The ragd wire protocol: what the coordinator and the workers say to each other.
//!
//! Layout of a connection (QUIC, ALPN [`ALPN`], mutual TLS 1.3):
//! - the dialing side opens the first bidirectional stream and sends a [`handshake::Hello`]; the
//!   accepting side answers with a [`handshake::HelloReply`] (a `Welcome` carrying the negotiated
//!   version, or a `Refused` that says why);
//! - afterwards each request travels on its own bidirectional stream: one [`messages::Request`]
//!   frame, one [`messages::Response`] frame, then both sides finish the stream;
//! - bulk data (datasets, models) travels on unidirectional streams (see `transfer`).
//!
//! Every message is encoded by [`crate::codec`] only. The encoding is positional: **append enum
//! variants and struct fields at the end only; never reorder, remove or insert**. A change that
//! cannot be made that way needs a new [`PROTOCOL_VERSION`].

pub mod admin;
pub mod capabilities;
pub mod handshake;
pub mod job_spec;
pub mod jobs;
pub mod messages;
pub mod settings;

use serde::{Deserialize, Serialize};
use std::fmt;

/// ALPN protocol id of ragd's QUIC connections; a peer that offers anything else is refused by TLS.
pub const ALPN: &[u8] = b"ragd/1";

/// The newest protocol version this build speaks.
///
/// v2: task settings travel as typed [`settings`] (v1 carried them as JSON strings), chunks and
/// generated queries as one type each on both sides.
/// v3: `RunTask` ([`jobs::TaskRun`]): forget, start and first poll of a task in one round trip.
/// A v2 peer is still spoken to, with the three separate requests.
/// v4: embedding shards ([`jobs::TaskSpec::Embed`]) and a prepare task that is handed the
/// shards' embeddings ([`jobs::TaskSpec::PrepareEmbedded`]). A v2 or v3 worker gets neither: it
/// takes no embedding shard, and is handed a plain prepare only when no v4 worker is ready.
/// v5: generation shards under the job's LLM time budget ([`jobs::TaskSpec::GenerateWithin`]):
/// the worker starts no chunk once the budget has run out. An older worker gets plain
/// `Generate` shards, which run to their end once leased.
pub const PROTOCOL_VERSION: u16 = 5;

/// The first version with `RunTask`.
pub const RUN_TASK_VERSION: u16 = 3;

/// The first version with embedding shards and `PrepareEmbedded`.
pub const EMBED_TASK_VERSION: u16 = 4;

/// The first version with `GenerateWithin`.
pub const GENERATE_WITHIN_VERSION: u16 = 5;

/// The protocol versions this build can speak (v1 peers are refused with a message saying
/// which side to upgrade: their task messages cannot be read).
pub const SUPPORTED_VERSIONS: VersionRange = VersionRange {
    min: 2,
    max: PROTOCOL_VERSION,
};

/// The version of the ragd software in this build, sent in the handshake for diagnostics.
pub const SOFTWARE_VERSION: &str = env!("CARGO_PKG_VERSION");

/// An inclusive range of protocol versions a node can speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct VersionRange {
    /// Oldest version spoken.
    pub min: u16,
    /// Newest version spoken.
    pub max: u16,
}

impl VersionRange {
    /// A range; `min` must not exceed `max` (checked by [`VersionRange::is_valid`]).
    pub const fn new(min: u16, max: u16) -> Self {
        Self { min, max }
    }

    /// Whether the range is well formed (`min <= max`).
    pub fn is_valid(&self) -> bool {
        self.min <= self.max
    }

    /// Picks the newest version both ranges contain, or explains why there is none.
    pub fn negotiate(&self, theirs: &VersionRange) -> Result<u16, VersionMismatch> {
        let mismatch = VersionMismatch {
            ours: *self,
            theirs: *theirs,
        };
        if !self.is_valid() || !theirs.is_valid() {
            return Err(mismatch);
        }
        let low = self.min.max(theirs.min);
        let high = self.max.min(theirs.max);
        if low <= high {
            Ok(high)
        } else {
            Err(mismatch)
        }
    }
}

impl fmt::Display for VersionRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.min == self.max {
            write!(f, "v{}", self.min)
        } else {
            write!(f, "v{}..=v{}", self.min, self.max)
        }
    }
}

impl std::str::FromStr for VersionRange {
    type Err = String;

    /// Parses `1` or `1-3` (the form used in mDNS TXT records).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parse = |p: &str| {
            p.trim()
                .trim_start_matches('v')
                .parse::<u16>()
                .map_err(|e| format!("bad protocol version {p:?} in {s:?}: {e}"))
        };
        let range = match s.split_once('-') {
            Some((a, b)) => VersionRange::new(parse(a)?, parse(b)?),
            None => {
                let v = parse(s)?;
                VersionRange::new(v, v)
            }
        };
        if range.is_valid() {
            Ok(range)
        } else {
            Err(format!("protocol version range {s:?} has min above max"))
        }
    }
}

/// Two nodes share no protocol version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionMismatch {
    /// What this node speaks.
    pub ours: VersionRange,
    /// What the peer speaks.
    pub theirs: VersionRange,
}

impl VersionMismatch {
    /// Which side should be upgraded to make the two compatible.
    pub fn advice(&self) -> &'static str {
        if !self.theirs.is_valid() || !self.ours.is_valid() {
            "the peer sent a malformed version range; make sure it is a ragd node"
        } else if self.theirs.min > self.ours.max {
            "upgrade this node to a ragd release that speaks the peer's protocol"
        } else {
            "upgrade the peer to a ragd release that speaks this node's protocol"
        }
    }
}

impl fmt::Display for VersionMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "incompatible ragd protocol: this node speaks {}, the peer speaks {}; {}",
            self.ours,
            self.theirs,
            self.advice()
        )
    }
}

impl std::error::Error for VersionMismatch {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation_picks_newest_common_version() {
        let ours = VersionRange::new(1, 3);
        assert_eq!(ours.negotiate(&VersionRange::new(2, 5)), Ok(3));
        assert_eq!(ours.negotiate(&VersionRange::new(1, 1)), Ok(1));
        assert_eq!(ours.negotiate(&VersionRange::new(3, 3)), Ok(3));
    }

    #[test]
    fn disjoint_ranges_say_who_to_upgrade() {
        let ours = VersionRange::new(1, 2);
        let newer = ours.negotiate(&VersionRange::new(4, 5)).unwrap_err();
        assert!(newer.to_string().contains("upgrade this node"), "{newer}");
        assert!(newer.to_string().contains("v1..=v2"), "{newer}");
        assert!(newer.to_string().contains("v4..=v5"), "{newer}");
        let older = VersionRange::new(3, 4)
            .negotiate(&VersionRange::new(1, 2))
            .unwrap_err();
        assert!(older.to_string().contains("upgrade the peer"), "{older}");
    }

    #[test]
    fn v1_peers_are_refused_with_advice() {
        // v1 carried task settings as JSON strings; this build cannot read its task messages.
        let err = SUPPORTED_VERSIONS
            .negotiate(&VersionRange::new(1, 1))
            .unwrap_err();
        assert!(err.to_string().contains("upgrade the peer"), "{err}");
        assert!(err.to_string().contains("v1"), "{err}");
    }

    #[test]
    fn malformed_range_is_refused() {
        assert!(SUPPORTED_VERSIONS
            .negotiate(&VersionRange::new(2, 1))
            .is_err());
        assert!("3-1".parse::<VersionRange>().is_err());
        assert_eq!("1-2".parse::<VersionRange>(), Ok(VersionRange::new(1, 2)));
        assert_eq!("1".parse::<VersionRange>(), Ok(VersionRange::new(1, 1)));
    }
}
