//! `ragd-worker run`: serve this worker's coordinator.
//!
//! The worker listens on QUIC (its certificate, signed by the cluster CA), advertises itself with
//! mDNS, and accepts only its cluster's coordinator (mutual TLS; the coordinator certificate must
//! name the coordinator recorded at enrolment). It answers the handshake with its capabilities
//! and heartbeats with its load, re-detecting LLM endpoints and memory periodically.

use crate::capabilities::{self, CapabilityError};
use crate::config::WorkerConfig;
use crate::enrolment::{self, EnrolmentError, WorkerIdentity};
use crate::tasks::{TaskEnv, TaskRunner};
use ragd_shared::blobs::{self, BlobStore};
use ragd_shared::discovery::{Advertisement, Discovery, MdnsDiscovery, ServiceKind};
use ragd_shared::identity::{self, PeerIdentity, PeerPolicy, PeerRejection};
use ragd_shared::netguard::LanGuard;
use ragd_shared::protocol::capabilities::Capabilities;
use ragd_shared::protocol::handshake::{HelloReply, Refusal, RefusalReason, Role, Welcome};
use ragd_shared::protocol::jobs::{BlobFetch, TaskStatus};
use ragd_shared::protocol::messages::{ErrorCode, ErrorReply};
use ragd_shared::protocol::messages::{HeartbeatReply, Request, Response};
use ragd_shared::protocol::{VersionRange, RUN_TASK_VERSION, SOFTWARE_VERSION};
use ragd_shared::transport::{self, DEFAULT_FRAME_TIMEOUT};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Errors of the worker daemon.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Identity or joining problem.
    #[error(transparent)]
    Enrolment(#[from] EnrolmentError),
    /// Capability detection failed.
    #[error(transparent)]
    Capabilities(#[from] CapabilityError),
    /// TLS configuration.
    #[error("worker identity: {0}")]
    Identity(#[from] identity::IdentityError),
    /// Config problem.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// mDNS could not start.
    #[error("mDNS: {0}")]
    Discovery(#[from] ragd_shared::discovery::DiscoveryError),
    /// The blob store could not be opened.
    #[error("blob store: {0}")]
    Blobs(String),
    /// The QUIC endpoint could not be bound.
    #[error("cannot listen on {addr}: {source} (is another worker running? change `listen`)")]
    Bind {
        /// Address.
        addr: std::net::SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
}

/// How long a poll of a running task waits for it to end before answering with its progress.
const LONG_POLL: Duration = Duration::from_secs(1);

/// Admits only the cluster's coordinator (the one recorded at enrolment).
#[derive(Debug)]
struct OwnCoordinator {
    coordinator_id: String,
}

impl PeerPolicy for OwnCoordinator {
    fn check(&self, peer: &PeerIdentity) -> Result<(), PeerRejection> {
        if peer.role == Role::Coordinator && peer.node_id == self.coordinator_id {
            Ok(())
        } else {
            Err(PeerRejection {
                reason: format!(
                    "{} {:?} is not this worker's coordinator {:?}",
                    peer.role, peer.node_id, self.coordinator_id
                ),
            })
        }
    }
}

/// What the worker reports, shared by its connection tasks.
struct Reported {
    capabilities: RwLock<Capabilities>,
    /// Bumped whenever the capabilities change.
    version: AtomicU64,
    busy_slots: Arc<AtomicU32>,
    total_slots: u32,
    /// The protocol versions offered to coordinators.
    versions: VersionRange,
}

/// Runs the worker until `cancel` fires (joining first if a `join_token` is configured and the
/// worker has not joined), then shuts down in order: stop accepting, close connections,
/// withdraw the mDNS advertisement.
pub async fn run(cfg: WorkerConfig, cancel: CancellationToken) -> Result<(), ServeError> {
    let dir = cfg.state_dir()?;
    let ident = match WorkerIdentity::load(&dir) {
        Ok(i) => i,
        Err(EnrolmentError::NotJoined(_)) if cfg.join_token.is_some() => {
            let token = cfg.join_token.clone().unwrap_or_default();
            enrolment::join(&cfg, &token, false).await?
        }
        Err(e) => return Err(e.into()),
    };
    let id = ident.file.id.clone();
    let caps = capabilities::detect(&cfg.capabilities, &cfg.llm).await?;
    let reported = Arc::new(Reported {
        total_slots: cfg.capabilities.slots.unwrap_or(1).max(1),
        capabilities: RwLock::new(caps),
        version: AtomicU64::new(1),
        busy_slots: Arc::new(AtomicU32::new(0)),
        versions: cfg.protocol_versions,
    });
    let blobs =
        BlobStore::open(&dir.join("blobs")).map_err(|e| ServeError::Blobs(e.to_string()))?;
    let runner = TaskRunner::new(
        TaskEnv::new(blobs, dir.join("work"), cfg.llm.clone()),
        reported.busy_slots.clone(),
        cancel.child_token(),
    );

    let policy = Arc::new(OwnCoordinator {
        coordinator_id: ident.file.coordinator_id.clone(),
    });
    // Each connection gets its transport settings in `accept_loop`, from the route to its peer.
    let server_config = identity::worker_server_config(&ident.ca_pem, &ident.credentials, policy)?;
    let endpoint =
        transport::bind_endpoint(cfg.listen, Some(server_config.clone())).map_err(|source| {
            ServeError::Bind {
                addr: cfg.listen,
                source,
            }
        })?;
    let local = endpoint.local_addr().map_err(|source| ServeError::Bind {
        addr: cfg.listen,
        source,
    })?;

    let mdns = if cfg.mdns.enabled {
        let mdns = MdnsDiscovery::new(&cfg.mdns.to_config())?;
        mdns.advertise(&Advertisement {
            kind: ServiceKind::Worker,
            node_id: id.clone(),
            port: local.port(),
            versions: cfg.protocol_versions,
            ca_fingerprint: ident.file.ca_fingerprint.clone(),
        })?;
        Some(mdns)
    } else {
        None
    };

    let mut tasks = JoinSet::new();
    tasks.spawn(refresh_capabilities(
        cfg.clone(),
        reported.clone(),
        cancel.clone(),
    ));
    tasks.spawn(accept_loop(
        endpoint.clone(),
        server_config,
        id.clone(),
        cfg.lan_guard(),
        reported,
        runner.clone(),
        cancel.clone(),
    ));
    tracing::info!(worker = %id, listen = %local, coordinator = %ident.file.coordinator_id, mdns = cfg.mdns.enabled, "worker serving");

    cancel.cancelled().await;
    tracing::info!("shutting down");
    // Running tasks stop first (the coordinator re-queues them from its last checkpoint).
    runner.shutdown().await;
    while tasks.join_next().await.is_some() {}
    endpoint.close(transport::CLOSE_SHUTDOWN, b"worker shutting down");
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    if let Some(mdns) = mdns {
        mdns.shutdown().await;
    }
    Ok(())
}

async fn refresh_capabilities(
    cfg: WorkerConfig,
    reported: Arc<Reported>,
    cancel: CancellationToken,
) {
    let mut ticker = tokio::time::interval(cfg.capability_refresh);
    ticker.tick().await;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = ticker.tick() => {}
        }
        match capabilities::detect(&cfg.capabilities, &cfg.llm).await {
            Ok(mut fresh) => {
                let mut current = reported
                    .capabilities
                    .write()
                    .unwrap_or_else(|p| p.into_inner());
                // Available memory changes constantly and travels in every heartbeat's load;
                // only a change in what the machine can do counts as new capabilities.
                fresh.available_memory_bytes = current.available_memory_bytes;
                if *current != fresh {
                    tracing::info!("capabilities changed");
                    *current = fresh;
                    reported.version.fetch_add(1, Ordering::SeqCst);
                }
            }
            Err(e) => tracing::warn!(error = %e, "capability refresh failed"),
        }
    }
}

/// Keep-alive of connections from the coordinator.
const KEEP_ALIVE: Duration = Duration::from_secs(2);
/// Idle timeout of connections from the coordinator.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

async fn accept_loop(
    endpoint: quinn::Endpoint,
    server_config: quinn::ServerConfig,
    id: String,
    guard: LanGuard,
    reported: Arc<Reported>,
    runner: Arc<TaskRunner>,
    cancel: CancellationToken,
) {
    let mut conns = JoinSet::new();
    loop {
        let incoming = tokio::select! {
            _ = cancel.cancelled() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            incoming = endpoint.accept() => match incoming { Some(i) => i, None => break },
        };
        let remote = incoming.remote_address();
        if let Err(e) = guard.check(remote.ip()) {
            tracing::warn!(%remote, error = %e, "refused a connection from outside the LAN");
            incoming.refuse();
            continue;
        }
        let mut config = server_config.clone();
        config.transport_config(transport::transport_config(
            KEEP_ALIVE,
            IDLE_TIMEOUT,
            remote,
        ));
        let connecting = match incoming.accept_with(Arc::new(config)) {
            Ok(connecting) => connecting,
            Err(e) => {
                tracing::warn!(%remote, error = %e, "could not accept a connection");
                continue;
            }
        };
        let (id, reported, runner, cancel) = (
            id.clone(),
            reported.clone(),
            runner.clone(),
            cancel.child_token(),
        );
        conns.spawn(async move {
            let conn = match tokio::time::timeout(DEFAULT_FRAME_TIMEOUT, connecting).await {
                Ok(Ok(conn)) => conn,
                Ok(Err(e)) if is_tls_refusal(&e) => {
                    tracing::warn!(%remote, error = %e, "TLS handshake failed (not this cluster's coordinator?)");
                    return;
                }
                Ok(Err(e)) => {
                    // The dialler gave up (its dial timed out, it shut down) or the path failed:
                    // nothing about certificates, and the coordinator dials again.
                    tracing::info!(%remote, error = %e, "a connection ended before its handshake completed");
                    return;
                }
                Err(_) => return,
            };
            serve_coordinator(conn, id, reported, runner, cancel).await;
        });
    }
    conns.shutdown().await;
}

/// Whether a failed handshake was a TLS refusal, by this node or by the peer (a TLS alert, which
/// QUIC carries as a CRYPTO_ERROR code 0x100-0x1ff): a certificate from another cluster, a
/// revoked or unknown node.
fn is_tls_refusal(e: &quinn::ConnectionError) -> bool {
    let code = match e {
        quinn::ConnectionError::TransportError(t) => t.code,
        quinn::ConnectionError::ConnectionClosed(c) => c.error_code,
        _ => return false,
    };
    (0x100..0x200).contains(&u64::from(code))
}

async fn serve_coordinator(
    conn: quinn::Connection,
    id: String,
    reported: Arc<Reported>,
    runner: Arc<TaskRunner>,
    cancel: CancellationToken,
) {
    let remote = conn.remote_address();
    let Some(transport::AcceptedHello {
        hello,
        version,
        send,
    }) = transport::accept_and_negotiate(
        &conn,
        reported.versions,
        DEFAULT_FRAME_TIMEOUT,
        ragd_shared::codec::MAX_FRAME_LEN,
    )
    .await
    else {
        return;
    };
    if hello.role != Role::Coordinator {
        let refusal = Refusal {
            reason: RefusalReason::WrongRole {
                claimed: hello.role,
            },
            message: format!("a worker only serves its coordinator, not a {}", hello.role),
        };
        transport::close_refused(&conn, Some(send), refusal).await;
        return;
    }
    let caps = reported
        .capabilities
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let sent_version = Arc::new(AtomicU64::new(reported.version.load(Ordering::SeqCst)));
    let welcome = HelloReply::Welcome(Welcome {
        version,
        node_id: id.clone(),
        software: SOFTWARE_VERSION.to_string(),
        capabilities: Some(caps),
    });
    if transport::send_hello_reply(&conn, send, &welcome)
        .await
        .is_err()
    {
        return;
    }
    tracing::info!(%remote, coordinator = %hello.node_id, version, "coordinator connected");
    let intake_cancel = cancel.child_token();
    let blob_intake = tokio::spawn(blobs::accept_blobs(
        conn.clone(),
        runner.blobs().clone(),
        intake_cancel.clone(),
    ));
    let conn2 = conn.clone();
    // Blob pushes the coordinator asked for, each on its own stream: owned here and called off
    // (their streams reset as cancelled) when the connection's service ends.
    let pushes = TaskTracker::new();
    let pushes2 = (pushes.clone(), intake_cancel.clone());
    let handler = move |req: Request| {
        let (reported, sent_version) = (reported.clone(), sent_version.clone());
        let (runner, conn) = (runner.clone(), conn2.clone());
        let (pushes, push_cancel) = pushes2.clone();
        async move {
            match req {
                Request::Heartbeat(hb) => {
                    let current = reported.version.load(Ordering::SeqCst);
                    let changed = sent_version.swap(current, Ordering::SeqCst) != current;
                    let capabilities = (hb.want_capabilities || changed).then(|| {
                        reported
                            .capabilities
                            .read()
                            .unwrap_or_else(|p| p.into_inner())
                            .clone()
                    });
                    let load = capabilities::sample_load(
                        reported.busy_slots.load(Ordering::SeqCst),
                        reported.total_slots,
                    );
                    Response::Heartbeat(HeartbeatReply {
                        seq: hb.seq,
                        load,
                        capabilities,
                    })
                }
                Request::StartTask(start) => match start.task.check_id() {
                    // Task ids name directories on this worker: refuse any that could escape.
                    Ok(()) => Response::TaskAccepted(runner.start(*start)),
                    Err(problem) => Response::Error(ErrorReply {
                        code: ErrorCode::BadRequest,
                        message: problem,
                    }),
                },
                Request::PollTask(task) => {
                    let state = runner.poll_wait(&task, LONG_POLL).await;
                    Response::TaskStatus(TaskStatus { task, state })
                }
                Request::CancelTask(task) => {
                    let state = runner.cancel(&task);
                    Response::TaskStatus(TaskStatus { task, state })
                }
                Request::ForgetTask(task) => {
                    runner.forget(&task);
                    Response::Forgotten
                }
                // Only what the negotiated version has: a v2 coordinator never sends RunTask.
                Request::RunTask(_) if version < RUN_TASK_VERSION => Response::Error(ErrorReply {
                    code: ErrorCode::BadRequest,
                    message: format!(
                        "run-task needs protocol v{RUN_TASK_VERSION}; this connection speaks v{version}"
                    ),
                }),
                Request::RunTask(run) => {
                    let run = *run;
                    for done in &run.forget {
                        runner.forget(done);
                    }
                    match run.start.task.check_id() {
                        Ok(()) => {
                            let task = runner.start(run.start);
                            let state = runner.poll_wait(&task, LONG_POLL).await;
                            Response::TaskStatus(TaskStatus { task, state })
                        }
                        Err(problem) => Response::Error(ErrorReply {
                            code: ErrorCode::BadRequest,
                            message: problem,
                        }),
                    }
                }
                Request::QueryBlobs(q) => Response::BlobHoldings(runner.blobs().holdings(&q.blobs)),
                Request::FetchBlob(f) => {
                    fetch_blob(&conn, runner.blobs(), f, &pushes, push_cancel)
                }
                other => Response::Refused(Refusal {
                    reason: RefusalReason::WrongRole {
                        claimed: Role::Coordinator,
                    },
                    message: format!("a worker does not handle {} requests", other.kind()),
                }),
            }
        }
    };
    transport::serve_requests(conn, handler, DEFAULT_FRAME_TIMEOUT, cancel).await;
    intake_cancel.cancel();
    pushes.close();
    pushes.wait().await;
    let _ = blob_intake.await;
    tracing::info!(%remote, "coordinator connection ended");
}

/// Answers a fetch: checks the blob is here, then pushes it on its own stream in the background
/// (the coordinator waits for it to land in its store), as a task of `pushes` that stops when
/// `cancel` fires.
fn fetch_blob(
    conn: &quinn::Connection,
    store: &BlobStore,
    f: BlobFetch,
    pushes: &TaskTracker,
    cancel: CancellationToken,
) -> Response {
    let path = store.path(&f.blob);
    let len = match std::fs::metadata(&path) {
        Ok(m) if m.len() >= f.offset => m.len() - f.offset,
        Ok(_) => {
            return Response::Error(ErrorReply {
                code: ErrorCode::BadRequest,
                message: format!("offset {} is past the end of blob {}", f.offset, f.blob),
            })
        }
        Err(_) => {
            return Response::Error(ErrorReply {
                code: ErrorCode::BadRequest,
                message: format!("blob {} is not on this worker", f.blob),
            })
        }
    };
    let (conn, store) = (conn.clone(), store.clone());
    pushes.spawn(async move {
        tokio::select! {
            _ = cancel.cancelled() => {}
            pushed = store.push(&conn, &f.blob, f.offset) => if let Err(e) = pushed {
                tracing::warn!(blob = %f.blob, error = %e, "blob push to the coordinator failed");
            }
        }
    });
    Response::FetchStarted { len }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quinn::{ConnectionClose, ConnectionError, TransportErrorCode};

    fn closed_by_peer(code: TransportErrorCode) -> ConnectionError {
        ConnectionError::ConnectionClosed(ConnectionClose {
            error_code: code,
            frame_type: None,
            reason: bytes::Bytes::new(),
        })
    }

    #[test]
    fn only_tls_alerts_count_as_refusals() {
        // 42: bad_certificate, 48: unknown_ca (TLS alerts, as QUIC CRYPTO_ERRORs).
        assert!(is_tls_refusal(&closed_by_peer(TransportErrorCode::crypto(
            42
        ))));
        assert!(is_tls_refusal(&closed_by_peer(TransportErrorCode::crypto(
            48
        ))));
        // A dialler that closes before the handshake ends sends APPLICATION_ERROR.
        assert!(!is_tls_refusal(&closed_by_peer(
            TransportErrorCode::APPLICATION_ERROR
        )));
        assert!(!is_tls_refusal(&closed_by_peer(
            TransportErrorCode::PROTOCOL_VIOLATION
        )));
        assert!(!is_tls_refusal(&ConnectionError::TimedOut));
    }
}
