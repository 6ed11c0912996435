//! Bulk transfers (datasets, models) on QUIC unidirectional streams, verified with BLAKE3.
//!
//! Layout of a transfer stream: one [`TransferHeader`] frame (see [`crate::codec`]), then exactly
//! `total_len` body bytes, then the end of the stream. The receiver streams the body into any
//! writer while hashing it, refuses bodies above a size it chooses (stopping the stream with
//! [`STOP_TOO_LARGE`] before reading any body byte), and only returns `Ok` when the length and
//! the BLAKE3 hash both match the header. On error the writer holds unverified bytes:
//! [`receive_file`] handles that by writing to a temporary file renamed only on success.
//!
//! Cancellation: every function here is a plain future; dropping it abandons the transfer. Bound
//! it with a timeout or a `CancellationToken` where a stalled peer matters (QUIC's idle timeout
//! only fires when the connection is silent, not when a peer stops reading).

use crate::codec;
use bytes::{BufMut, BytesMut};
use quinn::{IdleTimeout, MtuDiscoveryConfig, RecvStream, SendStream, TransportConfig, VarInt};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

mod error;
pub use error::TransferError;

/// Size of the body chunks read from the source and written to the sink (1 MiB).
pub const CHUNK_LEN: usize = 1024 * 1024;
/// Longest transfer name accepted, in bytes.
pub const MAX_NAME_LEN: usize = 4096;
/// Largest `chunk_len` a header may announce (the receiver uses its own chunking regardless).
pub const MAX_CHUNK_LEN: u32 = 64 * 1024 * 1024;

/// Stop code sent by a receiver whose size limit the transfer exceeds.
pub const STOP_TOO_LARGE: VarInt = VarInt::from_u32(0x7201);
/// Stop code sent by a receiver that could not read or accept the header.
pub const STOP_BAD_HEADER: VarInt = VarInt::from_u32(0x7202);
/// Stop code sent by a receiver whose local writer failed.
pub const STOP_SINK_FAILED: VarInt = VarInt::from_u32(0x7203);
/// Stop code sent by a receiver that did not ask for this transfer (or not of this size).
pub const STOP_NOT_EXPECTED: VarInt = VarInt::from_u32(0x7205);
/// Stop code sent by a receiver that holds the blob already (the sender's work is done).
pub const STOP_ALREADY_HELD: VarInt = VarInt::from_u32(0x7207);
/// Stop code sent by a receiver without the disk space for the transfer.
pub const STOP_NO_SPACE: VarInt = VarInt::from_u32(0x7206);
/// Reset code sent by a sender whose source ended before the announced length.
pub const RESET_SOURCE_SHORT: VarInt = VarInt::from_u32(0x7204);
/// Reset code sent when a sender is dropped before the whole body was handed to quinn (its task
/// was cancelled). Without it quinn would end the stream cleanly on drop, and the receiver could
/// only say that the transfer came out short.
pub const RESET_CANCELLED: VarInt = VarInt::from_u32(0x7208);

/// Stream receive window of [`bulk_transport_config`] (64 MiB).
pub const STREAM_RECEIVE_WINDOW: u32 = 64 * 1024 * 1024;
/// Connection receive window of [`bulk_transport_config`] (128 MiB).
pub const CONNECTION_RECEIVE_WINDOW: u32 = 128 * 1024 * 1024;
/// Send window of [`bulk_transport_config`] (128 MiB).
pub const SEND_WINDOW: u64 = 128 * 1024 * 1024;

/// First frame of a transfer stream: what follows and how to check it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferHeader {
    /// Random id chosen by the sender, for logs and for matching the transfer to a request.
    pub transfer_id: u64,
    /// What is being sent (a file name or dataset/model name), at most [`MAX_NAME_LEN`] bytes.
    pub name: String,
    /// Exact number of body bytes that follow the header.
    pub total_len: u64,
    /// Size of the sender's writes (informational).
    pub chunk_len: u32,
    /// BLAKE3 hash of the whole body.
    pub blake3: [u8; 32],
}

/// What a finished transfer moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransferStats {
    /// The transfer's id (from its header).
    pub transfer_id: u64,
    /// Body bytes sent or received.
    pub bytes: u64,
    /// Time from the header to the end of the body (for a sender: until the peer acknowledged).
    pub elapsed: Duration,
    /// BLAKE3 hash of the body (verified by a receiver; as announced by a sender).
    pub hash: [u8; 32],
}

impl TransferStats {
    /// Throughput in megabytes (10^6 bytes) per second.
    pub fn mb_per_s(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Transport settings for connections that carry bulk transfers: 64 MiB stream / 128 MiB
/// connection receive windows and a 128 MiB send window (measured ~10% faster than quinn's
/// defaults on loopback), path MTU discovery up to `max_udp_payload` bytes per packet (at most
/// [`crate::path_mtu::MAX_UDP_PAYLOAD`]; pass [`crate::path_mtu::max_udp_payload_to`] the peer),
/// plus keep-alive and idle timeout. Packets above [`crate::path_mtu::GSO_UDP_PAYLOAD`] go one
/// per write: segmentation offload is off, as ten of them would not fit one offload write.
/// `keep_alive` should be well below `idle_timeout`, or an idle but healthy connection will
/// time out.
pub fn bulk_transport_config(
    keep_alive: Duration,
    idle_timeout: Duration,
    max_udp_payload: u16,
) -> TransportConfig {
    if keep_alive >= idle_timeout {
        tracing::warn!(
            keep_alive_ms = keep_alive.as_millis() as u64,
            idle_timeout_ms = idle_timeout.as_millis() as u64,
            "QUIC keep-alive is not below the idle timeout: idle connections will drop"
        );
    }
    let idle = IdleTimeout::try_from(idle_timeout).unwrap_or_else(|_| VarInt::MAX.into());
    let mut config = TransportConfig::default();
    config
        .stream_receive_window(VarInt::from_u32(STREAM_RECEIVE_WINDOW))
        .receive_window(VarInt::from_u32(CONNECTION_RECEIVE_WINDOW))
        .send_window(SEND_WINDOW)
        .keep_alive_interval(Some(keep_alive))
        .max_idle_timeout(Some(idle));
    let mut mtu = MtuDiscoveryConfig::default();
    mtu.upper_bound(max_udp_payload.min(crate::path_mtu::MAX_UDP_PAYLOAD));
    config.mtu_discovery_config(Some(mtu));
    if max_udp_payload > crate::path_mtu::GSO_UDP_PAYLOAD {
        config.enable_segmentation_offload(false);
    }
    config
}

/// Sends `len` bytes from `reader` as a transfer named `name`, whose BLAKE3 hash is `hash`.
///
/// Finishes the stream and waits until the receiver has acknowledged every byte (or stopped the
/// stream, which gives [`TransferError::StoppedByPeer`]). A source shorter than `len` resets the
/// stream and fails; bytes beyond `len` are not read. Use [`send_file`] when the hash is not
/// known yet.
pub async fn send_blob<R: AsyncRead + Unpin>(
    stream: &mut SendStream,
    name: &str,
    len: u64,
    mut reader: R,
    hash: [u8; 32],
) -> Result<TransferStats, TransferError> {
    check_name(name)?;
    let mut stream = ResetIfDropped {
        stream,
        finished: false,
    };
    let header = TransferHeader {
        transfer_id: rand::random(),
        name: name.to_owned(),
        total_len: len,
        chunk_len: CHUNK_LEN as u32,
        blake3: hash,
    };
    let start = Instant::now();
    let frame = codec::encode_frame(&header).map_err(TransferError::Header)?;
    stream.write_all(&frame).await?;
    let mut sent = 0u64;
    while sent < len {
        // Each chunk is read into its own buffer and handed to quinn as is: quinn keeps it until
        // the peer acknowledges it and builds packets straight from it (no copy into a send
        // buffer, as `write_all` makes).
        let want = chunk_len_for(len - sent, CHUNK_LEN);
        let mut chunk = BytesMut::with_capacity(want);
        let got = fill(&mut reader, &mut chunk, want)
            .await
            .map_err(TransferError::Source)?;
        if got < want {
            // Harmless if the stream is already closed: the error below is what matters.
            let _ = stream.reset(RESET_SOURCE_SHORT);
            return Err(TransferError::SourceShort {
                name: name.to_owned(),
                expected: len,
                got: sent + got as u64,
            });
        }
        stream.write_chunk(chunk.freeze()).await?;
        sent += want as u64;
    }
    stream.finish()?;
    // Every byte and the end of the stream are quinn's now: dropping from here on (while waiting
    // for the acknowledgement) must not reset what the receiver is about to complete.
    stream.finished = true;
    if let Some(code) = stream.stopped().await? {
        return Err(TransferError::StoppedByPeer {
            code: code.into_inner(),
        });
    }
    let stats = TransferStats {
        transfer_id: header.transfer_id,
        bytes: sent,
        elapsed: start.elapsed(),
        hash,
    };
    tracing::debug!(
        transfer_id = stats.transfer_id,
        name,
        bytes = stats.bytes,
        elapsed_ms = stats.elapsed.as_millis() as u64,
        "transfer sent"
    );
    Ok(stats)
}

/// A sender's stream, reset with [`RESET_CANCELLED`] when dropped before `finished`.
struct ResetIfDropped<'a> {
    stream: &'a mut SendStream,
    /// Set once the stream is finished: the transfer is quinn's to complete.
    finished: bool,
}

impl std::ops::Deref for ResetIfDropped<'_> {
    type Target = SendStream;
    fn deref(&self) -> &SendStream {
        self.stream
    }
}

impl std::ops::DerefMut for ResetIfDropped<'_> {
    fn deref_mut(&mut self) -> &mut SendStream {
        self.stream
    }
}

impl Drop for ResetIfDropped<'_> {
    fn drop(&mut self) {
        if !self.finished {
            // Fails harmlessly where the stream is already reset or stopped.
            let _ = self.stream.reset(RESET_CANCELLED);
        }
    }
}

/// Hashes the file at `path` with BLAKE3, then sends it as a transfer named `name`.
pub async fn send_file(
    stream: &mut SendStream,
    path: &Path,
    name: &str,
) -> Result<TransferStats, TransferError> {
    let (hash, len) = hash_file(path).await?;
    let file = tokio::fs::File::open(path)
        .await
        .map_err(|source| file_error("cannot open", path, source))?;
    send_blob(stream, name, len, file, hash).await
}

/// BLAKE3 hash and length of a file, computed off the async runtime.
pub async fn hash_file(path: &Path) -> Result<([u8; 32], u64), TransferError> {
    let owned = path.to_owned();
    let hashed = tokio::task::spawn_blocking(move || -> std::io::Result<([u8; 32], u64)> {
        let file = std::fs::File::open(&owned)?;
        let mut hasher = blake3::Hasher::new();
        hasher.update_reader(std::io::BufReader::with_capacity(CHUNK_LEN, file))?;
        Ok((*hasher.finalize().as_bytes(), hasher.count()))
    })
    .await
    .map_err(|join| file_error("hashing was interrupted for", path, join.into()))?;
    hashed.map_err(|source| file_error("cannot hash", path, source))
}

/// Receives one transfer into `writer`, verifying its length and BLAKE3 hash.
///
/// Refuses (and stops the stream for) transfers above `max_len` bytes before reading their body.
/// Returns `Ok` only when exactly `total_len` bytes arrived, the stream ended right after them
/// and the hash matched; on any error the writer may hold partial or corrupt data.
pub async fn receive_blob<W: AsyncWrite + Unpin>(
    stream: &mut RecvStream,
    max_len: u64,
    writer: W,
) -> Result<(TransferHeader, TransferStats), TransferError> {
    let header = read_header(stream).await?;
    receive_body(stream, header, max_len, writer).await
}

/// Reads and checks a transfer's header, the first half of [`receive_blob`]: a receiver that
/// decides from the header whether it wants the body (by its name or length) reads it here,
/// then calls [`receive_body`] or stops the stream. A bad header stops the stream.
pub async fn read_header(stream: &mut RecvStream) -> Result<TransferHeader, TransferError> {
    let header: TransferHeader = match codec::read_frame(stream).await {
        Ok(Some(header)) => header,
        Ok(None) => return Err(TransferError::NoHeader),
        Err(e) => {
            // A sender reset before its header arrived whole: its reason, as for the body.
            if let Some(reset) = sender_reset(&e) {
                return Err(reset.into());
            }
            let _ = stream.stop(STOP_BAD_HEADER);
            return Err(TransferError::Header(e));
        }
    };
    if let Err(e) = validate_header(&header) {
        let _ = stream.stop(STOP_BAD_HEADER);
        return Err(e);
    }
    Ok(header)
}

/// The sender's reset behind a codec error on a quinn stream (read through `AsyncRead`, which
/// wraps quinn's `ReadError` in an I/O error), if that is what it is.
fn sender_reset(e: &codec::CodecError) -> Option<quinn::ReadError> {
    let codec::CodecError::Io(io) = e else {
        return None;
    };
    match io.get_ref()?.downcast_ref::<quinn::ReadError>()? {
        reset @ quinn::ReadError::Reset(_) => Some(reset.clone()),
        _ => None,
    }
}

/// Receives the body `header` announced into `writer`, the second half of [`receive_blob`]
/// (same checks and guarantees).
pub async fn receive_body<W: AsyncWrite + Unpin>(
    stream: &mut RecvStream,
    header: TransferHeader,
    max_len: u64,
    mut writer: W,
) -> Result<(TransferHeader, TransferStats), TransferError> {
    let start = Instant::now();
    if header.total_len > max_len {
        let _ = stream.stop(STOP_TOO_LARGE);
        return Err(TransferError::TooLarge {
            name: header.name,
            len: header.total_len,
            max: max_len,
        });
    }
    let total = header.total_len;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; CHUNK_LEN.min(usize::try_from(total).unwrap_or(CHUNK_LEN))];
    let mut received = 0u64;
    while received < total {
        let want = chunk_len_for(total - received, buf.len());
        let mut filled = 0;
        while filled < want {
            match stream.read(&mut buf[filled..want]).await? {
                Some(n) => filled += n,
                None => {
                    return Err(TransferError::Truncated {
                        name: header.name,
                        expected: total,
                        received: received + filled as u64,
                    })
                }
            }
        }
        hasher.update(&buf[..want]);
        if let Err(e) = writer.write_all(&buf[..want]).await {
            let _ = stream.stop(STOP_SINK_FAILED);
            return Err(TransferError::Sink(e));
        }
        received += want as u64;
    }
    let mut probe = [0u8; 1];
    if stream.read(&mut probe).await?.is_some() {
        let _ = stream.stop(STOP_BAD_HEADER);
        return Err(TransferError::TrailingData {
            name: header.name,
            expected: total,
        });
    }
    writer.flush().await.map_err(TransferError::Sink)?;
    let actual = *hasher.finalize().as_bytes();
    if actual != header.blake3 {
        tracing::warn!(
            transfer_id = header.transfer_id,
            name = %header.name,
            bytes = total,
            "transfer failed BLAKE3 verification"
        );
        return Err(TransferError::HashMismatch {
            name: header.name,
            expected: header.blake3,
            actual,
        });
    }
    let stats = TransferStats {
        transfer_id: header.transfer_id,
        bytes: total,
        elapsed: start.elapsed(),
        hash: actual,
    };
    tracing::debug!(
        transfer_id = stats.transfer_id,
        name = %header.name,
        bytes = stats.bytes,
        elapsed_ms = stats.elapsed.as_millis() as u64,
        "transfer received and verified"
    );
    Ok((header, stats))
}

/// Receives one transfer into the file `dest`: writes a temporary file next to it, syncs it and
/// renames it over `dest` only once the transfer is verified; on error nothing is left behind.
pub async fn receive_file(
    stream: &mut RecvStream,
    max_len: u64,
    dest: &Path,
) -> Result<(TransferHeader, TransferStats), TransferError> {
    let file_name = dest.file_name().map(|n| n.to_string_lossy().into_owned());
    let Some(file_name) = file_name else {
        return Err(file_error(
            "destination has no file name:",
            dest,
            std::io::ErrorKind::InvalidInput.into(),
        ));
    };
    let tmp = dest.with_file_name(format!(".{file_name}.{:016x}.part", rand::random::<u64>()));
    let result = receive_into_tmp(stream, max_len, &tmp).await;
    let result = match result {
        Ok(done) => tokio::fs::rename(&tmp, dest)
            .await
            .map(|()| done)
            .map_err(|source| file_error("cannot move the received file to", dest, source)),
        Err(e) => Err(e),
    };
    if result.is_err() {
        if let Err(e) = tokio::fs::remove_file(&tmp).await {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %tmp.display(), error = %e, "could not remove partial transfer file");
            }
        }
    }
    result
}

async fn receive_into_tmp(
    stream: &mut RecvStream,
    max_len: u64,
    tmp: &Path,
) -> Result<(TransferHeader, TransferStats), TransferError> {
    let mut file = tokio::fs::File::create(tmp)
        .await
        .map_err(|source| file_error("cannot create", tmp, source))?;
    let done = receive_blob(stream, max_len, &mut file).await?;
    file.sync_all()
        .await
        .map_err(|source| file_error("cannot sync", tmp, source))?;
    Ok(done)
}

/// Reads from `reader` into `buf` until it holds `want` bytes or the reader ends; returns the
/// length reached. `buf`'s spare capacity is read into without being zeroed first.
async fn fill<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
    want: usize,
) -> std::io::Result<usize> {
    while buf.len() < want {
        let room = want - buf.len();
        let mut limited = (&mut *buf).limit(room);
        if reader.read_buf(&mut limited).await? == 0 {
            break;
        }
    }
    Ok(buf.len())
}

/// Size of the next chunk: `remaining` capped at `cap`.
fn chunk_len_for(remaining: u64, cap: usize) -> usize {
    usize::try_from(remaining).map_or(cap, |r| r.min(cap))
}

fn check_name(name: &str) -> Result<(), TransferError> {
    if name.len() > MAX_NAME_LEN {
        return Err(TransferError::BadHeader {
            reason: format!(
                "name is {} bytes, the limit is {MAX_NAME_LEN}; use a shorter name",
                name.len()
            ),
        });
    }
    Ok(())
}

/// Checks a header's fields (name length, chunk length) as a receiver does before the body.
pub fn validate_header(header: &TransferHeader) -> Result<(), TransferError> {
    check_name(&header.name)?;
    if header.chunk_len == 0 || header.chunk_len > MAX_CHUNK_LEN {
        return Err(TransferError::BadHeader {
            reason: format!(
                "chunk length {} is outside 1..={MAX_CHUNK_LEN}; the sender is not a ragd node",
                header.chunk_len
            ),
        });
    }
    Ok(())
}

fn file_error(action: &'static str, path: &Path, source: std::io::Error) -> TransferError {
    TransferError::File {
        action,
        path: path.to_owned(),
        source,
    }
}

#[cfg(test)]
mod tests;
