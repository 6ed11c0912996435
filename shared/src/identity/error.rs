//! The one error type of the identity module.

use super::Fingerprint;
use std::path::PathBuf;

/// What can go wrong while creating, storing, loading or checking cluster identities.
///
/// Every message says what is wrong and, where a person can fix it, what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// A node id does not follow the naming rule.
    #[error(
        "invalid node id {id:?}: {problem}; a node id is 1-63 characters of a-z, 0-9 and '-', \
         not starting or ending with '-' (for example \"gpu-box-1\")"
    )]
    InvalidNodeId {
        /// The id as given.
        id: String,
        /// Which part of the rule it breaks.
        problem: &'static str,
    },

    /// A cluster name is empty, too long or holds control characters.
    #[error(
        "invalid cluster name {name:?}: {problem}; use 1-64 printable characters (for example \"home-lab\")"
    )]
    InvalidClusterName {
        /// The name as given.
        name: String,
        /// Which part of the rule it breaks.
        problem: &'static str,
    },

    /// rcgen refused to build, sign or parse something.
    #[error("could not {action}: {source}")]
    Certificate {
        /// What was being done.
        action: &'static str,
        /// The underlying rcgen error.
        #[source]
        source: rcgen::Error,
    },

    /// A certificate could not be parsed as X.509.
    #[error("the certificate is not valid X.509 ({detail}); the peer or the file is corrupt or is not a ragd certificate")]
    BadCertificate {
        /// What the parser said.
        detail: String,
    },

    /// A certificate parsed but does not follow ragd's conventions (CN = node id, role in the SAN).
    #[error("certificate for {subject:?} is not a ragd node certificate: {problem}")]
    NotANodeCertificate {
        /// The subject common name, if any.
        subject: String,
        /// What is missing or contradictory.
        problem: String,
    },

    /// PEM text holds no usable item of the expected kind.
    #[error("{what} is not valid PEM: {detail}; the file may be truncated or be some other kind of file")]
    BadPem {
        /// What was being read ("the CA certificate", "the key file ...").
        what: String,
        /// What was wrong.
        detail: String,
    },

    /// A worker's certificate signing request was refused.
    #[error("refusing the certificate request of worker {worker_id:?}: {problem}")]
    CsrRefused {
        /// The worker id the request was meant for.
        worker_id: String,
        /// Why it was refused.
        problem: String,
    },

    /// Reading or writing an identity file failed.
    #[error("could not {action} {}: {source}", path.display())]
    Io {
        /// What was being done ("read", "write", "create directory").
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },

    /// A private key file is readable by other users.
    #[error(
        "key file {} has mode {mode:04o}; ragd requires 0600: run chmod 600 {}",
        path.display(),
        path.display()
    )]
    InsecureKeyFile {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },

    /// Saving would overwrite an existing cluster CA.
    #[error(
        "{} already exists; refusing to overwrite a cluster CA (every enrolled node trusts it). \
         Load it instead, or move it away first if you really mean to start a new cluster",
        path.display()
    )]
    AlreadyExists {
        /// The existing file.
        path: PathBuf,
    },

    /// A join token could not be parsed.
    #[error("invalid join token: {problem}; copy the whole token the coordinator printed (it starts with \"ragd1-\")")]
    BadJoinToken {
        /// What is wrong with it.
        problem: String,
    },

    /// The coordinator reached while enrolling belongs to another cluster.
    #[error(
        "the coordinator's CA fingerprint is {found} but the join token pins {pinned}: this token is for another cluster"
    )]
    WrongCluster {
        /// The fingerprint of the CA the coordinator presented.
        found: Fingerprint,
        /// The fingerprint in the join token.
        pinned: Fingerprint,
    },

    /// The coordinator reached while enrolling did not send its CA certificate.
    #[error("the coordinator sent no CA certificate with its own (chain of {chain_len}); it is not a ragd coordinator or is misconfigured")]
    MissingCaCertificate {
        /// How many certificates the coordinator sent.
        chain_len: usize,
    },

    /// The peer's certificate is valid but has the wrong role for this connection.
    #[error("peer {node_id:?} has a {found} certificate but this connection needs a {expected}")]
    WrongRole {
        /// The peer's node id.
        node_id: String,
        /// The role its certificate carries.
        found: crate::protocol::handshake::Role,
        /// The role this connection needs.
        expected: crate::protocol::handshake::Role,
    },

    /// The peer policy refused an otherwise valid peer.
    #[error("peer {node_id:?} ({role}) refused by policy: {reason}")]
    PeerRejected {
        /// The peer's node id.
        node_id: String,
        /// The peer's role.
        role: crate::protocol::handshake::Role,
        /// The policy's reason.
        reason: String,
    },

    /// A TLS configuration was given the credentials of the other role.
    #[error(
        "the credentials given are a {found} certificate for {node_id:?}, but this TLS configuration needs {expected} \
         credentials: check that the node loads its own certificate and key (coordinator and worker files mixed up?)"
    )]
    WrongCredentials {
        /// The node id in the given certificate.
        node_id: String,
        /// The role the given certificate carries.
        found: crate::protocol::handshake::Role,
        /// The role the configuration is for.
        expected: crate::protocol::handshake::Role,
    },

    /// The operating system's random number generator failed.
    #[error("the system random number generator failed while generating {what}; the OS entropy source is unavailable")]
    Random {
        /// What was being generated.
        what: &'static str,
    },

    /// rustls refused the TLS configuration.
    #[error("could not build the TLS configuration: {detail}")]
    TlsConfig {
        /// What rustls or quinn said.
        detail: String,
    },
}

impl IdentityError {
    pub(crate) fn cert(action: &'static str) -> impl FnOnce(rcgen::Error) -> Self {
        move |source| Self::Certificate { action, source }
    }

    pub(crate) fn io(
        action: &'static str,
        path: &std::path::Path,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.to_path_buf();
        move |source| Self::Io {
            action,
            path,
            source,
        }
    }

    pub(crate) fn tls(detail: impl std::fmt::Display) -> Self {
        Self::TlsConfig {
            detail: detail.to_string(),
        }
    }
}

/// Shorthand for results of this module.
pub type Result<T, E = IdentityError> = std::result::Result<T, E>;
