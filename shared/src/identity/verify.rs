//! rustls certificate verifiers that add ragd's checks (role, peer policy, pinned CA) on top of
//! webpki chain verification.

use super::error::IdentityError;
use super::peer::{identity_of_cert, PeerIdentity, PeerPolicy};
use super::Fingerprint;
use crate::protocol::handshake::Role;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    DigitallySignedStruct, DistinguishedName, OtherError, RootCertStore, SignatureScheme,
};
use std::sync::Arc;

/// A rustls error carrying our explanation. `Error::Other` is the variant whose `Display` shows
/// the message itself (`CertificateError::Other` would show only its `Debug` form); the peer
/// receives a `handshake_failure` alert.
pub(crate) fn reject(err: IdentityError) -> rustls::Error {
    rustls::Error::Other(OtherError(Arc::new(err)))
}

/// After the chain verified: reads the peer's identity, checks its role and asks the policy.
fn check_peer(
    end_entity: &CertificateDer<'_>,
    required_role: Option<Role>,
    policy: &dyn PeerPolicy,
) -> Result<PeerIdentity, rustls::Error> {
    let peer = identity_of_cert(end_entity).map_err(|err| {
        tracing::warn!(error = %err, "refused a peer certificate that does not follow ragd's conventions");
        reject(err)
    })?;
    if let Some(expected) = required_role {
        if peer.role != expected {
            tracing::warn!(node_id = %peer.node_id, role = %peer.role, %expected, "refused a peer with the wrong role");
            return Err(reject(IdentityError::WrongRole {
                node_id: peer.node_id,
                found: peer.role,
                expected,
            }));
        }
    }
    if let Err(rejection) = policy.check(&peer) {
        tracing::warn!(node_id = %peer.node_id, role = %peer.role, fingerprint = %peer.fingerprint, reason = %rejection.reason, "peer refused by policy");
        return Err(reject(IdentityError::PeerRejected {
            node_id: peer.node_id,
            role: peer.role,
            reason: rejection.reason,
        }));
    }
    tracing::debug!(node_id = %peer.node_id, role = %peer.role, "peer certificate accepted");
    Ok(peer)
}

fn log_chain_failure(side: &'static str, err: &rustls::Error) {
    tracing::warn!(side, error = %err, "peer certificate does not chain to the cluster CA");
}

/// Server side: webpki client verification, then role and policy checks.
#[derive(Debug)]
pub(crate) struct ClusterClientVerifier {
    pub(crate) inner: Arc<dyn ClientCertVerifier>,
    pub(crate) required_role: Option<Role>,
    pub(crate) policy: Arc<dyn PeerPolicy>,
}

impl ClientCertVerifier for ClusterClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)
            .inspect_err(|e| log_chain_failure("client", e))?;
        check_peer(end_entity, self.required_role, self.policy.as_ref())?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Client side: webpki server verification (chain + server name), then role and policy checks.
#[derive(Debug)]
pub(crate) struct ClusterServerVerifier {
    pub(crate) inner: Arc<WebPkiServerVerifier>,
    pub(crate) required_role: Role,
    pub(crate) policy: Arc<dyn PeerPolicy>,
}

impl ServerCertVerifier for ClusterServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
            .inspect_err(|e| log_chain_failure("server", e))?;
        check_peer(end_entity, Some(self.required_role), self.policy.as_ref())?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Enrolling worker: trusts only the CA whose fingerprint the join token pins, which the
/// coordinator sends in its chain; then verifies the coordinator certificate against it.
#[derive(Debug)]
pub(crate) struct PinnedCaVerifier {
    pub(crate) pinned: Fingerprint,
    pub(crate) provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(ca) = intermediates
            .iter()
            .find(|c| Fingerprint::of_der(c) == self.pinned)
        else {
            let err = match intermediates.last() {
                Some(presented) => IdentityError::WrongCluster {
                    found: Fingerprint::of_der(presented),
                    pinned: self.pinned,
                },
                None => IdentityError::MissingCaCertificate { chain_len: 1 },
            };
            tracing::warn!(error = %err, "enrolment: coordinator is not under the pinned CA");
            return Err(reject(err));
        };
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned()).map_err(|e| {
            reject(IdentityError::BadCertificate {
                detail: format!("the pinned CA certificate is not a usable trust anchor ({e})"),
            })
        })?;
        let webpki =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| {
                    rustls::Error::General(format!("cannot build the pinned-CA verifier: {e}"))
                })?;
        webpki
            .verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
            .inspect_err(|e| log_chain_failure("server", e))?;
        check_peer(end_entity, Some(Role::Coordinator), &super::AllowAll)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
