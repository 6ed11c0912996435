//! Request/response and handshake plumbing on top of quinn connections.
//!
//! - The dialer calls [`client_handshake`] right after connecting; the acceptor calls
//!   [`accept_hello`], decides, and answers with [`send_hello_reply`] (closing the connection with
//!   [`close_refused`] after a refusal).
//! - After the handshake, [`request`] sends one [`Request`] on a fresh bidirectional stream and
//!   waits for its [`Response`]; [`serve_requests`] answers the requests a peer sends.
//!
//! Every wait is bounded by a timeout; every frame goes through [`crate::codec`]. Endpoints are
//! made by [`bind_endpoint`], whose sockets have kernel buffers large enough for bulk transfers.

use crate::codec::{self, CodecError};
use crate::protocol::handshake::{Hello, HelloReply, Refusal, RefusalReason, Welcome};
use crate::protocol::messages::{Request, Response};
use crate::protocol::VersionRange;
use futures::FutureExt as _;
use quinn::{Connection, RecvStream, SendStream, VarInt};
use std::future::Future;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Application close code: the connection was refused (the reason text says why).
pub const CLOSE_REFUSED: VarInt = VarInt::from_u32(1);
/// Application close code: the node is shutting down.
pub const CLOSE_SHUTDOWN: VarInt = VarInt::from_u32(2);
/// Application close code: the peer was superseded by a newer connection or removed.
pub const CLOSE_SUPERSEDED: VarInt = VarInt::from_u32(3);

/// How long a peer may take to send one frame of a handshake or request.
pub const DEFAULT_FRAME_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of the connection plumbing.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The connection failed or was closed (this includes TLS refusals).
    #[error("connection to {peer} failed: {source}")]
    Connection {
        /// The peer's address.
        peer: std::net::SocketAddr,
        /// What quinn reported.
        source: quinn::ConnectionError,
    },
    /// Writing to a stream failed.
    #[error("sending to {peer} failed: {source}")]
    Write {
        /// The peer's address.
        peer: std::net::SocketAddr,
        /// What quinn reported.
        source: quinn::WriteError,
    },
    /// A frame could not be encoded or decoded.
    #[error("bad frame from or to {peer}: {source}")]
    Codec {
        /// The peer's address.
        peer: std::net::SocketAddr,
        /// What the codec reported.
        source: CodecError,
    },
    /// The peer did not answer in time.
    #[error("{peer} did not {what} within {after:?}")]
    Timeout {
        /// The peer's address.
        peer: std::net::SocketAddr,
        /// What we were waiting for.
        what: &'static str,
        /// How long we waited.
        after: Duration,
    },
    /// The peer closed the stream without sending the expected frame.
    #[error("{peer} closed the stream without sending {what}")]
    MissingFrame {
        /// The peer's address.
        peer: std::net::SocketAddr,
        /// The frame we expected.
        what: &'static str,
    },
    /// The peer refused the connection or request, with a reason.
    #[error("{peer} refused: {refusal}")]
    Refused {
        /// The peer's address.
        peer: std::net::SocketAddr,
        /// The peer's reason.
        refusal: Refusal,
    },
}

impl TransportError {
    /// The refusal carried by this error, if the peer refused.
    pub fn refusal(&self) -> Option<&Refusal> {
        match self {
            TransportError::Refused { refusal, .. } => Some(refusal),
            _ => None,
        }
    }
}

/// Builds the transport settings of a ragd connection to or from `peer`: keep-alives so idle
/// connections stay up and dead peers are noticed, an idle timeout, the windows and the packet
/// size bound of [`crate::transfer::bulk_transport_config`] for bulk transfers (the bound from
/// the route to `peer`, [`crate::path_mtu::max_udp_payload_to`]), and bounded stream counts.
pub fn transport_config(
    keep_alive: Duration,
    idle_timeout: Duration,
    peer: SocketAddr,
) -> Arc<quinn::TransportConfig> {
    let mut t = crate::transfer::bulk_transport_config(
        keep_alive,
        idle_timeout,
        crate::path_mtu::max_udp_payload_to(peer),
    );
    t.max_concurrent_bidi_streams(VarInt::from_u32(64));
    t.max_concurrent_uni_streams(VarInt::from_u32(16));
    Arc::new(t)
}

/// Kernel buffer asked for each QUIC socket, each way (a limit on what the kernel queues, not
/// memory taken up front). With the Linux default (`rmem_max` 208 KiB) a bulk transfer overflows
/// the receive buffer: on loopback 512 MiB lost 2,700-4,300 packets and cut the congestion window
/// ~250 times. With 65,507-byte loopback packets 8 MiB still lost 130-220 packets per GiB and
/// 16 MiB up to 430, once enough in a row that quinn took the path for a black hole and fell
/// back to 1,200-byte packets (350 MB/s); 32 MiB lost 0-43 (`bench_transfer`).
pub const SOCKET_BUFFER_BYTES: usize = 32 * 1024 * 1024;

/// Binds a UDP socket at `addr`, enlarges its kernel buffers towards [`SOCKET_BUFFER_BYTES`]
/// (`SO_RCVBUFFORCE` where the process may, else as far as `net.core.rmem_max` / `wmem_max`
/// allow; a warning, once per process, says when that falls short) and makes it a quinn
/// endpoint that accepts packets up to [`crate::path_mtu::MAX_UDP_PAYLOAD`], with a receive
/// buffer of one 64 KiB slot per read ([`crate::udp_socket::ReceiveBounded`]), a server when
/// `server` is given. Needs a tokio runtime.
pub fn bind_endpoint(
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
) -> std::io::Result<quinn::Endpoint> {
    let socket = UdpSocket::bind(addr)?;
    enlarge_socket_buffers(&socket);
    let runtime = quinn::default_runtime()
        .ok_or_else(|| std::io::Error::other("no async runtime to drive a QUIC endpoint"))?;
    let mut config = quinn::EndpointConfig::default();
    config
        .max_udp_payload_size(crate::path_mtu::MAX_UDP_PAYLOAD)
        .map_err(|e| std::io::Error::other(format!("QUIC endpoint settings: {e}")))?;
    let socket = Arc::new(crate::udp_socket::ReceiveBounded::new(
        runtime.wrap_udp_socket(socket)?,
        crate::path_mtu::MAX_UDP_PAYLOAD,
    ));
    quinn::Endpoint::new_with_abstract_socket(config, server, socket, runtime)
}

/// Asks for [`SOCKET_BUFFER_BYTES`] each way; returns the (receive, send) sizes the kernel
/// granted. Failures leave the defaults: the socket works, only slower.
fn enlarge_socket_buffers(socket: &UdpSocket) -> (usize, usize) {
    static WARNED: AtomicBool = AtomicBool::new(false);
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        // Allowed with CAP_NET_ADMIN (root, or a unit granting it); ignores rmem_max.
        let _ =
            rustix::net::sockopt::set_socket_recv_buffer_size_force(socket, SOCKET_BUFFER_BYTES);
        let _ =
            rustix::net::sockopt::set_socket_send_buffer_size_force(socket, SOCKET_BUFFER_BYTES);
    }
    let Ok(state) = quinn::udp::UdpSocketState::new(socket.into()) else {
        return (0, 0);
    };
    let recv = state.recv_buffer_size(socket.into()).unwrap_or(0);
    if recv < SOCKET_BUFFER_BYTES {
        let _ = state.set_recv_buffer_size(socket.into(), SOCKET_BUFFER_BYTES);
    }
    let send = state.send_buffer_size(socket.into()).unwrap_or(0);
    if send < SOCKET_BUFFER_BYTES {
        let _ = state.set_send_buffer_size(socket.into(), SOCKET_BUFFER_BYTES);
    }
    let recv = state.recv_buffer_size(socket.into()).unwrap_or(0);
    let send = state.send_buffer_size(socket.into()).unwrap_or(0);
    if recv.min(send) < SOCKET_BUFFER_BYTES && !WARNED.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            recv_kib = recv / 1024,
            send_kib = send / 1024,
            wanted_kib = SOCKET_BUFFER_BYTES / 1024,
            "QUIC socket buffers are smaller than asked: bulk transfers will drop packets and slow \
             down. Raise net.core.rmem_max and net.core.wmem_max to 33554432 (deploy/sysctl/60-ragd.conf) \
             or grant the daemon CAP_NET_ADMIN"
        );
    }
    tracing::debug!(recv, send, "QUIC socket buffers");
    (recv, send)
}

/// The largest frame a peer without a certificate may send (a Hello, an enrolment request with
/// its CSR): 64 KiB.
pub const ENROLMENT_MAX_FRAME: usize = 64 * 1024;

/// Transport settings for connections from peers that have not authenticated (the enrolment
/// endpoint): two bidirectional streams (the Hello, the one enrolment request), no
/// unidirectional ones, receive windows of a few frames, no keep-alive, and `idle_timeout`. What
/// one such connection can make this node buffer is bounded by its windows.
pub fn enrolment_transport_config(idle_timeout: Duration) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(VarInt::from_u32(2));
    t.max_concurrent_uni_streams(VarInt::from_u32(0));
    t.stream_receive_window(VarInt::from_u32(ENROLMENT_MAX_FRAME as u32 + 16));
    t.receive_window(VarInt::from_u32(2 * ENROLMENT_MAX_FRAME as u32));
    t.send_window(2 * ENROLMENT_MAX_FRAME as u64);
    t.datagram_receive_buffer_size(None);
    t.keep_alive_interval(None);
    if let Ok(idle) = quinn::IdleTimeout::try_from(idle_timeout) {
        t.max_idle_timeout(Some(idle));
    }
    Arc::new(t)
}

async fn with_timeout<T>(
    peer: std::net::SocketAddr,
    what: &'static str,
    after: Duration,
    fut: impl Future<Output = Result<T, TransportError>>,
) -> Result<T, TransportError> {
    tokio::time::timeout(after, fut)
        .await
        .map_err(|_| TransportError::Timeout { peer, what, after })?
}

async fn read_one<T: serde::de::DeserializeOwned>(
    peer: std::net::SocketAddr,
    recv: &mut RecvStream,
    what: &'static str,
    max_frame: usize,
) -> Result<T, TransportError> {
    match codec::read_frame_within::<_, T>(recv, max_frame).await {
        Ok(Some(v)) => {
            // One message per stream, and its sender finishes the stream right after it, so
            // the end usually came in the same packet. Reading it now (never waiting for it)
            // marks the stream read to the end: dropping it then sends no STOP_SENDING, which
            // was one more packet each way for every request.
            let _ = recv.read(&mut [0u8; 1]).now_or_never();
            Ok(v)
        }
        Ok(None) => Err(TransportError::MissingFrame { peer, what }),
        Err(CodecError::Io(e)) => match connection_error_of(&e) {
            Some(source) => Err(TransportError::Connection { peer, source }),
            None => Err(TransportError::Codec {
                peer,
                source: CodecError::Io(e),
            }),
        },
        Err(source) => Err(TransportError::Codec { peer, source }),
    }
}

/// quinn wraps connection loss in io errors on streams; dig it out so callers see the real cause.
fn connection_error_of(e: &std::io::Error) -> Option<quinn::ConnectionError> {
    let inner = e.get_ref()?;
    if let Some(quinn::ReadError::ConnectionLost(c)) = inner.downcast_ref::<quinn::ReadError>() {
        return Some(c.clone());
    }
    if let Some(quinn::WriteError::ConnectionLost(c)) = inner.downcast_ref::<quinn::WriteError>() {
        return Some(c.clone());
    }
    None
}

async fn write_one<T: serde::Serialize>(
    peer: std::net::SocketAddr,
    send: &mut SendStream,
    msg: &T,
) -> Result<(), TransportError> {
    codec::write_frame(send, msg)
        .await
        .map_err(|source| match source {
            CodecError::Io(e) => match connection_error_of(&e) {
                Some(source) => TransportError::Connection { peer, source },
                None => TransportError::Codec {
                    peer,
                    source: CodecError::Io(e),
                },
            },
            source => TransportError::Codec { peer, source },
        })?;
    // Finishing only fails if the stream was already finished or reset; either way the peer has
    // what it will get, and the read side reports any real failure.
    let _ = send.finish();
    Ok(())
}

/// Dialer side of the handshake: sends `hello` and waits for the peer's Welcome.
pub async fn client_handshake(
    conn: &Connection,
    hello: &Hello,
    timeout: Duration,
) -> Result<Welcome, TransportError> {
    let peer = conn.remote_address();
    with_timeout(peer, "answer the handshake", timeout, async {
        let (mut send, mut recv) = conn
            .open_bi()
            .await
            .map_err(|source| TransportError::Connection { peer, source })?;
        write_one(peer, &mut send, hello).await?;
        match read_one::<HelloReply>(peer, &mut recv, "a handshake reply", codec::MAX_FRAME_LEN)
            .await?
        {
            HelloReply::Welcome(w) => Ok(w),
            HelloReply::Refused(refusal) => Err(TransportError::Refused { peer, refusal }),
        }
    })
    .await
}

/// Acceptor side of the handshake: waits for the dialer's Hello. Answer with [`send_hello_reply`].
///
/// A Hello body above `max_frame` bytes is refused unread (pass [`codec::MAX_FRAME_LEN`] for
/// authenticated peers, [`ENROLMENT_MAX_FRAME`] for peers without a certificate).
pub async fn accept_hello(
    conn: &Connection,
    timeout: Duration,
    max_frame: usize,
) -> Result<(Hello, SendStream), TransportError> {
    let peer = conn.remote_address();
    with_timeout(peer, "send its handshake", timeout, async {
        let (send, mut recv) = conn
            .accept_bi()
            .await
            .map_err(|source| TransportError::Connection { peer, source })?;
        let hello = read_one::<Hello>(peer, &mut recv, "a Hello", max_frame).await?;
        Ok((hello, send))
    })
    .await
}

/// A Hello that passed version negotiation, with the stream to answer it on.
#[derive(Debug)]
pub struct AcceptedHello {
    /// What the dialer sent.
    pub hello: Hello,
    /// The negotiated protocol version.
    pub version: u16,
    /// Where to send the Welcome (or a refusal).
    pub send: SendStream,
}

/// Acceptor side of the handshake: waits for the Hello and negotiates the version. A missing or
/// malformed Hello, or a peer with no common version, is refused (the reason is sent when there
/// is a stream to send it on, then the connection is closed) and `None` is returned.
/// Frames above `max_frame` bytes are refused unread (see [`accept_hello`]).
pub async fn accept_and_negotiate(
    conn: &Connection,
    ours: VersionRange,
    timeout: Duration,
    max_frame: usize,
) -> Option<AcceptedHello> {
    let remote = conn.remote_address();
    let (hello, send) = match accept_hello(conn, timeout, max_frame).await {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(%remote, error = %e, "peer sent no valid Hello");
            let refusal = Refusal {
                reason: RefusalReason::Malformed,
                message: format!("expected a ragd Hello: {e}"),
            };
            close_refused(conn, None, refusal).await;
            return None;
        }
    };
    match ours.negotiate(&hello.versions) {
        Ok(version) => Some(AcceptedHello {
            hello,
            version,
            send,
        }),
        Err(mismatch) => {
            tracing::warn!(%remote, peer = %hello.node_id, role = %hello.role, error = %mismatch, "refused an incompatible peer");
            close_refused(conn, Some(send), Refusal::incompatible(mismatch)).await;
            None
        }
    }
}

/// Sends the answer to a Hello and finishes the handshake stream.
pub async fn send_hello_reply(
    conn: &Connection,
    mut send: SendStream,
    reply: &HelloReply,
) -> Result<(), TransportError> {
    write_one(conn.remote_address(), &mut send, reply).await
}

/// Refuses a peer: sends the refusal on `send` (when there is a stream to answer on), waits
/// briefly so it can arrive, then closes the connection with the refusal's message as reason.
pub async fn close_refused(conn: &Connection, send: Option<SendStream>, refusal: Refusal) {
    if let Some(mut send) = send {
        let reply = HelloReply::Refused(refusal.clone());
        if write_one(conn.remote_address(), &mut send, &reply)
            .await
            .is_ok()
        {
            // Give the peer a moment to read the refusal before the close discards it.
            let _ = tokio::time::timeout(Duration::from_millis(500), send.stopped()).await;
        }
    }
    let mut reason = refusal.message.into_bytes();
    reason.truncate(1000);
    conn.close(CLOSE_REFUSED, &reason);
}

/// Sends one request on a new stream and waits for its response.
pub async fn request(
    conn: &Connection,
    req: &Request,
    timeout: Duration,
) -> Result<Response, TransportError> {
    let peer = conn.remote_address();
    with_timeout(peer, "answer a request", timeout, async {
        let (mut send, mut recv) = conn
            .open_bi()
            .await
            .map_err(|source| TransportError::Connection { peer, source })?;
        write_one(peer, &mut send, req).await?;
        match read_one::<Response>(peer, &mut recv, "a response", codec::MAX_FRAME_LEN).await? {
            Response::Refused(refusal) => Err(TransportError::Refused { peer, refusal }),
            other => Ok(other),
        }
    })
    .await
}

/// Answers exactly one request on `conn`: accepts one stream within `timeout`, reads a request of
/// at most `max_frame` bytes, answers it with `handler`. For peers that get one request per
/// connection (enrolment); the caller closes the connection afterwards.
pub async fn serve_one_request<H, F>(
    conn: &Connection,
    handler: H,
    timeout: Duration,
    max_frame: usize,
) -> Result<(), TransportError>
where
    H: FnOnce(Request) -> F,
    F: Future<Output = Response>,
{
    let peer = conn.remote_address();
    let (mut send, mut recv) = with_timeout(peer, "open a request stream", timeout, async {
        conn.accept_bi()
            .await
            .map_err(|source| TransportError::Connection { peer, source })
    })
    .await?;
    let req = with_timeout(
        peer,
        "send a request",
        timeout,
        read_one::<Request>(peer, &mut recv, "a request", max_frame),
    )
    .await;
    let resp = match req {
        Ok(req) => handler(req).await,
        Err(e) => Response::Refused(Refusal {
            reason: RefusalReason::Malformed,
            message: format!("could not read a ragd request: {e}"),
        }),
    };
    write_one(peer, &mut send, &resp).await?;
    // Let the answer reach the peer before the caller closes the connection.
    let _ = tokio::time::timeout(Duration::from_millis(500), send.stopped()).await;
    Ok(())
}

/// Answers requests on `conn` until the peer closes it or `cancel` fires; each request runs in
/// its own owned task so a slow one does not hold up heartbeats. A stream that does not carry a
/// valid request gets a `Malformed` refusal.
pub async fn serve_requests<H, F>(
    conn: Connection,
    handler: H,
    frame_timeout: Duration,
    cancel: CancellationToken,
) where
    H: Fn(Request) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response> + Send + 'static,
{
    let peer = conn.remote_address();
    let mut tasks = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => break,
            accepted = conn.accept_bi() => accepted,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
        };
        let (mut send, mut recv) = match accepted {
            Ok(streams) => streams,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "connection ended");
                break;
            }
        };
        let handler = handler.clone();
        tasks.spawn(async move {
            let req = with_timeout(
                peer,
                "send a request",
                frame_timeout,
                read_one::<Request>(peer, &mut recv, "a request", codec::MAX_FRAME_LEN),
            )
            .await;
            let resp = match req {
                Ok(req) => {
                    tracing::trace!(%peer, kind = req.kind(), "request");
                    handler(req).await
                }
                Err(e) => {
                    tracing::warn!(%peer, error = %e, "malformed request");
                    Response::Refused(Refusal {
                        reason: RefusalReason::Malformed,
                        message: format!("could not read a ragd request: {e}"),
                    })
                }
            };
            if let Err(e) = write_one(peer, &mut send, &resp).await {
                tracing::debug!(%peer, error = %e, "could not send response");
            }
        });
    }
    tasks.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_os = "linux")]
    #[test]
    fn sockets_get_the_buffers_the_kernel_allows() {
        let read = |name: &str| -> usize {
            std::fs::read_to_string(format!("/proc/sys/net/core/{name}"))
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        };
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let (recv, send) = enlarge_socket_buffers(&socket);
        // Linux doubles what it grants (bookkeeping); without CAP_NET_ADMIN it caps at *mem_max.
        let floor = |max: usize| SOCKET_BUFFER_BYTES.min(2 * max);
        assert!(
            recv >= floor(read("rmem_max")),
            "receive buffer {recv} below what rmem_max allows"
        );
        assert!(
            send >= floor(read("wmem_max")),
            "send buffer {send} below what wmem_max allows"
        );
    }
}
