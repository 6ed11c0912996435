//! The UDP socket under ragd's QUIC endpoints: quinn's own, with a receive buffer sized to what
//! one read can deliver.
//!
//! quinn sizes an endpoint's receive buffer as the largest packet it accepts x the datagrams the
//! socket says one read may coalesce (Linux UDP GRO: 64) x 32 reads per batch. With packets up to
//! [`crate::path_mtu::MAX_UDP_PAYLOAD`] (65,527 bytes, for loopback) that is 128 MiB per
//! endpoint, and an enrolment flood paged in enough of it to lift the coordinator's RSS from 40
//! to 100 MiB. But the kernel never hands one read more than one UDP datagram's worth: a GRO
//! batch stops short of 64 KiB, headers included, and so does one datagram. [`ReceiveBounded`]
//! reports as many receive segments as packets of the endpoint's largest size fit in
//! [`MAX_BYTES_PER_READ`] (at least one), which gives each read one 64 KiB slot: 2 MiB per
//! endpoint at 65,527-byte packets, and quinn's own figure at 1,472-byte ones (64 KiB / 1,472 =
//! 44 segments, fewer than GRO's 64, still one whole batch).

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

/// The most bytes one read of a UDP socket delivers: one datagram's payload (at most 65,535
/// less the UDP header) or one GRO batch (the kernel stops merging before 64 KiB).
pub const MAX_BYTES_PER_READ: usize = 65_535;

/// A quinn socket whose receive segments are capped so that quinn's receive buffer per read is
/// about [`MAX_BYTES_PER_READ`] instead of `max_udp_payload` x GRO segments; everything else is
/// the wrapped socket's.
#[derive(Debug)]
pub struct ReceiveBounded {
    inner: Arc<dyn AsyncUdpSocket>,
    max_receive_segments: usize,
}

impl ReceiveBounded {
    /// Wraps `inner` for an endpoint that accepts packets up to `max_udp_payload` bytes.
    pub fn new(inner: Arc<dyn AsyncUdpSocket>, max_udp_payload: u16) -> Self {
        let max_receive_segments =
            receive_segments(inner.max_receive_segments(), usize::from(max_udp_payload));
        Self {
            inner,
            max_receive_segments,
        }
    }
}

/// The socket's own receive segments, capped at the packets of `max_udp_payload` bytes that fit
/// in one read; at least one.
fn receive_segments(socket_segments: usize, max_udp_payload: usize) -> usize {
    let per_read = MAX_BYTES_PER_READ / max_udp_payload.max(1);
    socket_segments.min(per_read).max(1)
}

impl AsyncUdpSocket for ReceiveBounded {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        self.inner.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        self.inner.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.max_receive_segments
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_read_gets_one_datagrams_worth_of_buffer() {
        // Loopback-sized packets: one per read, not 64.
        assert_eq!(receive_segments(64, 65_527), 1);
        assert_eq!(receive_segments(64, 65_507), 1);
        // Jumbo-frame packets: ten fit in 64 KiB.
        assert_eq!(receive_segments(64, 6_500), 10);
        // Ethernet packets: the whole GRO batch the kernel can build.
        assert_eq!(receive_segments(64, 1_472), 44);
        assert!(receive_segments(64, 1_472) * 1_472 <= MAX_BYTES_PER_READ);
        // A socket without GRO keeps its one segment.
        assert_eq!(receive_segments(1, 1_200), 1);
        assert_eq!(receive_segments(0, 0), 1);
    }

    #[tokio::test]
    async fn the_wrapped_socket_reports_capped_segments_and_delegates_the_rest() {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = socket.local_addr().unwrap();
        let runtime = quinn::default_runtime().unwrap();
        let inner = runtime.wrap_udp_socket(socket).unwrap();
        let inner_segments = inner.max_receive_segments();
        let wrapped = ReceiveBounded::new(inner, 65_527);
        assert_eq!(wrapped.local_addr().unwrap(), addr);
        assert_eq!(wrapped.max_receive_segments(), 1);
        assert!(inner_segments >= 1);
    }
}
