//! Which worker certificates the coordinator accepts: exactly the one issued to each enrolled,
//! non-removed worker. Consulted inside the TLS verifiers on every handshake.

use ragd_shared::identity::{Fingerprint, PeerIdentity, PeerPolicy, PeerRejection};
use ragd_shared::protocol::handshake::Role;
use std::collections::HashMap;
use std::sync::RwLock;

/// The set of enrolled workers and the certificate each may present.
#[derive(Debug, Default)]
pub struct EnrolledWorkers {
    allowed: RwLock<HashMap<String, Fingerprint>>,
}

impl EnrolledWorkers {
    /// A policy that allows exactly `workers`.
    pub fn new(workers: impl IntoIterator<Item = (String, Fingerprint)>) -> Self {
        Self {
            allowed: RwLock::new(workers.into_iter().collect()),
        }
    }

    /// Allows `id` with the certificate `fingerprint` (replacing any earlier one).
    pub fn allow(&self, id: &str, fingerprint: Fingerprint) {
        self.allowed
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_string(), fingerprint);
    }

    /// Stops allowing `id`; the next handshake with its certificate fails.
    pub fn revoke(&self, id: &str) {
        self.allowed
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }

    /// Whether `id` is currently allowed.
    pub fn contains(&self, id: &str) -> bool {
        self.allowed
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(id)
    }
}

impl PeerPolicy for EnrolledWorkers {
    fn check(&self, peer: &PeerIdentity) -> Result<(), PeerRejection> {
        if peer.role != Role::Worker {
            return Err(PeerRejection {
                reason: format!(
                    "certificate of {:?} is a {} certificate, not a worker's",
                    peer.node_id, peer.role
                ),
            });
        }
        let allowed = self.allowed.read().unwrap_or_else(|p| p.into_inner());
        match allowed.get(&peer.node_id) {
            Some(fp) if *fp == peer.fingerprint => Ok(()),
            Some(_) => Err(PeerRejection {
                reason: format!(
                    "worker {:?} presented a certificate that was replaced or revoked; re-join it with `ragd-worker join TOKEN`",
                    peer.node_id
                ),
            }),
            None => Err(PeerRejection {
                reason: format!(
                    "worker {:?} is not enrolled in this cluster (or was removed); enrol it with `ragd-worker join TOKEN`",
                    peer.node_id
                ),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(id: &str, role: Role, fp: Fingerprint) -> PeerIdentity {
        PeerIdentity {
            node_id: id.into(),
            role,
            fingerprint: fp,
        }
    }

    #[test]
    fn only_the_issued_certificate_of_an_enrolled_worker_passes() {
        let fp = Fingerprint::of_der(b"a");
        let other = Fingerprint::of_der(b"b");
        let policy = EnrolledWorkers::new([("w1".to_string(), fp)]);
        assert!(policy.check(&peer("w1", Role::Worker, fp)).is_ok());
        assert!(policy.check(&peer("w1", Role::Worker, other)).is_err());
        assert!(policy.check(&peer("w2", Role::Worker, fp)).is_err());
        assert!(policy.check(&peer("w1", Role::Coordinator, fp)).is_err());
        policy.revoke("w1");
        let err = policy.check(&peer("w1", Role::Worker, fp)).unwrap_err();
        assert!(err.reason.contains("not enrolled"), "{}", err.reason);
    }
}
