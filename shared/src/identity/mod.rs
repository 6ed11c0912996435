//! Cluster identity: the cluster CA, node certificates, join tokens and the TLS configurations of
//! ragd's QUIC fabric.
//!
//! # Trust model
//! Each cluster has its own certificate authority ([`ClusterCa`]), created by the coordinator on
//! first start and kept next to it (`ca.pem`, `ca.key`, mode 0600 in a 0700 directory). Every node
//! certificate is signed by it, and every connection is mutual TLS 1.3 that only accepts
//! certificates chaining to that CA. A second cluster on the same LAN has another CA, so its nodes
//! cannot talk to ours.
//!
//! # Certificate conventions
//! - The **node id** is the subject common name (CN). Node ids follow [`validate_node_id`]:
//!   1-63 characters of `[a-z0-9-]`, not starting or ending with `-` (a DNS label).
//! - The **role** is carried by the subject alternative names (DNS):
//!   - coordinator certificates carry [`COORDINATOR_SERVER_NAME`] (`coordinator.ragd.internal`);
//!   - worker certificates carry [`WORKER_SERVER_NAME`] (`worker.ragd.internal`) and
//!     `<id>.worker.ragd.internal` (see [`worker_server_name`]), so a dialer can pin one worker.
//!
//!   A certificate carrying both roles, or whose CN disagrees with its SAN, is rejected.
//! - Both kinds have EKU serverAuth + clientAuth: the coordinator is a server for enrolling
//!   workers and a client of enrolled workers; workers are the reverse.
//! - Validity: CA 20 years, node certificates 10 years (a home lab has no renewal service; a node
//!   is re-enrolled to rotate). Serial numbers are 128 random bits. Keys are ECDSA P-256.
//!
//! # Enrolment
//! `ragd-coord` prints a [`JoinToken`] (`ragd1-<CA fingerprint>-<secret>`). The worker generates
//! its key locally ([`WorkerKeyRequest::generate`]), dials the coordinator with
//! [`enrolment_client_config`] (no client certificate; the server chain must contain the pinned
//! CA), and proves knowledge of the secret with [`enrolment_proof`] bound to this very TLS
//! session through exported keying material ([`EKM_LABEL`], [`EKM_LEN`]). The coordinator checks
//! it with [`verify_enrolment_proof`] and signs the CSR ([`ClusterCa::sign_worker_csr`]). Only the
//! CSR and the certificate travel; the worker's private key never leaves it.
//!
//! # Policy
//! After a chain verifies, the verifiers consult a [`PeerPolicy`] inside the TLS handshake, so a
//! removed worker fails at TLS level, before any ragd message is read.

mod ca;
mod creds;
mod error;
mod files;
mod fingerprint;
mod peer;
mod tls;
mod token;
mod verify;

#[cfg(test)]
mod handshake_tests;

pub use ca::ClusterCa;
pub use creds::{NodeCredentials, SecretPem, WorkerKeyRequest};
pub use error::{IdentityError, Result};
pub use fingerprint::{Fingerprint, ParseFingerprintError};
pub use peer::{
    identity_of_cert, peer_identity, AllowAll, PeerIdentity, PeerPolicy, PeerRejection,
};
pub use tls::{
    coordinator_client_config, coordinator_server_config, enrolment_client_config,
    worker_client_config, worker_server_config,
};
pub use token::{
    enrolment_proof, verify_enrolment_proof, JoinSecret, JoinToken, EKM_LABEL, EKM_LEN,
};

/// The DNS name in every coordinator certificate; workers dial the coordinator with it.
pub const COORDINATOR_SERVER_NAME: &str = "coordinator.ragd.internal";

/// The DNS name in every worker certificate; the coordinator dials workers with it (or with
/// [`worker_server_name`] to pin one worker id).
pub const WORKER_SERVER_NAME: &str = "worker.ragd.internal";

/// The DNS zone all ragd certificate names live in (never a real domain).
pub const RAGD_DNS_ZONE: &str = "ragd.internal";

/// The per-worker DNS name `<id>.worker.ragd.internal` carried by that worker's certificate.
///
/// Dialing a worker with this server name makes TLS itself check that the worker is `worker_id`.
pub fn worker_server_name(worker_id: &str) -> String {
    format!("{worker_id}.{WORKER_SERVER_NAME}")
}

/// A valid node id derived from a host name (lowercased, other characters turned into `-`, at
/// most 63 characters), or `fallback` when nothing usable is left.
pub fn node_id_from_hostname(host: &str, fallback: &str) -> String {
    let id: String = host
        .to_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(63)
        .collect::<String>()
        .trim_matches('-')
        .to_string();
    if id.is_empty() || validate_node_id(&id).is_err() {
        fallback.to_string()
    } else {
        id
    }
}

/// SHA-256 fingerprint of the first certificate in PEM text, if there is one.
pub fn pem_fingerprint(pem: &str) -> Option<Fingerprint> {
    creds::pem_to_der(pem, "certificate")
        .ok()
        .map(|der| Fingerprint::of_der(&der))
}

/// Checks a node id: 1-63 characters of `[a-z0-9-]`, not starting or ending with `-`.
pub fn validate_node_id(id: &str) -> Result<()> {
    let problem = if id.is_empty() {
        Some("it is empty")
    } else if id.len() > 63 {
        Some("it is longer than 63 characters")
    } else if !id
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        Some("it holds a character other than a-z, 0-9 or '-'")
    } else if id.starts_with('-') || id.ends_with('-') {
        Some("it starts or ends with '-'")
    } else {
        None
    };
    match problem {
        Some(problem) => Err(IdentityError::InvalidNodeId {
            id: id.to_owned(),
            problem,
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_become_valid_node_ids() {
        assert_eq!(node_id_from_hostname("Desk.Top_Lan", "w"), "desk-top-lan");
        assert_eq!(node_id_from_hostname("--", "w"), "w");
        assert_eq!(node_id_from_hostname("ünï", "w"), "n");
        let long = node_id_from_hostname(&"a".repeat(80), "w");
        assert_eq!(long.len(), 63);
        validate_node_id(&long).unwrap();
    }

    #[test]
    fn node_id_rules() {
        for ok in ["a", "gpu-box-1", "0", &"x".repeat(63)] {
            validate_node_id(ok).unwrap();
        }
        for bad in ["", "-a", "a-", "A", "a_b", "a.b", "é", &"x".repeat(64)] {
            let err = validate_node_id(bad).unwrap_err();
            assert!(matches!(err, IdentityError::InvalidNodeId { .. }), "{bad}");
            assert!(err.to_string().contains("1-63 characters"));
        }
    }

    #[test]
    fn worker_name_is_under_worker_zone() {
        assert_eq!(worker_server_name("w1"), "w1.worker.ragd.internal");
    }
}
