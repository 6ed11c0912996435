//! Who the peer of a connection is, read from its certificate, and the policy that may refuse it.

use super::error::{IdentityError, Result};
use super::{
    validate_node_id, worker_server_name, Fingerprint, COORDINATOR_SERVER_NAME, WORKER_SERVER_NAME,
};
use crate::protocol::handshake::Role;
use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use x509_parser::extensions::GeneralName;

/// The identity a peer's certificate proves (after TLS verified it against the cluster CA).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PeerIdentity {
    /// The node id (certificate subject CN).
    pub node_id: String,
    /// Coordinator or Worker, from the certificate's DNS names.
    pub role: Role,
    /// SHA-256 of the peer's certificate.
    pub fingerprint: Fingerprint,
}

/// Why a [`PeerPolicy`] refused a peer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct PeerRejection {
    /// A sentence a person can act on ("worker gpu-1 was removed from the cluster on ...").
    pub reason: String,
}

impl PeerRejection {
    /// A rejection with the given reason.
    pub fn new(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
        }
    }
}

/// Decides whether a peer whose certificate chains to the cluster CA may connect.
///
/// Consulted inside the TLS verifiers on every handshake, after the chain verified: a peer it
/// refuses fails the TLS handshake itself (for example a removed worker). It runs on the network
/// task, so it must be quick and must not block (keep an in-memory set, not a database query).
pub trait PeerPolicy: Send + Sync + std::fmt::Debug {
    /// `Ok(())` to accept the peer, or the reason to refuse it.
    fn check(&self, peer: &PeerIdentity) -> Result<(), PeerRejection>;
}

/// A policy that accepts every peer whose certificate chains to the cluster CA.
#[derive(Debug, Clone, Copy, Default)]
pub struct AllowAll;

impl PeerPolicy for AllowAll {
    fn check(&self, _peer: &PeerIdentity) -> Result<(), PeerRejection> {
        Ok(())
    }
}

/// Reads the identity of a ragd node certificate (DER), following the module's conventions.
///
/// This does not verify the certificate; TLS does that. It refuses certificates that do not
/// follow the conventions (bad CN, no role, both roles, a worker name for another id).
pub fn identity_of_cert(der: &[u8]) -> Result<PeerIdentity> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| IdentityError::BadCertificate {
            detail: e.to_string(),
        })?;
    let subject = cert.subject().to_string();
    let not_node = |problem: String| IdentityError::NotANodeCertificate {
        subject: subject.clone(),
        problem,
    };
    let mut cns = cert.subject().iter_common_name();
    let cn = cns
        .next()
        .ok_or_else(|| not_node("it has no subject common name".into()))?
        .as_str()
        .map_err(|_| not_node("its common name is not a text string".into()))?
        .to_owned();
    if cns.next().is_some() {
        return Err(not_node("it has more than one common name".into()));
    }
    validate_node_id(&cn).map_err(|e| not_node(e.to_string()))?;

    let san = cert
        .subject_alternative_name()
        .map_err(|e| not_node(format!("its subject alternative names are malformed ({e})")))?
        .ok_or_else(|| not_node("it has no subject alternative names (no role)".into()))?;
    let own_worker_name = worker_server_name(&cn);
    let (mut coordinator, mut worker_zone, mut own_worker) = (false, false, false);
    for name in &san.value.general_names {
        match name {
            GeneralName::DNSName(dns) if *dns == COORDINATOR_SERVER_NAME => coordinator = true,
            GeneralName::DNSName(dns) if *dns == WORKER_SERVER_NAME => worker_zone = true,
            GeneralName::DNSName(dns) if *dns == own_worker_name => own_worker = true,
            GeneralName::DNSName(dns) if dns.ends_with(&format!(".{WORKER_SERVER_NAME}")) => {
                return Err(not_node(format!(
                    "it names worker {dns:?} but its common name is {cn:?}"
                )))
            }
            _ => {}
        }
    }
    let role = match (coordinator, worker_zone || own_worker) {
        (true, false) => Role::Coordinator,
        (false, true) if worker_zone && own_worker => Role::Worker,
        (false, true) => {
            return Err(not_node(format!(
                "a worker certificate must name both {WORKER_SERVER_NAME} and {own_worker_name}"
            )))
        }
        (true, true) => {
            return Err(not_node(
                "it claims both the coordinator and worker roles".into(),
            ))
        }
        (false, false) => {
            return Err(not_node(format!(
                "it names neither {COORDINATOR_SERVER_NAME} nor {WORKER_SERVER_NAME} (no role)"
            )))
        }
    };
    Ok(PeerIdentity {
        node_id: cn,
        role,
        fingerprint: Fingerprint::of_der(der),
    })
}

/// The verified identity of a connection's peer, or `None` when it presented no certificate
/// (an enrolling worker) or its certificate does not follow ragd's conventions.
pub fn peer_identity(conn: &quinn::Connection) -> Option<PeerIdentity> {
    let any = conn.peer_identity()?;
    let chain = any.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    let leaf = chain.first()?;
    match identity_of_cert(leaf) {
        Ok(id) => Some(id),
        Err(error) => {
            tracing::warn!(%error, remote = %conn.remote_address(), "peer certificate is not a ragd node certificate");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};

    fn self_signed(cn: &str, names: &[&str]) -> Vec<u8> {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn roles_from_names() {
        let c = identity_of_cert(&self_signed("c1", &[COORDINATOR_SERVER_NAME])).unwrap();
        assert_eq!((c.node_id.as_str(), c.role), ("c1", Role::Coordinator));
        let w = identity_of_cert(&self_signed(
            "w1",
            &[WORKER_SERVER_NAME, "w1.worker.ragd.internal"],
        ))
        .unwrap();
        assert_eq!((w.node_id.as_str(), w.role), ("w1", Role::Worker));
    }

    #[test]
    fn non_conforming_certs_are_refused() {
        let cases: &[(&str, &[&str], &str)] = &[
            (
                "w1",
                &[WORKER_SERVER_NAME, "w2.worker.ragd.internal"],
                "names worker",
            ),
            ("w1", &[WORKER_SERVER_NAME], "must name both"),
            (
                "w1",
                &[
                    COORDINATOR_SERVER_NAME,
                    WORKER_SERVER_NAME,
                    "w1.worker.ragd.internal",
                ],
                "both",
            ),
            ("w1", &["example.com"], "neither"),
            ("W_1", &[COORDINATOR_SERVER_NAME], "invalid node id"),
            ("c1", &[], "no subject alternative names"),
        ];
        for (cn, names, expected) in cases {
            let err = identity_of_cert(&self_signed(cn, names)).unwrap_err();
            assert!(err.to_string().contains(expected), "{cn} {names:?}: {err}");
        }
        assert!(matches!(
            identity_of_cert(b"garbage").unwrap_err(),
            IdentityError::BadCertificate { .. }
        ));
    }
}
