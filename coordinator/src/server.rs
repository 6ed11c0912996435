//! The coordinator's listening side: enrolment of new workers.
//!
//! A worker without a certificate dials here, pins the cluster CA by the fingerprint in its join
//! token, says Hello as an `Enrollee`, and sends an [`EnrolRequest`] proving it knows the join
//! secret (an HMAC over this TLS session's exported keying material, so the secret never travels
//! and a proof cannot be replayed on another connection). The coordinator signs its CSR.

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
use ragd_shared::transport::{self, DEFAULT_FRAME_TIMEOUT};
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// How long an enrolment connection may stay open.
const ENROLMENT_WINDOW: Duration = Duration::from_secs(30);

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
}

impl EnrolmentService {
    /// Accepts connections until `cancel` fires; each is handled in an owned task.
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
                tracing::warn!(%remote, error = %e, "refused a connection from outside the LAN");
                incoming.refuse();
                continue;
            }
            let this = self.clone();
            let cancel = cancel.child_token();
            conns.spawn(async move {
                let conn = match tokio::time::timeout(DEFAULT_FRAME_TIMEOUT, incoming).await {
                    Ok(Ok(conn)) => conn,
                    Ok(Err(e)) => {
                        tracing::warn!(%remote, error = %e, "TLS handshake with a peer failed");
                        return;
                    }
                    Err(_) => return,
                };
                let _ =
                    tokio::time::timeout(ENROLMENT_WINDOW, this.handle(conn.clone(), cancel)).await;
                conn.close(transport::CLOSE_SHUTDOWN, b"enrolment window over");
            });
        }
        conns.shutdown().await;
    }

    async fn handle(self: Arc<Self>, conn: quinn::Connection, cancel: CancellationToken) {
        let remote = conn.remote_address();
        let Some(transport::AcceptedHello {
            hello,
            version,
            send,
        }) = transport::accept_and_negotiate(&conn, DEFAULT_FRAME_TIMEOUT).await
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
            tracing::warn!(%remote, role = %hello.role, "refused a peer on the enrolment endpoint");
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
        let this = self.clone();
        let handler_conn = conn.clone();
        transport::serve_requests(
            conn,
            move |req| {
                let this = this.clone();
                let conn = handler_conn.clone();
                async move {
                    match req {
                        Request::Enrol(req) => this.enrol(&conn, req),
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
                }
            },
            DEFAULT_FRAME_TIMEOUT,
            cancel,
        )
        .await;
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
            tracing::warn!(%remote, worker = %req.worker_id, "enrolment with a wrong or rotated join token");
            return Response::Refused(Refusal {
                reason: RefusalReason::BadJoinToken,
                message: "the join token's secret is wrong or was rotated: get the current token with `ragd-coord token show` on the coordinator".into(),
            });
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
        if let Err(e) = self.store.enrol(&req.worker_id, &fingerprint) {
            return internal(e);
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
