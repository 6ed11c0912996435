//! The coordinator's listening side: enrolment of new workers.
//!
//! A worker without a certificate dials here, pins the cluster CA by the fingerprint in its join
//! token, says Hello as an `Enrollee`, and sends an [`EnrolRequest`] proving it knows the join
//! secret (an HMAC over this TLS session's exported keying material, so the secret never travels
//! and a proof cannot be replayed on another connection). The coordinator signs its CSR.
//!
//! Such a peer has proved nothing yet, so what it may cost is bounded: [`Admission`] caps the
//! connections (overall, per source) and throttles sources that send wrong proofs; the endpoint's
//! transport settings allow two small streams and no unidirectional ones
//! ([`transport::enrolment_transport_config`]); the TLS handshake must finish within
//! [`HANDSHAKE_DEADLINE`] and the enrolment within [`ENROLMENT_WINDOW`]; frames are at most
//! [`ENROLMENT_MAX_FRAME`] bytes; one enrolment request per connection.

use crate::admission::{Admission, Permit};
use crate::pki::CoordinatorPki;
use crate::policy::EnrolledWorkers;
use crate::registry::Registry;
use crate::store::Store;
use ragd_shared::identity;
use ragd_shared::netguard::LanGuard;
use ragd_shared::protocol::handshake::{HelloReply, Refusal, RefusalReason, Role, Welcome};
use ragd_shared::protocol::messages::{
    EnrolReply, EnrolRequest, ErrorCode, ErrorReply, Request, Response,
};
use ragd_shared::protocol::SOFTWARE_VERSION;
use ragd_shared::transport::{self, ENROLMENT_MAX_FRAME};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// How long the TLS handshake of an enrolling peer may take.
pub const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(5);
/// How long an enrolment connection may stay open after its handshake.
pub const ENROLMENT_WINDOW: Duration = Duration::from_secs(10);
/// How long an enrolling peer may take to send one frame.
const FRAME_DEADLINE: Duration = Duration::from_secs(5);

/// What the accept loop needs.
pub struct EnrolmentService {
    /// The cluster's PKI (CA key to sign CSRs).
    pub pki: Arc<CoordinatorPki>,
    /// Durable state.
    pub store: Arc<Store>,
    /// The TLS policy to update on enrolment.
    pub policy: Arc<EnrolledWorkers>,
    /// The live registry.
    pub registry: Arc<Registry>,
    /// LAN-only guard.
    pub guard: LanGuard,
    /// This coordinator's id.
    pub coordinator_id: String,
    /// The budget of peers without a certificate.
    pub admission: Arc<Admission>,
}

impl EnrolmentService {
    /// Accepts connections until `cancel` fires; each admitted one is handled in an owned task.
    pub async fn run(self: Arc<Self>, endpoint: quinn::Endpoint, cancel: CancellationToken) {
        let mut conns = JoinSet::new();
        loop {
            let incoming = tokio::select! {
                _ = cancel.cancelled() => break,
                Some(_) = conns.join_next(), if !conns.is_empty() => continue,
                incoming = endpoint.accept() => match incoming { Some(i) => i, None => break },
            };
            let remote = incoming.remote_address();
            if let Err(e) = self.guard.check(remote.ip()) {
                self.log_refusal(remote, &e);
                incoming.refuse();
                continue;
            }
            let permit = match self.admission.admit(remote.ip(), Instant::now()) {
                Ok(permit) => permit,
                Err(refused) => {
                    self.log_refusal(remote, &refused);
                    incoming.refuse();
                    continue;
                }
            };
            let this = self.clone();
            let cancel = cancel.child_token();
            conns.spawn(async move { this.connection(incoming, permit, cancel).await });
        }
        conns.shutdown().await;
    }

    /// One admitted connection, from handshake to close, within the deadlines.
    async fn connection(
        self: Arc<Self>,
        incoming: quinn::Incoming,
        _permit: Permit,
        cancel: CancellationToken,
    ) {
        let remote = incoming.remote_address();
        let conn = match tokio::time::timeout(HANDSHAKE_DEADLINE, async { incoming.await }).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => {
                self.log_refusal(remote, &format!("TLS handshake failed: {e}"));
                return;
            }
            Err(_) => return,
        };
        tokio::select! {
            _ = cancel.cancelled() => {}
            _ = tokio::time::timeout(ENROLMENT_WINDOW, self.handle(conn.clone())) => {}
        }
        conn.close(transport::CLOSE_SHUTDOWN, b"enrolment connection done");
    }

    /// Logs a refused or failed peer, at most once per source per interval.
    fn log_refusal(&self, remote: SocketAddr, why: &dyn std::fmt::Display) {
        if let Some(suppressed) = self.admission.log_refusal(remote.ip(), Instant::now()) {
            tracing::warn!(%remote, reason = %why, suppressed, "refused an enrolment peer");
        }
    }

    async fn handle(self: Arc<Self>, conn: quinn::Connection) {
        let remote = conn.remote_address();
        let Some(transport::AcceptedHello {
            hello,
            version,
            send,
        }) = transport::accept_and_negotiate(
            &conn,
            ragd_shared::protocol::SUPPORTED_VERSIONS,
            FRAME_DEADLINE,
            ENROLMENT_MAX_FRAME,
        )
        .await
        else {
            return;
        };
        if hello.role != Role::Enrollee {
            let message = if identity::peer_identity(&conn).is_none() {
                format!(
                    "a {} must present a cluster certificate; this client presented none. Enrol it with `ragd-worker join TOKEN`",
                    hello.role
                )
            } else {
                format!(
                    "this coordinator endpoint only enrols workers; a {} does not dial it (the coordinator dials workers)",
                    hello.role
                )
            };
            self.log_refusal(
                remote,
                &format!("a {} dialled the enrolment endpoint", hello.role),
            );
            let refusal = Refusal {
                reason: RefusalReason::WrongRole {
                    claimed: hello.role,
                },
                message,
            };
            transport::close_refused(&conn, Some(send), refusal).await;
            return;
        }
        let welcome = HelloReply::Welcome(Welcome {
            version,
            node_id: self.coordinator_id.clone(),
            software: SOFTWARE_VERSION.to_string(),
            capabilities: None,
        });
        if transport::send_hello_reply(&conn, send, &welcome)
            .await
            .is_err()
        {
            return;
        }
        let served = transport::serve_one_request(
            &conn,
            |req| async {
                match req {
                    Request::Enrol(req) => self.enrol(&conn, req),
                    other => Response::Refused(Refusal {
                        reason: RefusalReason::WrongRole {
                            claimed: Role::Enrollee,
                        },
                        message: format!(
                            "an enrolling worker may only enrol, not send {}",
                            other.kind()
                        ),
                    }),
                }
            },
            FRAME_DEADLINE,
            ENROLMENT_MAX_FRAME,
        )
        .await;
        if let Err(e) = served {
            self.log_refusal(remote, &e);
        }
    }

    fn enrol(&self, conn: &quinn::Connection, req: EnrolRequest) -> Response {
        let remote = conn.remote_address();
        if let Err(e) = identity::validate_node_id(&req.worker_id) {
            return Response::Refused(Refusal {
                reason: RefusalReason::Malformed,
                message: e.to_string(),
            });
        }
        let secret = match self.store.join_secret() {
            Ok(s) => s,
            Err(e) => return internal(e),
        };
        let mut ekm = [0u8; identity::EKM_LEN];
        if conn
            .export_keying_material(&mut ekm, identity::EKM_LABEL, req.worker_id.as_bytes())
            .is_err()
        {
            return internal("could not export TLS keying material");
        }
        if !identity::verify_enrolment_proof(
            &secret,
            &ekm,
            &req.worker_id,
            &req.csr_pem,
            &req.proof,
        ) {
            self.admission
                .record_failed_proof(remote.ip(), Instant::now());
            self.log_refusal(
                remote,
                &format!("wrong or rotated join token for {:?}", req.worker_id),
            );
            return Response::Refused(Refusal {
                reason: RefusalReason::BadJoinToken,
                message: "the join token's secret is wrong or was rotated: get the current token with `ragd-coord token show` on the coordinator".into(),
            });
        }
        let already = |e: &dyn std::fmt::Display| {
            Response::Refused(Refusal {
                reason: RefusalReason::AlreadyEnrolled,
                message: e.to_string(),
            })
        };
        match self.store.is_enrolled(&req.worker_id) {
            Ok(true) => {
                return already(&crate::store::StoreError::AlreadyEnrolled(
                    req.worker_id.clone(),
                ))
            }
            Ok(false) => {}
            Err(e) => return internal(e),
        }
        let cert_pem = match self.pki.ca.sign_worker_csr(&req.csr_pem, &req.worker_id) {
            Ok(c) => c,
            Err(e) => {
                return Response::Error(ErrorReply {
                    code: ErrorCode::BadRequest,
                    message: e.to_string(),
                })
            }
        };
        let fingerprint = match identity::pem_fingerprint(&cert_pem) {
            Some(fp) => fp,
            None => return internal("signed certificate could not be read back"),
        };
        match self.store.enrol(&req.worker_id, &fingerprint) {
            Ok(()) => {}
            Err(e @ crate::store::StoreError::AlreadyEnrolled(_)) => return already(&e),
            Err(e) => return internal(e),
        }
        self.policy.allow(&req.worker_id, fingerprint);
        self.registry.insert_enrolled(&req.worker_id, false);
        tracing::info!(%remote, worker = %req.worker_id, "worker enrolled");
        Response::Enrolled(EnrolReply {
            worker_cert_pem: cert_pem,
            ca_cert_pem: self.pki.ca.cert_pem().to_string(),
            coordinator_id: self.coordinator_id.clone(),
        })
    }
}

fn internal(e: impl std::fmt::Display) -> Response {
    tracing::error!(error = %e, "enrolment failed");
    Response::Error(ErrorReply {
        code: ErrorCode::Internal,
        message: format!("enrolment failed on the coordinator: {e}"),
    })
}
