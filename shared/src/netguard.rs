//! The LAN-only guard: ragd talks to peers on the local network only, unless told otherwise.
//!
//! Every address a node is about to dial or accept is passed to [`LanGuard::check`]. The default
//! ranges cover what a home or office LAN uses (private, unique-local, link-local and CGNAT,
//! the latter for overlay VPNs such as Tailscale); anything else needs an explicit entry in
//! `allowed_networks` or `allow_public_peers = true` in the configuration.

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The networks accepted without configuration, as `(network, what it is)`.
pub const DEFAULT_ALLOWED: [(&str, &str); 9] = [
    ("127.0.0.0/8", "IPv4 loopback"),
    ("::1/128", "IPv6 loopback"),
    ("10.0.0.0/8", "RFC 1918 private"),
    ("172.16.0.0/12", "RFC 1918 private"),
    ("192.168.0.0/16", "RFC 1918 private"),
    ("fc00::/7", "IPv6 unique-local"),
    ("169.254.0.0/16", "IPv4 link-local"),
    ("fe80::/10", "IPv6 link-local"),
    ("100.64.0.0/10", "carrier-grade NAT / overlay VPN"),
];

/// A peer address was refused by the LAN-only guard.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetGuardError {
    /// The address is outside every allowed network.
    #[error(
        "refusing peer address {addr}: it is not on the local network (allowed: {allowed}); \
         if this peer is trusted, add it to `allowed_networks` in the config, \
         or set `allow_public_peers = true`"
    )]
    NotLocal {
        /// The refused address (IPv4-mapped IPv6 addresses are shown as their IPv4).
        addr: IpAddr,
        /// The allowed networks, comma-separated, defaults first then configured ones.
        allowed: String,
    },
}

/// Decides whether a peer address may be talked to (config section shape: `allowed_networks`,
/// `allow_public_peers`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LanGuard {
    /// Networks accepted on top of the defaults (config key `allowed_networks`).
    #[serde(rename = "allowed_networks")]
    pub extra_allowed: Vec<IpNet>,
    /// Accept every address, public ones included (config key `allow_public_peers`).
    #[serde(rename = "allow_public_peers")]
    pub allow_any: bool,
}

impl LanGuard {
    /// A guard that accepts the default LAN ranges plus `extra_allowed`.
    pub fn new(extra_allowed: Vec<IpNet>) -> Self {
        Self {
            extra_allowed,
            allow_any: false,
        }
    }

    /// Accepts `ip` if it is on the local network or explicitly allowed; explains the refusal
    /// otherwise.
    pub fn check(&self, ip: IpAddr) -> Result<(), NetGuardError> {
        if self.allow_any {
            return Ok(());
        }
        let ip = canonical(ip);
        if is_default_lan(ip) || self.extra_allowed.iter().any(|net| net.contains(&ip)) {
            return Ok(());
        }
        tracing::debug!(addr = %ip, "peer address refused by the LAN-only guard");
        Err(NetGuardError::NotLocal {
            addr: ip,
            allowed: self.allowed_description(),
        })
    }

    /// The allowed networks as one human-readable, comma-separated list.
    pub fn allowed_description(&self) -> String {
        DEFAULT_ALLOWED
            .iter()
            .map(|(net, what)| format!("{net} ({what})"))
            .chain(
                self.extra_allowed
                    .iter()
                    .map(|net| format!("{net} (configured)")),
            )
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) are judged as the IPv4 address they carry.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

fn is_default_lan(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => DEFAULT_V4.iter().any(|&(a, len)| v4_in(v4, a, len)),
        IpAddr::V6(v6) => DEFAULT_V6.iter().any(|&(a, len)| v6_in(v6, a, len)),
    }
}

const DEFAULT_V4: [(Ipv4Addr, u8); 6] = [
    (Ipv4Addr::new(127, 0, 0, 0), 8),
    (Ipv4Addr::new(10, 0, 0, 0), 8),
    (Ipv4Addr::new(172, 16, 0, 0), 12),
    (Ipv4Addr::new(192, 168, 0, 0), 16),
    (Ipv4Addr::new(169, 254, 0, 0), 16),
    (Ipv4Addr::new(100, 64, 0, 0), 10),
];

const DEFAULT_V6: [(Ipv6Addr, u8); 3] = [
    (Ipv6Addr::LOCALHOST, 128),
    (Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 0), 7),
    (Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), 10),
];

fn v4_in(ip: Ipv4Addr, net: Ipv4Addr, len: u8) -> bool {
    Ipv4Net::new(net, len).is_ok_and(|n| n.contains(&ip))
}

fn v6_in(ip: Ipv6Addr, net: Ipv6Addr, len: u8) -> bool {
    Ipv6Net::new(net, len).is_ok_and(|n| n.contains(&ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(guard: &LanGuard, s: &str) -> bool {
        guard.check(s.parse().unwrap()).is_ok()
    }

    #[test]
    fn default_ranges_edges() {
        let g = LanGuard::default();
        let cases = [
            // (address, allowed)
            ("126.255.255.255", false),
            ("127.0.0.0", true),
            ("127.255.255.255", true),
            ("128.0.0.0", false),
            ("9.255.255.255", false),
            ("10.0.0.0", true),
            ("10.255.255.255", true),
            ("11.0.0.0", false),
            ("172.15.255.255", false),
            ("172.16.0.0", true),
            ("172.31.255.255", true),
            ("172.32.0.0", false),
            ("192.167.255.255", false),
            ("192.168.0.0", true),
            ("192.168.255.255", true),
            ("192.169.0.0", false),
            ("169.253.255.255", false),
            ("169.254.0.0", true),
            ("169.254.255.255", true),
            ("169.255.0.0", false),
            ("100.63.255.255", false),
            ("100.64.0.0", true),
            ("100.127.255.255", true),
            ("100.128.0.0", false),
            ("8.8.8.8", false),
            ("0.0.0.0", false),
            ("224.0.0.251", false),
            ("::1", true),
            ("::2", false),
            ("::", false),
            ("fbff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", false),
            ("fc00::", true),
            ("fdff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", true),
            ("fe00::", false),
            ("fe7f:ffff:ffff:ffff:ffff:ffff:ffff:ffff", false),
            ("fe80::", true),
            ("febf:ffff:ffff:ffff:ffff:ffff:ffff:ffff", true),
            ("fec0::", false),
            ("2001:db8::1", false),
            ("2606:4700::1111", false),
        ];
        for (addr, allowed) in cases {
            assert_eq!(ok(&g, addr), allowed, "{addr} should be allowed={allowed}");
        }
    }

    #[test]
    fn ipv4_mapped_is_judged_as_ipv4() {
        let g = LanGuard::default();
        assert!(ok(&g, "::ffff:192.168.1.10"));
        assert!(ok(&g, "::ffff:127.0.0.1"));
        assert!(!ok(&g, "::ffff:8.8.8.8"));
        let err = g.check("::ffff:8.8.8.8".parse().unwrap()).unwrap_err();
        assert_eq!(
            err,
            NetGuardError::NotLocal {
                addr: "8.8.8.8".parse().unwrap(),
                allowed: g.allowed_description()
            }
        );
    }

    #[test]
    fn extra_networks_and_allow_any() {
        let g = LanGuard::new(vec!["203.0.113.0/24".parse().unwrap()]);
        assert!(ok(&g, "203.0.113.0"));
        assert!(ok(&g, "203.0.113.255"));
        assert!(!ok(&g, "203.0.114.0"));
        assert!(ok(&g, "::ffff:203.0.113.7"));
        let any = LanGuard {
            extra_allowed: vec![],
            allow_any: true,
        };
        assert!(ok(&any, "8.8.8.8"));
        assert!(ok(&any, "2001:db8::1"));
    }

    #[test]
    fn refusal_names_address_ranges_and_remedy() {
        let g = LanGuard::new(vec!["203.0.113.0/24".parse().unwrap()]);
        let msg = g.check("8.8.4.4".parse().unwrap()).unwrap_err().to_string();
        for needle in [
            "8.8.4.4",
            "192.168.0.0/16",
            "fe80::/10",
            "100.64.0.0/10",
            "203.0.113.0/24 (configured)",
            "`allowed_networks`",
            "`allow_public_peers = true`",
        ] {
            assert!(msg.contains(needle), "{needle:?} missing from: {msg}");
        }
    }

    #[test]
    fn description_matches_the_checked_ranges() {
        // The human-readable list and the checked constants must not drift apart.
        for (net, _) in DEFAULT_ALLOWED {
            let net: IpNet = net.parse().unwrap();
            assert!(is_default_lan(net.network()), "{net} start");
            assert!(is_default_lan(net.broadcast()), "{net} end");
        }
        assert_eq!(DEFAULT_ALLOWED.len(), DEFAULT_V4.len() + DEFAULT_V6.len());
    }

    #[test]
    fn config_shape_round_trips() {
        let g: LanGuard = serde_json::from_str(
            r#"{"allowed_networks": ["203.0.113.0/24", "2001:db8::/32"], "allow_public_peers": false}"#,
        )
        .unwrap();
        assert_eq!(g.extra_allowed.len(), 2);
        assert!(ok(&g, "2001:db8::5"));
        let back: LanGuard = serde_json::from_str(&serde_json::to_string(&g).unwrap()).unwrap();
        assert_eq!(back, g);
        let empty: LanGuard = serde_json::from_str("{}").unwrap();
        assert_eq!(empty, LanGuard::default());
        assert!(serde_json::from_str::<LanGuard>(r#"{"allow_any": true}"#).is_err());
    }
}
