//! Joining a cluster (`ragd-worker join TOKEN`) and the worker identity it leaves on disk.
//!
//! The worker generates its key locally, finds the coordinator (`--coordinator HOST:PORT` or the
//! coordinator's mDNS advertisement carrying the token's CA fingerprint), connects pinning that
//! fingerprint, proves it knows the join secret without sending it, and stores the certificate
//! the coordinator signs. Files in the state directory: `worker.pem`, `worker.key` (0600),
//! `ca.pem`, `identity.toml`.

use crate::config::WorkerConfig;
use ragd_shared::backoff::Backoff;
use ragd_shared::discovery::{Discovery, DiscoveryEvent, MdnsDiscovery, ServiceKind};
use ragd_shared::identity::{self, Fingerprint, JoinToken, NodeCredentials, WorkerKeyRequest};
use ragd_shared::protocol::handshake::{Hello, Role};
use ragd_shared::protocol::messages::{EnrolRequest, Request, Response};
use ragd_shared::transport::{self, TransportError, DEFAULT_FRAME_TIMEOUT};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// File stem of the worker's certificate and key.
const WORKER_STEM: &str = "worker";
/// How long `join` looks for the coordinator with mDNS.
const MDNS_SEARCH: Duration = Duration::from_secs(10);
/// How long `join` keeps collecting addresses after the first mDNS answer.
const MDNS_SETTLE: Duration = Duration::from_millis(1500);
/// How long one enrolment attempt may wait for the coordinator to answer.
const ENROL_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Times `join` tries an address again after the coordinator refused the connection.
const ENROL_BUSY_RETRIES: u32 = 5;
/// The pauses after a refused connection: [`Backoff`] from this, doubling...
const ENROL_BUSY_FIRST_PAUSE: Duration = Duration::from_millis(500);
/// ... up to this (drawn from the upper half of each: 0.25-0.5 s first, 8-16 s in all).
const ENROL_BUSY_MAX_PAUSE: Duration = Duration::from_secs(8);

/// Errors of joining and of loading the identity.
#[derive(Debug, thiserror::Error)]
pub enum EnrolmentError {
    /// The token does not parse.
    #[error("the join token is not valid ({0}); copy it again from `ragd-coord token show`")]
    BadToken(String),
    /// The worker has not joined a cluster.
    #[error("this worker has not joined a cluster (no identity in {0}): run `ragd-worker join TOKEN` first, or set `join_token` in the config")]
    NotJoined(PathBuf),
    /// The worker already belongs to another cluster.
    #[error("this worker already belongs to the cluster with CA {existing}; pass --force to leave it and join the cluster with CA {wanted}")]
    OtherCluster {
        /// CA fingerprint of the current cluster.
        existing: Fingerprint,
        /// CA fingerprint in the token.
        wanted: Fingerprint,
    },
    /// No coordinator could be found.
    #[error("no coordinator found: {0}")]
    NoCoordinator(String),
    /// Talking to the coordinator failed.
    #[error("enrolment with {addr} failed: {source}")]
    Transport {
        /// The coordinator's address.
        addr: SocketAddr,
        /// Cause.
        source: Box<TransportError>,
    },
    /// The coordinator answered something unexpected.
    #[error("enrolment with {addr} failed: {message}")]
    Rejected {
        /// The coordinator's address.
        addr: SocketAddr,
        /// What it said.
        message: String,
    },
    /// Keys and certificates.
    #[error("worker identity: {0}")]
    Identity(#[from] identity::IdentityError),
    /// Discovery could not start.
    #[error("mDNS: {0}")]
    Discovery(#[from] ragd_shared::discovery::DiscoveryError),
    /// Config problem.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// Filesystem problem.
    #[error("{path}: {source}")]
    Io {
        /// Path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// identity.toml is unreadable.
    #[error("{path} is corrupt ({problem}); run `ragd-worker join TOKEN --force` to enrol again")]
    Corrupt {
        /// Path.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
}

impl EnrolmentError {
    /// Whether the coordinator refused the connection before any handshake (QUIC's
    /// CONNECTION_REFUSED): what its admission limits answer while they are full.
    fn is_refused_connection(&self) -> bool {
        let EnrolmentError::Transport { source, .. } = self else {
            return false;
        };
        matches!(
            source.as_ref(),
            TransportError::Connection {
                source: quinn::ConnectionError::ConnectionClosed(close),
                ..
            } if close.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED
        )
    }
}

/// `identity.toml`: who this worker is and which cluster it belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityFile {
    /// The worker's id.
    pub id: String,
    /// The coordinator's id (the only peer allowed to dial this worker).
    pub coordinator_id: String,
    /// Fingerprint of the cluster CA.
    pub ca_fingerprint: String,
}

/// Everything a worker needs to serve its coordinator.
pub struct WorkerIdentity {
    /// Id, coordinator and cluster.
    pub file: IdentityFile,
    /// Certificate and key.
    pub credentials: NodeCredentials,
    /// The cluster CA certificate (PEM).
    pub ca_pem: String,
}

impl WorkerIdentity {
    /// Loads the identity from `dir`.
    pub fn load(dir: &Path) -> Result<Self, EnrolmentError> {
        let path = dir.join("identity.toml");
        if !path.exists() {
            return Err(EnrolmentError::NotJoined(dir.to_path_buf()));
        }
        let text = read(&path)?;
        let file: IdentityFile = toml::from_str(&text).map_err(|e| EnrolmentError::Corrupt {
            path: path.clone(),
            problem: e.to_string(),
        })?;
        let ca_pem = read(&dir.join("ca.pem"))?;
        let credentials = NodeCredentials::load(dir, WORKER_STEM)?;
        Ok(Self {
            file,
            credentials,
            ca_pem,
        })
    }

    /// The cluster CA fingerprint.
    pub fn ca_fingerprint(&self) -> Result<Fingerprint, EnrolmentError> {
        self.file
            .ca_fingerprint
            .parse()
            .map_err(|_| EnrolmentError::Corrupt {
                path: PathBuf::from("identity.toml"),
                problem: "bad ca_fingerprint".into(),
            })
    }
}

fn read(path: &Path) -> Result<String, EnrolmentError> {
    std::fs::read_to_string(path).map_err(|source| EnrolmentError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn write(path: &Path, text: &str) -> Result<(), EnrolmentError> {
    std::fs::write(path, text).map_err(|source| EnrolmentError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// The id this worker enrols under: the configured name or one derived from the host name.
pub fn worker_id(cfg: &WorkerConfig) -> String {
    if let Some(name) = &cfg.name {
        return name.clone();
    }
    let host = hostname::get()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default();
    identity::node_id_from_hostname(&host, "worker")
}

/// Joins the cluster the token names; returns the stored identity.
pub async fn join(
    cfg: &WorkerConfig,
    token: &str,
    force: bool,
) -> Result<WorkerIdentity, EnrolmentError> {
    let token: JoinToken = token
        .trim()
        .parse()
        .map_err(|e: identity::IdentityError| EnrolmentError::BadToken(e.to_string()))?;
    let dir = cfg.state_dir()?;
    if let Ok(existing) = WorkerIdentity::load(&dir) {
        let fp = existing.ca_fingerprint()?;
        if fp == token.ca_fingerprint && !force {
            tracing::info!(worker = %existing.file.id, "already joined this cluster");
            return Ok(existing);
        }
        if !force {
            return Err(EnrolmentError::OtherCluster {
                existing: fp,
                wanted: token.ca_fingerprint,
            });
        }
    }
    let id = worker_id(cfg);
    identity::validate_node_id(&id)?;
    let addrs = find_coordinator(cfg, &token.ca_fingerprint).await?;
    let (key_pem, csr_pem) = WorkerKeyRequest::generate(&id)?;
    let mut last = EnrolmentError::NoCoordinator("no address to try".into());
    let guard = cfg.lan_guard();
    for addr in addrs {
        // The coordinator is dialled only inside the networks this worker talks to at all.
        if let Err(e) = guard.check(addr.ip()) {
            tracing::warn!(coordinator = %addr, error = %e, "not dialling a coordinator outside the allowed networks");
            last = EnrolmentError::NoCoordinator(e.to_string());
            continue;
        }
        match enrol_retrying_busy(addr, &token, &id, &csr_pem).await {
            Ok((cert_pem, ca_pem, coordinator_id)) => {
                let ca_fp = identity::pem_fingerprint(&ca_pem);
                if ca_fp != Some(token.ca_fingerprint) {
                    return Err(EnrolmentError::Rejected {
                        addr,
                        message: "the coordinator returned a CA that does not match the token"
                            .into(),
                    });
                }
                std::fs::create_dir_all(&dir).map_err(|source| EnrolmentError::Io {
                    path: dir.clone(),
                    source,
                })?;
                set_private(&dir)?;
                NodeCredentials::from_parts(cert_pem, key_pem)?.save(&dir, WORKER_STEM)?;
                write(&dir.join("ca.pem"), &ca_pem)?;
                let file = IdentityFile {
                    id: id.clone(),
                    coordinator_id,
                    ca_fingerprint: token.ca_fingerprint.to_string(),
                };
                let text = toml::to_string(&file).map_err(|e| EnrolmentError::Corrupt {
                    path: dir.join("identity.toml"),
                    problem: e.to_string(),
                })?;
                write(&dir.join("identity.toml"), &text)?;
                tracing::info!(worker = %id, coordinator = %addr, "joined the cluster");
                return WorkerIdentity::load(&dir);
            }
            Err(e) => {
                tracing::warn!(coordinator = %addr, error = %e, "enrolment attempt failed");
                last = e;
            }
        }
    }
    Err(last)
}

fn set_private(dir: &Path) -> Result<(), EnrolmentError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(|source| {
        EnrolmentError::Io {
            path: dir.to_path_buf(),
            source,
        }
    })
}

async fn find_coordinator(
    cfg: &WorkerConfig,
    ca: &Fingerprint,
) -> Result<Vec<SocketAddr>, EnrolmentError> {
    if let Some(c) = &cfg.coordinator {
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host(c.as_str())
            .await
            .map_err(|e| EnrolmentError::NoCoordinator(format!("cannot resolve {c}: {e}")))?
            .collect();
        return Ok(addrs);
    }
    if !cfg.mdns.enabled {
        return Err(EnrolmentError::NoCoordinator(
            "mDNS is disabled and no coordinator address is set: pass --coordinator HOST:PORT"
                .into(),
        ));
    }
    let mdns = MdnsDiscovery::new(&cfg.mdns.to_config())?;
    let mut events = mdns.browse(ServiceKind::Coordinator)?;
    let wanted = ca.to_string();
    // Resolution arrives in steps (often IPv6 link-local first, IPv4 a moment later): after the
    // first match, keep collecting addresses briefly, then try IPv4 first.
    let mut addrs: Vec<SocketAddr> = Vec::new();
    let deadline = tokio::time::Instant::now() + MDNS_SEARCH;
    let mut settle: Option<tokio::time::Instant> = None;
    loop {
        let until = settle.unwrap_or(deadline).min(deadline);
        match tokio::time::timeout_at(until, events.recv()).await {
            Ok(Some(DiscoveryEvent::Found(peer)))
                if peer.ca_fingerprint.as_deref() == Some(wanted.as_str()) =>
            {
                for a in peer.addrs {
                    if !addrs.contains(&a) {
                        addrs.push(a);
                    }
                }
                if !addrs.is_empty() && settle.is_none() {
                    settle = Some(tokio::time::Instant::now() + MDNS_SETTLE);
                }
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }
    addrs.sort_by_key(|a| !a.is_ipv4());
    let found = (!addrs.is_empty()).then_some(addrs);
    mdns.shutdown().await;
    found.ok_or_else(|| {
        EnrolmentError::NoCoordinator(format!(
            "no coordinator of this cluster answered on mDNS within {MDNS_SEARCH:?}; is `ragd-coord serve` running on the LAN? Otherwise pass --coordinator HOST:PORT"
        ))
    })
}

/// [`enrol_at`], tried again after a pause while the coordinator refuses the connection: it
/// admits only a few unauthenticated connections at a time, per source address and in all, so
/// workers joining at once (or behind one NAT) are turned away until earlier ones finish.
/// Pauses follow a jittered [`Backoff`] from [`ENROL_BUSY_FIRST_PAUSE`], [`ENROL_BUSY_RETRIES`]
/// times.
async fn enrol_retrying_busy(
    addr: SocketAddr,
    token: &JoinToken,
    id: &str,
    csr_pem: &str,
) -> Result<(String, String, String), EnrolmentError> {
    let mut retries = 0;
    let mut backoff = Backoff::new(ENROL_BUSY_FIRST_PAUSE, ENROL_BUSY_MAX_PAUSE);
    loop {
        match enrol_at(addr, token, id, csr_pem).await {
            Err(e) if e.is_refused_connection() && retries < ENROL_BUSY_RETRIES => {
                let pause = backoff.next_delay();
                retries += 1;
                tracing::info!(
                    coordinator = %addr,
                    retry = retries,
                    pause_ms = pause.as_millis() as u64,
                    "the coordinator refused the connection (busy enrolling others?); trying again"
                );
                tokio::time::sleep(pause).await;
            }
            Err(e) if e.is_refused_connection() => {
                return Err(EnrolmentError::Rejected {
                    addr,
                    message: format!(
                        "the coordinator refused the connection {} times: its enrolment slots \
                         stay full, or it refuses this address (outside its allowed networks, \
                         or too many wrong join tokens from it); its log says which",
                        retries + 1
                    ),
                })
            }
            done => return done,
        }
    }
}

async fn enrol_at(
    addr: SocketAddr,
    token: &JoinToken,
    id: &str,
    csr_pem: &str,
) -> Result<(String, String, String), EnrolmentError> {
    let transport_err = |source| EnrolmentError::Transport {
        addr,
        source: Box::new(source),
    };
    let bind: SocketAddr = if addr.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let endpoint = quinn::Endpoint::client(bind).map_err(|source| EnrolmentError::Io {
        path: PathBuf::from("udp socket"),
        source,
    })?;
    let mut client = identity::enrolment_client_config(token.ca_fingerprint)?;
    client.transport_config(transport::transport_config(
        Duration::from_secs(2),
        Duration::from_secs(15),
        addr,
    ));
    let connecting = endpoint
        .connect_with(client, addr, identity::COORDINATOR_SERVER_NAME)
        .map_err(|e| EnrolmentError::Rejected {
            addr,
            message: e.to_string(),
        })?;
    let conn = tokio::time::timeout(ENROL_CONNECT_TIMEOUT, connecting)
        .await
        .map_err(|_| EnrolmentError::Rejected {
            addr,
            message: "no answer (is the coordinator running and reachable?)".into(),
        })?
        .map_err(|source| transport_err(TransportError::Connection { peer: addr, source }))?;
    let hello = Hello::new(Role::Enrollee, id);
    transport::client_handshake(&conn, &hello, DEFAULT_FRAME_TIMEOUT)
        .await
        .map_err(transport_err)?;
    let mut ekm = [0u8; identity::EKM_LEN];
    conn.export_keying_material(&mut ekm, identity::EKM_LABEL, id.as_bytes())
        .map_err(|_| EnrolmentError::Rejected {
            addr,
            message: "could not export TLS keying material".into(),
        })?;
    let proof = identity::enrolment_proof(&token.secret, &ekm, id, csr_pem).to_vec();
    let req = Request::Enrol(EnrolRequest {
        worker_id: id.to_string(),
        csr_pem: csr_pem.to_string(),
        proof,
    });
    let resp = transport::request(&conn, &req, DEFAULT_FRAME_TIMEOUT)
        .await
        .map_err(transport_err)?;
    conn.close(transport::CLOSE_SHUTDOWN, b"enrolled");
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    match resp {
        Response::Enrolled(r) => Ok((r.worker_cert_pem, r.ca_cert_pem, r.coordinator_id)),
        Response::Error(e) => Err(EnrolmentError::Rejected {
            addr,
            message: e.message,
        }),
        other => Err(EnrolmentError::Rejected {
            addr,
            message: format!("unexpected answer {other:?}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn closed_with(code: quinn::TransportErrorCode) -> EnrolmentError {
        let addr: SocketAddr = "127.0.0.1:7700".parse().unwrap();
        let close = quinn::ConnectionClose {
            error_code: code,
            frame_type: None,
            reason: bytes::Bytes::new(),
        };
        EnrolmentError::Transport {
            addr,
            source: Box::new(TransportError::Connection {
                peer: addr,
                source: quinn::ConnectionError::ConnectionClosed(close),
            }),
        }
    }

    #[test]
    fn only_a_refused_connection_is_retried() {
        assert!(closed_with(quinn::TransportErrorCode::CONNECTION_REFUSED).is_refused_connection());
        assert!(!closed_with(quinn::TransportErrorCode::PROTOCOL_VIOLATION).is_refused_connection());
        let addr: SocketAddr = "127.0.0.1:7700".parse().unwrap();
        let rejected = EnrolmentError::Rejected {
            addr,
            message: "the join proof is wrong".into(),
        };
        assert!(!rejected.is_refused_connection());
    }
}
