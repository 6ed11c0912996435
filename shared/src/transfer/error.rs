//! Why a transfer failed, with messages that say what to do.

use super::{
    RESET_CANCELLED, RESET_SOURCE_SHORT, STOP_ALREADY_HELD, STOP_BAD_HEADER, STOP_NOT_EXPECTED,
    STOP_NO_SPACE, STOP_SINK_FAILED, STOP_TOO_LARGE,
};
use crate::codec::CodecError;
use quinn::VarInt;
use std::path::PathBuf;

/// Why a transfer failed.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// The header frame could not be encoded, read or decoded.
    #[error("transfer header: {0}")]
    Header(#[source] CodecError),
    /// The stream ended before a header arrived.
    #[error("the transfer stream ended before its header; the peer gave up or is not a ragd node")]
    NoHeader,
    /// The header is well formed but not acceptable.
    #[error("invalid transfer header: {reason}")]
    BadHeader {
        /// What is wrong with it.
        reason: String,
    },
    /// The transfer is larger than the receiver accepts.
    #[error(
        "transfer {name:?} is {len} bytes, above the {max}-byte limit of this receiver; \
         raise the limit in the configuration or send a smaller file"
    )]
    TooLarge {
        /// Transfer name.
        name: String,
        /// Announced length.
        len: u64,
        /// Receiver's limit.
        max: u64,
    },
    /// The stream ended before all announced bytes arrived.
    #[error(
        "transfer {name:?} ended after {received} of {expected} bytes; the sender stopped or \
         the connection dropped: retry the transfer"
    )]
    Truncated {
        /// Transfer name.
        name: String,
        /// Announced length.
        expected: u64,
        /// Bytes that arrived.
        received: u64,
    },
    /// More bytes arrived than the header announced.
    #[error(
        "transfer {name:?} carried more than the {expected} bytes its header announced; the \
         sender is buggy or not a ragd node"
    )]
    TrailingData {
        /// Transfer name.
        name: String,
        /// Announced length.
        expected: u64,
    },
    /// The body's BLAKE3 hash differs from the header's. Never ignored.
    #[error(
        "transfer {name:?} is corrupt: BLAKE3 {} expected, {} received; the data was discarded, \
         retry the transfer (if it repeats, the file changed on the sender while it was sent)",
        hex(.expected), hex(.actual)
    )]
    HashMismatch {
        /// Transfer name.
        name: String,
        /// Hash announced in the header.
        expected: [u8; 32],
        /// Hash of the bytes received.
        actual: [u8; 32],
    },
    /// The sender's source ended before the announced length.
    #[error(
        "source of transfer {name:?} ended after {got} of {expected} bytes; the file shrank \
         while being sent: retry"
    )]
    SourceShort {
        /// Transfer name.
        name: String,
        /// Announced length.
        expected: u64,
        /// Bytes the source gave.
        got: u64,
    },
    /// Reading the local source failed.
    #[error("reading the data to send failed: {0}")]
    Source(#[source] std::io::Error),
    /// Writing the received data locally failed.
    #[error("writing the received data failed (disk full or not writable?): {0}")]
    Sink(#[source] std::io::Error),
    /// A local file could not be opened, created, synced or renamed.
    #[error("{action} {path}: {source}")]
    File {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The receiver stopped the stream.
    #[error("the receiver stopped the transfer (code {code:#x}): {}", stop_reason(*.code))]
    StoppedByPeer {
        /// The stop code (see the `STOP_*` constants).
        code: u64,
    },
    /// Writing to the QUIC stream failed.
    #[error("sending on the transfer stream failed: {0}")]
    Write(#[source] quinn::WriteError),
    /// Reading from the QUIC stream failed (connection lost, stream reset by the sender).
    #[error("receiving on the transfer stream failed: {0}")]
    Read(#[source] quinn::ReadError),
    /// The sender reset the stream: it gave up on the transfer and says why.
    #[error("the sender abandoned the transfer (code {code:#x}): {}", reset_reason(*.code))]
    ResetBySender {
        /// The sender's reset code.
        code: u64,
    },
    /// The connection was lost before the peer acknowledged all data.
    #[error("the connection dropped before the receiver acknowledged the data: {0}")]
    NotAcknowledged(#[from] quinn::StoppedError),
    /// The stream was already finished or reset by this side.
    #[error("the transfer stream was already closed by this node; this is a bug in the caller")]
    AlreadyClosed(#[from] quinn::ClosedStream),
}

impl From<quinn::WriteError> for TransferError {
    fn from(e: quinn::WriteError) -> Self {
        match e {
            quinn::WriteError::Stopped(code) => TransferError::StoppedByPeer {
                code: code.into_inner(),
            },
            other => TransferError::Write(other),
        }
    }
}

impl From<quinn::ReadError> for TransferError {
    fn from(e: quinn::ReadError) -> Self {
        match e {
            quinn::ReadError::Reset(code) => TransferError::ResetBySender {
                code: code.into_inner(),
            },
            other => TransferError::Read(other),
        }
    }
}

impl TransferError {
    /// Whether the sender called the transfer off on purpose (its task was cancelled: the job
    /// ended, was cancelled or moved on), which is no fault of either side.
    pub fn is_cancelled_by_sender(&self) -> bool {
        matches!(self, TransferError::ResetBySender { code } if *code == RESET_CANCELLED.into_inner())
    }
}

pub(super) fn reset_reason(code: u64) -> &'static str {
    match VarInt::from_u64(code) {
        Ok(RESET_CANCELLED) => {
            "its task was cancelled (the job ended, was cancelled or moved on); nothing to do"
        }
        Ok(RESET_SOURCE_SHORT) => "its file shrank while being sent; retry the transfer",
        _ => "unknown reason; check the sender's log",
    }
}

pub(super) fn stop_reason(code: u64) -> &'static str {
    match VarInt::from_u64(code) {
        Ok(STOP_TOO_LARGE) => "the transfer is larger than the receiver accepts",
        Ok(STOP_BAD_HEADER) => "the receiver refused the transfer header or framing",
        Ok(STOP_SINK_FAILED) => "the receiver could not store the data (disk full?)",
        Ok(STOP_NOT_EXPECTED) => "the receiver did not ask for this data, or not of this size",
        Ok(STOP_ALREADY_HELD) => "the receiver holds this data already",
        Ok(STOP_NO_SPACE) => "the receiver has not enough free disk space for it",
        _ => "unknown reason; check the receiver's log",
    }
}

fn hex(bytes: &[u8; 32]) -> String {
    data_encoding::HEXLOWER.encode(bytes)
}
