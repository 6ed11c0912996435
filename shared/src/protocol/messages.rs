//! Requests and responses exchanged after the handshake, one pair per bidirectional stream.
//!
//! Append new variants at the end only: the encoding is positional.

use super::capabilities::{Capabilities, Load};
use super::handshake::Refusal;
use super::jobs::{BlobFetch, BlobHoldings, BlobQuery, TaskRef, TaskRun, TaskStart, TaskStatus};
use serde::{Deserialize, Serialize};
use std::fmt;

/// A request; the other side answers with exactly one [`Response`] on the same stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Request {
    /// Coordinator -> worker: are you alive, and how loaded are you?
    Heartbeat(HeartbeatRequest),
    /// Enrolling worker -> coordinator: sign my certificate request.
    Enrol(EnrolRequest),
    /// Coordinator -> worker: start a task (answered `TaskAccepted` or `Error`).
    StartTask(Box<TaskStart>),
    /// Coordinator -> worker: how is this task attempt doing? (answered `TaskStatus`)
    PollTask(TaskRef),
    /// Coordinator -> worker: stop this task attempt (answered `TaskStatus`).
    CancelTask(TaskRef),
    /// Which of these blobs do you hold? (answered `BlobHoldings`)
    QueryBlobs(BlobQuery),
    /// Coordinator -> worker: push this blob to me on a unidirectional stream (answered
    /// `FetchStarted` once the stream is open).
    FetchBlob(BlobFetch),
    /// Coordinator -> worker: forget this task's result (it is committed).
    ForgetTask(TaskRef),
    /// Coordinator -> worker (v3): forget committed results, start a task and long-poll it in
    /// one round trip (answered `TaskStatus`, or `Error` for a bad task id).
    RunTask(Box<TaskRun>),
}

/// The answer to a [`Request`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Response {
    /// Answer to [`Request::Heartbeat`].
    Heartbeat(HeartbeatReply),
    /// Answer to [`Request::Enrol`]: the signed certificate.
    Enrolled(EnrolReply),
    /// The request was understood but refused (not allowed, bad token, ...).
    Refused(Refusal),
    /// The request failed on the answering side.
    Error(ErrorReply),
    /// Answer to `StartTask`: the task runs (or already ran) under this reference.
    TaskAccepted(TaskRef),
    /// Answer to `PollTask` and `CancelTask`.
    TaskStatus(TaskStatus),
    /// Answer to `QueryBlobs`.
    BlobHoldings(BlobHoldings),
    /// Answer to `FetchBlob`: the blob is on its way, `len` bytes from the requested offset.
    FetchStarted {
        /// Bytes that will follow on the stream.
        len: u64,
    },
    /// Answer to `ForgetTask`.
    Forgotten,
}

/// Liveness probe; carries a sequence number so replies can be matched and delays measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatRequest {
    /// Increases by one per heartbeat on a connection.
    pub seq: u64,
    /// Whether the worker should include its full capabilities in the reply.
    pub want_capabilities: bool,
}

/// A worker's answer to a heartbeat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeartbeatReply {
    /// The request's sequence number.
    pub seq: u64,
    /// Current load of the worker.
    pub load: Load,
    /// Fresh capabilities when asked for or when they changed since the last reply.
    pub capabilities: Option<Capabilities>,
}

/// Enrolment: a worker proves it holds the cluster's join secret and asks for a certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrolRequest {
    /// The id the worker wants to be known by.
    pub worker_id: String,
    /// PEM certificate signing request for the worker's own key (the key never leaves the worker).
    pub csr_pem: String,
    /// HMAC-SHA256 keyed by the join secret over this TLS session's exported keying material,
    /// the worker id and the CSR: proves knowledge of the secret without sending it.
    pub proof: Vec<u8>,
}

/// The coordinator's answer to a successful enrolment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrolReply {
    /// The worker's certificate, signed by the cluster CA (PEM).
    pub worker_cert_pem: String,
    /// The cluster CA certificate (PEM), which the worker pins from now on.
    pub ca_cert_pem: String,
    /// The coordinator's node id.
    pub coordinator_id: String,
}

/// Error categories, so a caller can decide whether to retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// The request is not valid (retrying it unchanged will fail again).
    BadRequest,
    /// The request is valid but this node does not handle it.
    Unsupported,
    /// Something failed on the answering side; a retry may succeed.
    Internal,
}

/// An error answer with a message meant for a person.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    /// Category.
    pub code: ErrorCode,
    /// What went wrong and what to do.
    pub message: String,
}

impl fmt::Display for ErrorReply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.code, self.message)
    }
}

impl Request {
    /// A short name for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Request::Heartbeat(_) => "heartbeat",
            Request::Enrol(_) => "enrol",
            Request::StartTask(_) => "start-task",
            Request::PollTask(_) => "poll-task",
            Request::CancelTask(_) => "cancel-task",
            Request::QueryBlobs(_) => "query-blobs",
            Request::FetchBlob(_) => "fetch-blob",
            Request::ForgetTask(_) => "forget-task",
            Request::RunTask(_) => "run-task",
        }
    }
}
