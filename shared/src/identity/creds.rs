//! A node's own credentials (certificate + private key) and the worker's key request.

use super::error::{IdentityError, Result};
use super::files::{ensure_private_dir, read_private, read_text, write_file};
use super::peer::{identity_of_cert, PeerIdentity};
use super::{validate_node_id, worker_server_name, WORKER_SERVER_NAME};
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::fmt;
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

/// A PEM-encoded private key: wiped from memory on drop, never shown by `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretPem(Zeroizing<String>);

impl SecretPem {
    /// Wraps PEM text of a private key.
    pub fn new(pem: String) -> Self {
        Self(Zeroizing::new(pem))
    }

    /// The PEM text; keep it out of logs.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretPem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretPem(<redacted>)")
    }
}

/// A node's certificate (PEM, the leaf only) and its private key (PEM, PKCS#8).
#[derive(Clone, Debug)]
pub struct NodeCredentials {
    /// The node's certificate, signed by the cluster CA.
    pub cert_pem: String,
    /// The node's private key.
    pub key_pem: SecretPem,
}

impl NodeCredentials {
    /// Pairs a certificate with its key, checking that the key belongs to the certificate
    /// (a worker calls this with the certificate the coordinator signed for its CSR).
    pub fn from_parts(cert_pem: String, key_pem: SecretPem) -> Result<Self> {
        let creds = Self { cert_pem, key_pem };
        creds.check_key_matches(Path::new("<memory>"))?;
        Ok(creds)
    }

    /// Writes `<stem>.pem` (0644) and `<stem>.key` (0600) into `dir`, replacing older ones.
    /// `dir` is created with mode 0700 if missing.
    pub fn save(&self, dir: &Path, stem: &str) -> Result<()> {
        ensure_private_dir(dir)?;
        let (cert_path, key_path) = paths(dir, stem);
        write_file(&key_path, self.key_pem.expose().as_bytes(), 0o600, true)?;
        write_file(&cert_path, self.cert_pem.as_bytes(), 0o644, true)
    }

    /// Reads credentials saved by [`NodeCredentials::save`]; refuses a key file that group or
    /// others can read, and a key that does not belong to the certificate.
    pub fn load(dir: &Path, stem: &str) -> Result<Self> {
        let (cert_path, key_path) = paths(dir, stem);
        let cert_pem = read_text(&cert_path)?;
        let key_pem = read_private(&key_path)?;
        let creds = Self {
            cert_pem,
            key_pem: SecretPem(key_pem),
        };
        creds.check_key_matches(&key_path)?;
        Ok(creds)
    }

    /// The certificate, DER.
    pub fn cert_der(&self) -> Result<Vec<u8>> {
        pem_to_der(&self.cert_pem, "the node certificate")
    }

    /// Who this certificate says the node is.
    pub fn identity(&self) -> Result<PeerIdentity> {
        identity_of_cert(&self.cert_der()?)
    }

    /// The private key in the form rustls takes.
    pub(crate) fn rustls_key(&self) -> Result<PrivateKeyDer<'static>> {
        PrivateKeyDer::from_pem_slice(self.key_pem.expose().as_bytes()).map_err(|e| {
            IdentityError::BadPem {
                what: "the node private key".into(),
                detail: e.to_string(),
            }
        })
    }

    fn check_key_matches(&self, key_path: &Path) -> Result<()> {
        let key = KeyPair::from_pem(self.key_pem.expose()).map_err(|e| IdentityError::BadPem {
            what: format!("the key {}", key_path.display()),
            detail: e.to_string(),
        })?;
        key_matches_cert(&key, &self.cert_der()?, key_path)
    }
}

fn paths(dir: &Path, stem: &str) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("{stem}.pem")),
        dir.join(format!("{stem}.key")),
    )
}

/// A worker's locally generated key and the CSR it sends to the coordinator.
///
/// Only the CSR travels; the key stays on the worker.
#[derive(Debug)]
pub struct WorkerKeyRequest;

impl WorkerKeyRequest {
    /// Generates a key for `worker_id` and a CSR with ragd's worker names for it:
    /// `(key_pem, csr_pem)`.
    pub fn generate(worker_id: &str) -> Result<(SecretPem, String)> {
        validate_node_id(worker_id)?;
        let key = KeyPair::generate().map_err(IdentityError::cert("generate the worker key"))?;
        let mut params = CertificateParams::new(vec![
            WORKER_SERVER_NAME.to_owned(),
            worker_server_name(worker_id),
        ])
        .map_err(IdentityError::cert("encode the worker's DNS names"))?;
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, worker_id);
        let csr = params
            .serialize_request(&key)
            .map_err(IdentityError::cert("create the certificate request"))?;
        let csr_pem = csr
            .pem()
            .map_err(IdentityError::cert("encode the certificate request"))?;
        Ok((SecretPem::new(key.serialize_pem()), csr_pem))
    }
}

/// The DER of the first certificate in PEM text.
pub(crate) fn pem_to_der(pem: &str, what: &str) -> Result<Vec<u8>> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .map(|der| der.to_vec())
        .map_err(|e| IdentityError::BadPem {
            what: what.to_owned(),
            detail: e.to_string(),
        })
}

/// Checks that `key` is the private key of the certificate `cert_der`.
pub(crate) fn key_matches_cert(key: &KeyPair, cert_der: &[u8], key_path: &Path) -> Result<()> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).map_err(|e| {
        IdentityError::BadCertificate {
            detail: e.to_string(),
        }
    })?;
    if cert.public_key().subject_public_key.data.as_ref() == key.public_key_raw() {
        Ok(())
    } else {
        Err(IdentityError::BadPem {
            what: format!("the key {}", key_path.display()),
            detail: "it does not belong to the certificate next to it (a key and certificate \
                     from different enrolments were mixed); restore the matching pair or re-enrol"
                .into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::ClusterCa;
    use crate::protocol::handshake::Role;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn worker_credentials_save_load() {
        let ca = ClusterCa::generate("c").unwrap();
        let (key, csr) = WorkerKeyRequest::generate("w-1").unwrap();
        assert!(!csr.contains("PRIVATE KEY"));
        let cert = ca.sign_worker_csr(&csr, "w-1").unwrap();
        let creds = NodeCredentials::from_parts(cert, key).unwrap();
        let dir = tempfile::tempdir().unwrap();
        creds.save(dir.path(), "worker").unwrap();
        let mode = std::fs::metadata(dir.path().join("worker.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let back = NodeCredentials::load(dir.path(), "worker").unwrap();
        assert_eq!(back.cert_pem, creds.cert_pem);
        assert_eq!(back.identity().unwrap().role, Role::Worker);
        // Saving again replaces the files.
        back.save(dir.path(), "worker").unwrap();
    }

    #[test]
    fn debug_never_shows_the_key() {
        let ca = ClusterCa::generate("c").unwrap();
        let creds = ca.issue_coordinator("coord").unwrap();
        let shown = format!("{creds:?}");
        assert!(shown.contains("<redacted>"));
        assert!(!shown.contains("PRIVATE KEY"));
        assert!(creds.key_pem.expose().contains("PRIVATE KEY"));
    }

    #[test]
    fn mismatched_key_and_world_readable_key_are_refused() {
        let ca = ClusterCa::generate("c").unwrap();
        let a = ca.issue_coordinator("a").unwrap();
        let b = ca.issue_coordinator("b").unwrap();
        let err = NodeCredentials::from_parts(a.cert_pem.clone(), b.key_pem.clone()).unwrap_err();
        assert!(err.to_string().contains("does not belong"), "{err}");

        let dir = tempfile::tempdir().unwrap();
        a.save(dir.path(), "node").unwrap();
        let key = dir.path().join("node.key");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = NodeCredentials::load(dir.path(), "node").unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "key file {} has mode 0644; ragd requires 0600: run chmod 600 {}",
                key.display(),
                key.display()
            )
        );
    }
}
