//! How large a QUIC packet may be on the way to a peer.
//!
//! quinn starts every connection at 1200-byte packets and discovers the path MTU upwards, by
//! default up to 1452 (Ethernet). Above that bound fewer, larger packets move the same bytes with
//! less work per byte: on loopback a 512 MiB transfer went from ~0.7 to ~1.3 GB/s with 6500-byte
//! packets. But a higher bound costs on an ordinary LAN: the probes above the link's MTU fail one
//! by one, and a loopback narrowed to 1500 bytes settled at 1200-1446 instead of 1452 and moved
//! ~10% less. So the bound is set per peer from the kernel's route to it ([`max_udp_payload_to`]):
//! an Ethernet LAN gets 1472 bytes over IPv4 (1452 over IPv6, quinn's default), a jumbo-frame
//! LAN [`GSO_UDP_PAYLOAD`], and a route that carries at least [`LARGE_UDP_PAYLOAD_MIN`] (loopback,
//! 65,536) packets as large as it carries, sent one per write instead of in offload batches
//! (see [`crate::transfer::bulk_transport_config`]).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};

/// The largest QUIC packet (UDP payload) sent in segmentation-offload batches. Not higher: quinn
/// sends up to 10 packets in one offload write, which must fit one 64 KiB UDP datagram; with
/// 8972-byte packets the writes failed, quinn turned offload off and the connection fell back to
/// 1200 bytes.
pub const GSO_UDP_PAYLOAD: u16 = 6500;

/// From this route payload up, packets take the route's size and go one per write, offload off:
/// one packet then carries about what an offload batch of [`GSO_UDP_PAYLOAD`] packets does, with
/// a tenth of the per-packet work (encryption calls, headers, acknowledgements). On loopback a
/// 1 GiB transfer went from 1,070-1,080 to 1,360-1,480 MB/s (`bench_transfer`).
pub const LARGE_UDP_PAYLOAD_MIN: u16 = 32 * 1024;

/// The largest QUIC packet (UDP payload) ragd sends or accepts: quinn's and IPv6's limit
/// (65,535 less the UDP header). An IPv4 route carries at most [`IPV4_MAX_UDP_PAYLOAD`].
/// Endpoints accept packets this large from any peer; quinn would give each a receive buffer of
/// this x 64 (GRO segments) x 32 (datagrams per read), 128 MiB, which an enrolment flood paged
/// in up to +60 MiB of coordinator RSS, so [`crate::transport::bind_endpoint`] caps it at one
/// read's worth per slot ([`crate::udp_socket::ReceiveBounded`]): 2 MiB.
pub const MAX_UDP_PAYLOAD: u16 = 65_527;

/// The largest UDP payload of an IPv4 packet (65,535 less the IPv4 and UDP headers).
pub const IPV4_MAX_UDP_PAYLOAD: u16 = 65_507;

/// quinn's own upper bound for path MTU discovery: Ethernet's 1500 bytes less the IPv6 and UDP
/// headers. Used where the route's MTU cannot be read.
pub const ETHERNET_UDP_PAYLOAD: u16 = 1452;

/// The smallest UDP payload QUIC allows (RFC 9000, 14.1).
const QUIC_MIN_UDP_PAYLOAD: u16 = 1200;

/// The packet size bound for `remote`: the route's MTU less the IP and UDP headers, at most
/// [`GSO_UDP_PAYLOAD`] below [`LARGE_UDP_PAYLOAD_MIN`]. Reads the MTU from a UDP socket
/// connected to `remote` (a route lookup: nothing is sent). Where that is not possible (not
/// Linux, no route) it is [`ETHERNET_UDP_PAYLOAD`], quinn's default.
pub fn max_udp_payload_to(remote: SocketAddr) -> u16 {
    match route_mtu(remote) {
        Some(mtu) => payload_for_mtu(mtu, remote.ip()),
        None => ETHERNET_UDP_PAYLOAD,
    }
}

/// A link MTU less the headers in front of a UDP payload to `ip`, within QUIC's minimum and the
/// IP version's maximum; between [`GSO_UDP_PAYLOAD`] and [`LARGE_UDP_PAYLOAD_MIN`] it is
/// [`GSO_UDP_PAYLOAD`] (offload batches of those move more than single packets of the route's
/// size).
fn payload_for_mtu(mtu: u32, ip: IpAddr) -> u16 {
    let (headers, max) = match ip {
        IpAddr::V4(_) => (20 + 8, IPV4_MAX_UDP_PAYLOAD),
        IpAddr::V6(_) => (40 + 8, MAX_UDP_PAYLOAD),
    };
    let payload = mtu.saturating_sub(headers);
    let payload = payload.clamp(u32::from(QUIC_MIN_UDP_PAYLOAD), u32::from(max)) as u16;
    if payload < LARGE_UDP_PAYLOAD_MIN {
        payload.min(GSO_UDP_PAYLOAD)
    } else {
        payload
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn route_mtu(remote: SocketAddr) -> Option<u32> {
    let local: SocketAddr = match remote {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local).ok()?;
    socket.connect(remote).ok()?;
    let mtu = match remote {
        SocketAddr::V4(_) => rustix::net::sockopt::ip_mtu(&socket),
        SocketAddr::V6(_) => rustix::net::sockopt::ipv6_mtu(&socket),
    };
    match mtu {
        Ok(mtu) => Some(mtu),
        Err(e) => {
            tracing::debug!(%remote, error = %e, "cannot read the route's MTU");
            None
        }
    }
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn route_mtu(_remote: SocketAddr) -> Option<u32> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_come_off_the_link_mtu_within_quic_bounds() {
        let v4: IpAddr = Ipv4Addr::LOCALHOST.into();
        let v6: IpAddr = Ipv6Addr::LOCALHOST.into();
        assert_eq!(payload_for_mtu(1500, v4), 1472);
        assert_eq!(payload_for_mtu(1500, v6), 1452);
        assert_eq!(payload_for_mtu(9000, v4), GSO_UDP_PAYLOAD);
        assert_eq!(payload_for_mtu(32 * 1024 + 27, v4), GSO_UDP_PAYLOAD);
        assert_eq!(payload_for_mtu(32 * 1024 + 28, v4), LARGE_UDP_PAYLOAD_MIN);
        assert_eq!(payload_for_mtu(65536, v4), IPV4_MAX_UDP_PAYLOAD);
        assert_eq!(payload_for_mtu(65536, v6), 65_488);
        assert_eq!(payload_for_mtu(u32::MAX, v6), MAX_UDP_PAYLOAD);
        assert_eq!(payload_for_mtu(1280, v6), 1232);
        assert_eq!(payload_for_mtu(1230, v6), QUIC_MIN_UDP_PAYLOAD);
        assert_eq!(payload_for_mtu(0, v4), QUIC_MIN_UDP_PAYLOAD);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn loopback_reads_its_mtu() {
        let lo_mtu: u32 = std::fs::read_to_string("/sys/class/net/lo/mtu")
            .expect("the loopback interface has an MTU in sysfs")
            .trim()
            .parse()
            .unwrap();
        let remote: SocketAddr = (Ipv4Addr::LOCALHOST, 9).into();
        assert_eq!(
            max_udp_payload_to(remote),
            payload_for_mtu(lo_mtu, remote.ip())
        );
    }
}
