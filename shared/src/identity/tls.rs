//! quinn/rustls configurations for every kind of ragd connection.
//!
//! All of them: TLS 1.3 only, the ring crypto provider, ALPN [`crate::protocol::ALPN`], and no
//! session resumption (a resumed session would skip the certificate verifiers, and with them the
//! [`PeerPolicy`] that refuses removed workers). Server chains are `[node cert, CA cert]` so an
//! enrolling worker can see the CA its join token pins.

use super::creds::{pem_to_der, NodeCredentials};
use super::error::{IdentityError, Result};
use super::peer::{AllowAll, PeerPolicy};
use super::verify::{ClusterClientVerifier, ClusterServerVerifier, PinnedCaVerifier};
use super::Fingerprint;
use crate::protocol::handshake::Role;
use crate::protocol::ALPN;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::danger::ServerCertVerifier;
use rustls::client::{Resumption, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::CertificateDer;
use rustls::server::danger::ClientCertVerifier;
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::RootCertStore;
use std::sync::Arc;

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The cluster CA as the only trust anchor.
fn cluster_roots(ca_pem: &str) -> Result<(Arc<RootCertStore>, CertificateDer<'static>)> {
    let ca_der = CertificateDer::from(pem_to_der(ca_pem, "the cluster CA certificate")?);
    let mut roots = RootCertStore::empty();
    roots
        .add(ca_der.clone())
        .map_err(|e| IdentityError::BadCertificate {
            detail: format!("the cluster CA certificate is not a usable trust anchor ({e})"),
        })?;
    Ok((Arc::new(roots), ca_der))
}

/// Checks that our own credentials have the role this configuration is for.
fn own_role(creds: &NodeCredentials, expected: Role) -> Result<()> {
    let me = creds.identity()?;
    if me.role == expected {
        Ok(())
    } else {
        Err(IdentityError::WrongCredentials {
            node_id: me.node_id,
            found: me.role,
            expected,
        })
    }
}

/// `[node cert, CA cert]` and the node's key.
fn own_chain(
    creds: &NodeCredentials,
    ca_der: &CertificateDer<'static>,
) -> Result<(
    Vec<CertificateDer<'static>>,
    rustls::pki_types::PrivateKeyDer<'static>,
)> {
    let leaf = CertificateDer::from(creds.cert_der()?);
    Ok((vec![leaf, ca_der.clone()], creds.rustls_key()?))
}

fn server_config(
    verifier: Arc<dyn ClientCertVerifier>,
    creds: &NodeCredentials,
    ca_der: &CertificateDer<'static>,
) -> Result<quinn::ServerConfig> {
    let (chain, key) = own_chain(creds, ca_der)?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(IdentityError::tls)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(IdentityError::tls)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.session_storage = Arc::new(NoServerSessionStorage {});
    tls.send_tls13_tickets = 0;
    let quic = QuicServerConfig::try_from(tls).map_err(IdentityError::tls)?;
    Ok(quinn::ServerConfig::with_crypto(Arc::new(quic)))
}

fn client_config(
    verifier: Arc<dyn ServerCertVerifier>,
    own: Option<(&NodeCredentials, &CertificateDer<'static>)>,
) -> Result<quinn::ClientConfig> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(IdentityError::tls)?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut tls = match own {
        Some((creds, ca_der)) => {
            let (chain, key) = own_chain(creds, ca_der)?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(IdentityError::tls)?
        }
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.resumption = Resumption::disabled();
    let quic = QuicClientConfig::try_from(tls).map_err(IdentityError::tls)?;
    Ok(quinn::ClientConfig::new(Arc::new(quic)))
}

fn webpki_server_verifier(roots: Arc<RootCertStore>) -> Result<Arc<WebPkiServerVerifier>> {
    WebPkiServerVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(IdentityError::tls)
}

/// The coordinator's listening endpoint (enrolment, and workers that dial in).
///
/// Client certificates are optional (an enrolling worker has none yet); one that is presented
/// must chain to the cluster CA, follow ragd's conventions and pass `policy`. Whether a
/// connection without a certificate may do anything beyond enrolling is up to the caller
/// ([`super::peer_identity`] returns `None` for it).
pub fn coordinator_server_config(
    ca_pem: &str,
    creds: &NodeCredentials,
    policy: Arc<dyn PeerPolicy>,
) -> Result<quinn::ServerConfig> {
    own_role(creds, Role::Coordinator)?;
    let (roots, ca_der) = cluster_roots(ca_pem)?;
    let inner = WebPkiClientVerifier::builder_with_provider(roots, provider())
        .allow_unauthenticated()
        .build()
        .map_err(IdentityError::tls)?;
    let verifier = ClusterClientVerifier {
        inner,
        required_role: None,
        policy,
    };
    server_config(Arc::new(verifier), creds, &ca_der)
}

/// A worker's listening endpoint: only the cluster's coordinator may connect.
///
/// The client certificate is required, must chain to the cluster CA, carry the coordinator
/// role and pass `policy`.
pub fn worker_server_config(
    ca_pem: &str,
    creds: &NodeCredentials,
    policy: Arc<dyn PeerPolicy>,
) -> Result<quinn::ServerConfig> {
    own_role(creds, Role::Worker)?;
    let (roots, ca_der) = cluster_roots(ca_pem)?;
    let inner = WebPkiClientVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(IdentityError::tls)?;
    let verifier = ClusterClientVerifier {
        inner,
        required_role: Some(Role::Coordinator),
        policy,
    };
    server_config(Arc::new(verifier), creds, &ca_der)
}

/// The coordinator dialing a worker, presenting its coordinator certificate.
///
/// Dial with server name [`super::WORKER_SERVER_NAME`] (any worker of the cluster) or
/// [`super::worker_server_name`]`(id)` (exactly that worker). The worker's certificate must
/// chain to the cluster CA, carry the worker role and pass `policy` (enrolled, not removed).
pub fn coordinator_client_config(
    ca_pem: &str,
    creds: &NodeCredentials,
    policy: Arc<dyn PeerPolicy>,
) -> Result<quinn::ClientConfig> {
    own_role(creds, Role::Coordinator)?;
    let (roots, ca_der) = cluster_roots(ca_pem)?;
    let verifier = ClusterServerVerifier {
        inner: webpki_server_verifier(roots)?,
        required_role: Role::Worker,
        policy,
    };
    client_config(Arc::new(verifier), Some((creds, &ca_der)))
}

/// A worker dialing the coordinator with its worker certificate (server name
/// [`super::COORDINATOR_SERVER_NAME`]); the server must be the cluster's coordinator.
pub fn worker_client_config(ca_pem: &str, creds: &NodeCredentials) -> Result<quinn::ClientConfig> {
    own_role(creds, Role::Worker)?;
    let (roots, ca_der) = cluster_roots(ca_pem)?;
    let verifier = ClusterServerVerifier {
        inner: webpki_server_verifier(roots)?,
        required_role: Role::Coordinator,
        policy: Arc::new(AllowAll),
    };
    client_config(Arc::new(verifier), Some((creds, &ca_der)))
}

/// An enrolling worker dialing the coordinator (server name [`super::COORDINATOR_SERVER_NAME`])
/// with no client certificate.
///
/// The coordinator must send `[coordinator cert, CA cert]`; the connection is accepted only if
/// that CA's fingerprint is `pinned` (from the join token), the coordinator certificate is
/// signed by it and carries the coordinator role.
pub fn enrolment_client_config(pinned: Fingerprint) -> Result<quinn::ClientConfig> {
    let verifier = PinnedCaVerifier {
        pinned,
        provider: provider(),
    };
    client_config(Arc::new(verifier), None)
}
