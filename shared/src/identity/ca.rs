//! The cluster certificate authority: creates coordinator certificates and signs worker CSRs.

use super::creds::{key_matches_cert, pem_to_der, NodeCredentials, SecretPem};
use super::error::{IdentityError, Result};
use super::files::{ensure_private_dir, read_private, read_text, write_file};
use super::{
    validate_node_id, worker_server_name, Fingerprint, COORDINATOR_SERVER_NAME, WORKER_SERVER_NAME,
};
use crate::protocol::handshake::Role;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, DnValue, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
    SerialNumber,
};
use ring::rand::SecureRandom;
use std::fmt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Name of the CA certificate file in a CA directory.
const CA_CERT_FILE: &str = "ca.pem";
/// Name of the CA private key file in a CA directory (mode 0600).
const CA_KEY_FILE: &str = "ca.key";

const DAY: Duration = Duration::from_secs(24 * 3600);
/// Node certificates: 10 years (no renewal service in a home lab; re-enrol to rotate).
const NODE_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600 + 3 * 24 * 3600);
/// The CA outlives every certificate it signs.
const CA_VALIDITY: Duration = Duration::from_secs(20 * 365 * 24 * 3600 + 5 * 24 * 3600);

/// A cluster's certificate authority: its certificate and private key.
pub struct ClusterCa {
    cluster_name: String,
    cert_pem: String,
    cert_der: Vec<u8>,
    key: KeyPair,
    fingerprint: Fingerprint,
}

impl fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterCa")
            .field("cluster_name", &self.cluster_name)
            .field("fingerprint", &self.fingerprint)
            .field("key", &"<redacted>")
            .finish()
    }
}

impl ClusterCa {
    /// Creates a new CA for the cluster `cluster_name` (1-64 printable characters).
    pub fn generate(cluster_name: &str) -> Result<Self> {
        validate_cluster_name(cluster_name)?;
        let key = KeyPair::generate().map_err(IdentityError::cert("generate the CA key"))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(
            DnType::CommonName,
            format!("ragd cluster CA {cluster_name}"),
        );
        params
            .distinguished_name
            .push(DnType::OrganizationName, "ragd");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        set_validity(&mut params, CA_VALIDITY)?;
        params.serial_number = Some(random_serial()?);
        let cert = params
            .self_signed(&key)
            .map_err(IdentityError::cert("self-sign the CA certificate"))?;
        let cert_der = cert.der().to_vec();
        tracing::info!(cluster = cluster_name, fingerprint = %Fingerprint::of_der(&cert_der), "created cluster CA");
        Ok(Self {
            cluster_name: cluster_name.to_owned(),
            cert_pem: cert.pem(),
            fingerprint: Fingerprint::of_der(&cert_der),
            cert_der,
            key,
        })
    }

    /// Writes `ca.pem` and `ca.key` (mode 0600) into `dir` (created with mode 0700 if missing).
    /// Refuses to overwrite an existing CA.
    pub fn save(&self, dir: &Path) -> Result<()> {
        ensure_private_dir(dir)?;
        let key_path = dir.join(CA_KEY_FILE);
        let cert_path = dir.join(CA_CERT_FILE);
        for path in [&key_path, &cert_path] {
            if path.exists() {
                return Err(IdentityError::AlreadyExists { path: path.clone() });
            }
        }
        let key_pem = zeroize::Zeroizing::new(self.key.serialize_pem());
        write_file(&key_path, key_pem.as_bytes(), 0o600, false)?;
        write_file(&cert_path, self.cert_pem.as_bytes(), 0o644, false)
    }

    /// Reads a CA saved by [`ClusterCa::save`]; refuses a key file group or others can read.
    pub fn load(dir: &Path) -> Result<Self> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        let cert_pem = read_text(&cert_path)?;
        let key_pem = read_private(&key_path)?;
        let cert_der = pem_to_der(&cert_pem, &cert_path.display().to_string())?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| IdentityError::BadPem {
            what: format!("the CA key file {}", key_path.display()),
            detail: e.to_string(),
        })?;
        key_matches_cert(&key, &cert_der, &key_path)?;
        let (_, cert) = x509_parser::parse_x509_certificate(&cert_der).map_err(|e| {
            IdentityError::BadCertificate {
                detail: e.to_string(),
            }
        })?;
        if !cert.is_ca() {
            return Err(IdentityError::NotANodeCertificate {
                subject: cert.subject().to_string(),
                problem: format!("{} is not a CA certificate", cert_path.display()),
            });
        }
        let cn = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .unwrap_or_default();
        let cluster_name = cn.strip_prefix("ragd cluster CA ").unwrap_or(cn).to_owned();
        Ok(Self {
            cluster_name,
            fingerprint: Fingerprint::of_der(&cert_der),
            cert_pem,
            cert_der,
            key,
        })
    }

    /// The cluster name given at creation.
    pub fn cluster_name(&self) -> &str {
        &self.cluster_name
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// SHA-256 of the CA certificate: what join tokens pin.
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    /// Creates a key and a coordinator certificate for `coordinator_id`.
    pub fn issue_coordinator(&self, coordinator_id: &str) -> Result<NodeCredentials> {
        validate_node_id(coordinator_id)?;
        let key = KeyPair::generate().map_err(IdentityError::cert("generate a coordinator key"))?;
        let params = node_params(coordinator_id, Role::Coordinator)?;
        let cert = params
            .signed_by(&key, &self.issuer()?)
            .map_err(IdentityError::cert("sign the coordinator certificate"))?;
        tracing::info!(coordinator_id, "issued coordinator certificate");
        Ok(NodeCredentials {
            cert_pem: cert.pem(),
            key_pem: SecretPem::new(key.serialize_pem()),
        })
    }

    /// Signs a worker's CSR, returning the worker certificate (PEM).
    ///
    /// The CSR's signature must verify, its subject CN must be `worker_id` and every SAN it asks
    /// for must be one a worker named `worker_id` gets. Nothing else is taken from the request:
    /// the certificate gets ragd's own names, key usages, validity and a random serial.
    pub fn sign_worker_csr(&self, csr_pem: &str, worker_id: &str) -> Result<String> {
        validate_node_id(worker_id)?;
        let refuse = |problem: String| IdentityError::CsrRefused {
            worker_id: worker_id.to_owned(),
            problem,
        };
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| {
            refuse(format!(
                "it is not a valid, correctly signed certificate request ({e})"
            ))
        })?;
        let cn = match csr.params.distinguished_name.get(&DnType::CommonName) {
            Some(value) => dn_value_text(value),
            None => return Err(refuse("its subject has no common name".into())),
        };
        if cn != worker_id {
            return Err(refuse(format!(
                "its subject names worker {cn:?}; the worker must enrol under the id it asks for"
            )));
        }
        let allowed = [WORKER_SERVER_NAME.to_owned(), worker_server_name(worker_id)];
        for san in &csr.params.subject_alt_names {
            match san {
                SanType::DnsName(name) if allowed.iter().any(|a| a == name.as_str()) => {}
                other => {
                    return Err(refuse(format!(
                        "it asks for the subject alternative name {other:?}, which worker {worker_id:?} may not have"
                    )))
                }
            }
        }
        if !matches!(csr.params.is_ca, IsCa::NoCa | IsCa::ExplicitNoCa) {
            return Err(refuse("it asks to be a certificate authority".into()));
        }
        let params = node_params(worker_id, Role::Worker)?;
        let cert = params
            .signed_by(&csr.public_key, &self.issuer()?)
            .map_err(IdentityError::cert("sign the worker certificate"))?;
        tracing::info!(worker_id, "signed worker certificate");
        Ok(cert.pem())
    }

    fn issuer(&self) -> Result<Issuer<'static, &KeyPair>> {
        Issuer::from_ca_cert_der(&self.cert_der.as_slice().into(), &self.key)
            .map_err(IdentityError::cert("read the CA certificate as an issuer"))
    }
}

/// The text of a distinguished-name value, whatever string type it was encoded with.
fn dn_value_text(value: &DnValue) -> String {
    match value {
        DnValue::Utf8String(s) => s.clone(),
        DnValue::PrintableString(s) => s.as_str().to_owned(),
        DnValue::Ia5String(s) => s.as_str().to_owned(),
        DnValue::TeletexString(s) => s.as_str().to_owned(),
        other => format!("{other:?}"),
    }
}

/// Parameters of a node certificate, following the conventions in the module documentation.
pub(crate) fn node_params(node_id: &str, role: Role) -> Result<CertificateParams> {
    validate_node_id(node_id)?;
    let names = match role {
        Role::Coordinator => vec![COORDINATOR_SERVER_NAME.to_owned()],
        Role::Worker => vec![WORKER_SERVER_NAME.to_owned(), worker_server_name(node_id)],
        Role::Enrollee => {
            return Err(IdentityError::NotANodeCertificate {
                subject: node_id.to_owned(),
                problem: "an enrolling worker has no certificate role; enrol it as a worker".into(),
            })
        }
    };
    let mut params = CertificateParams::new(names)
        .map_err(IdentityError::cert("encode the node's DNS names"))?;
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, node_id);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params, NODE_VALIDITY)?;
    params.serial_number = Some(random_serial()?);
    Ok(params)
}

/// Valid from a day ago (tolerates clocks a little behind) for `validity`.
fn set_validity(params: &mut CertificateParams, validity: Duration) -> Result<()> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let to_time = |secs: u64| {
        x509_parser::time::ASN1Time::from_timestamp(secs as i64)
            .map(|t| t.to_datetime())
            .map_err(|e| IdentityError::BadCertificate {
                detail: format!("the system clock gives an unusable date ({e})"),
            })
    };
    params.not_before = to_time(now.saturating_sub(DAY.as_secs()))?;
    params.not_after = to_time(now + validity.as_secs())?;
    Ok(())
}

/// 128 random bits, top bit cleared so the DER integer stays positive and 16 bytes long.
fn random_serial() -> Result<SerialNumber> {
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| IdentityError::Random {
            what: "a certificate serial number",
        })?;
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    Ok(SerialNumber::from_slice(&bytes))
}

fn validate_cluster_name(name: &str) -> Result<()> {
    let problem = if name.is_empty() {
        Some("it is empty")
    } else if name.chars().count() > 64 {
        Some("it is longer than 64 characters")
    } else if name.chars().any(char::is_control) {
        Some("it holds control characters")
    } else {
        None
    };
    match problem {
        Some(problem) => Err(IdentityError::InvalidClusterName {
            name: name.to_owned(),
            problem,
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{identity_of_cert, WorkerKeyRequest};
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn ca_save_load_round_trip_and_modes() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        let ca = ClusterCa::generate("home lab").unwrap();
        ca.save(&ca_dir).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&ca_dir), 0o700);
        assert_eq!(mode(&ca_dir.join("ca.key")), 0o600);

        let loaded = ClusterCa::load(&ca_dir).unwrap();
        assert_eq!(loaded.fingerprint(), ca.fingerprint());
        assert_eq!(loaded.cluster_name(), "home lab");
        assert!(!format!("{loaded:?}").contains("PRIVATE"));

        let err = ca.save(&ca_dir).unwrap_err();
        assert!(matches!(err, IdentityError::AlreadyExists { .. }), "{err}");

        std::fs::set_permissions(
            ca_dir.join("ca.key"),
            std::fs::Permissions::from_mode(0o640),
        )
        .unwrap();
        let err = ClusterCa::load(&ca_dir).unwrap_err();
        assert!(
            err.to_string()
                .contains("has mode 0640; ragd requires 0600"),
            "{err}"
        );
    }

    #[test]
    fn load_refuses_a_key_of_another_ca() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        ClusterCa::generate("a").unwrap().save(&a).unwrap();
        ClusterCa::generate("b").unwrap().save(&b).unwrap();
        std::fs::copy(b.join("ca.key"), a.join("ca.key")).unwrap();
        std::fs::set_permissions(a.join("ca.key"), std::fs::Permissions::from_mode(0o600)).unwrap();
        let err = ClusterCa::load(&a).unwrap_err();
        assert!(err.to_string().contains("does not belong"), "{err}");
    }

    #[test]
    fn coordinator_cert_follows_conventions() {
        let ca = ClusterCa::generate("c").unwrap();
        let creds = ca.issue_coordinator("coord-1").unwrap();
        let id = identity_of_cert(&creds.cert_der().unwrap()).unwrap();
        assert_eq!(id.node_id, "coord-1");
        assert_eq!(id.role, Role::Coordinator);
        let other = ca.issue_coordinator("coord-1").unwrap();
        assert_ne!(
            other.cert_pem, creds.cert_pem,
            "serials and keys are random"
        );
    }

    #[test]
    fn csr_is_signed_with_our_own_extensions() {
        let ca = ClusterCa::generate("c").unwrap();
        let (_key, csr) = WorkerKeyRequest::generate("gpu-1").unwrap();
        let cert_pem = ca.sign_worker_csr(&csr, "gpu-1").unwrap();
        let der = pem_to_der(&cert_pem, "test").unwrap();
        let id = identity_of_cert(&der).unwrap();
        assert_eq!((id.node_id.as_str(), id.role), ("gpu-1", Role::Worker));
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        assert!(!cert.is_ca());
        let years = (cert.validity().not_after.timestamp()
            - cert.validity().not_before.timestamp())
            / (365 * 24 * 3600);
        assert!(years >= 10, "{years}");
    }

    #[test]
    fn csr_for_another_id_is_refused() {
        let ca = ClusterCa::generate("c").unwrap();
        let (_key, csr) = WorkerKeyRequest::generate("gpu-1").unwrap();
        let err = ca.sign_worker_csr(&csr, "gpu-2").unwrap_err();
        assert!(matches!(err, IdentityError::CsrRefused { .. }), "{err}");
        assert!(err.to_string().contains("\"gpu-1\""), "{err}");
    }

    #[test]
    fn csr_asking_for_coordinator_name_is_refused() {
        let ca = ClusterCa::generate("c").unwrap();
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec![COORDINATOR_SERVER_NAME.to_owned()]).unwrap();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, "gpu-1");
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();
        let err = ca.sign_worker_csr(&csr, "gpu-1").unwrap_err();
        assert!(err.to_string().contains("may not have"), "{err}");
    }

    #[test]
    fn garbage_csr_and_bad_names_are_refused() {
        let ca = ClusterCa::generate("c").unwrap();
        assert!(matches!(
            ca.sign_worker_csr("not a csr", "gpu-1").unwrap_err(),
            IdentityError::CsrRefused { .. }
        ));
        assert!(ClusterCa::generate("").is_err());
        assert!(ClusterCa::generate("a\nb").is_err());
        assert!(ca.issue_coordinator("Bad_Id").is_err());
    }
}
