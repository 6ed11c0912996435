//! Where an LLM endpoint may be and what it may be sent: every address an HTTP client connects
//! to passes the LAN-only guard ([`LanGuard`], config key `allowed_networks`), and an API key
//! travels only over https or to this machine.
//!
//! A URL with an IP address is checked when the backend is built; a host name is resolved by
//! [`GuardedResolver`] at every connection and only its allowed addresses are dialled, so a name
//! that points (or later re-points) outside the LAN is refused too.

use super::LlmError;
use ragd_shared::netguard::LanGuard;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::Url;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

/// Resolves host names through the system resolver and keeps only addresses the guard allows.
#[derive(Debug, Clone)]
pub struct GuardedResolver {
    guard: LanGuard,
}

impl GuardedResolver {
    /// A resolver that admits what `guard` admits.
    pub fn new(guard: LanGuard) -> Arc<Self> {
        Arc::new(Self { guard })
    }
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let guard = self.guard.clone();
        Box::pin(async move {
            let host = name.as_str().to_string();
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let allowed = allowed_addrs(&host, found, &guard)?;
            let addrs: Addrs = Box::new(allowed.into_iter());
            Ok(addrs)
        })
    }
}

/// The addresses of `host` that `guard` allows; an error naming the setting when none is.
fn allowed_addrs(
    host: &str,
    found: Vec<SocketAddr>,
    guard: &LanGuard,
) -> Result<Vec<SocketAddr>, String> {
    let mut refusal = None;
    let allowed: Vec<SocketAddr> = found
        .into_iter()
        .filter(|a| match guard.check(a.ip()) {
            Ok(()) => true,
            Err(e) => {
                refusal.get_or_insert(e);
                false
            }
        })
        .collect();
    if allowed.is_empty() {
        return Err(match refusal {
            Some(e) => format!("{host}: {e}"),
            None => format!("{host} has no address"),
        });
    }
    Ok(allowed)
}

/// The host of `url` as an IP address, when it is written as one.
fn ip_host(url: &Url) -> Option<IpAddr> {
    let host = url.host_str()?;
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .ok()
}

/// Whether `url` names this machine (a loopback address or `localhost`).
pub fn is_loopback(url: &Url) -> bool {
    match ip_host(url) {
        Some(ip) => ip.is_loopback(),
        None => url
            .host_str()
            .is_some_and(|h| h.eq_ignore_ascii_case("localhost")),
    }
}

/// Checks an endpoint URL before use: http or https, a host, and (for an IP address) inside the
/// networks `guard` allows. Host names are checked at connection time by [`GuardedResolver`].
pub fn check_url(endpoint: &str, guard: &LanGuard) -> Result<Url, LlmError> {
    let bad = |reason: String| LlmError::BadEndpoint {
        endpoint: endpoint.to_string(),
        reason,
    };
    let url = Url::parse(endpoint).map_err(|e| {
        bad(format!(
            "not a URL ({e}); write e.g. \"http://192.168.1.20:8080\""
        ))
    })?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(bad(format!(
            "scheme `{}` is not supported: use http:// or https://",
            url.scheme()
        )));
    }
    if url.host_str().is_none() {
        return Err(bad("the URL has no host".into()));
    }
    if let Some(ip) = ip_host(&url) {
        guard.check(ip).map_err(|e| bad(e.to_string()))?;
    }
    Ok(url)
}

/// Whether an API key may be sent to `url`: only over https, or to this machine.
pub fn may_carry_key(url: &Url) -> bool {
    url.scheme() == "https" || is_loopback(url)
}

/// The key to send to `url`: `key` when [`may_carry_key`], otherwise `None` with a warning that
/// names where the key came from, so it never crosses the LAN in clear text.
pub fn key_for(url: &Url, key: Option<String>, source: &str) -> Option<String> {
    let key = key?;
    if may_carry_key(url) {
        return Some(key);
    }
    tracing::warn!(
        endpoint = %url,
        key_from = source,
        "not sending the API key over plain http to another machine; use https:// for this endpoint"
    );
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> Url {
        Url::parse(s).unwrap()
    }

    #[test]
    fn urls_outside_the_lan_are_refused_naming_the_setting() {
        let guard = LanGuard::default();
        check_url("http://192.168.1.20:8080", &guard).unwrap();
        check_url("https://[fd00::5]:8443/v1", &guard).unwrap();
        check_url("http://llm.lan:8080", &guard).unwrap();
        let err = check_url("http://8.8.8.8:80", &guard)
            .unwrap_err()
            .to_string();
        assert!(err.contains("allowed_networks"), "{err}");
        let err = check_url("ftp://10.0.0.1/", &guard)
            .unwrap_err()
            .to_string();
        assert!(err.contains("scheme"), "{err}");
        let allowed = LanGuard::new(vec!["8.8.8.0/24".parse().unwrap()]);
        check_url("http://8.8.8.8:80", &allowed).unwrap();
    }

    #[test]
    fn keys_travel_only_over_https_or_to_this_machine() {
        assert!(may_carry_key(&url("https://192.168.1.20")));
        assert!(may_carry_key(&url("http://127.0.0.1:8080")));
        assert!(may_carry_key(&url("http://[::1]:8080")));
        assert!(may_carry_key(&url("http://localhost:8080")));
        assert!(!may_carry_key(&url("http://192.168.1.20:8080")));
        assert!(!may_carry_key(&url("http://llm.lan:8080")));
        let lan = url("http://10.1.2.3:8000");
        assert_eq!(key_for(&lan, Some("k".into()), "OPENAI_API_KEY"), None);
        assert_eq!(
            key_for(&url("http://127.0.0.1:1"), Some("k".into()), "x").as_deref(),
            Some("k")
        );
    }

    #[tokio::test]
    async fn the_resolver_drops_addresses_the_guard_refuses() {
        let lan_only = GuardedResolver::new(LanGuard::default());
        let addrs: Vec<SocketAddr> = lan_only
            .resolve("localhost".parse().unwrap())
            .await
            .unwrap()
            .collect();
        assert!(!addrs.is_empty() && addrs.iter().all(|a| a.ip().is_loopback()));
    }

    #[test]
    fn only_allowed_addresses_of_a_name_are_dialled() {
        let guard = LanGuard::default();
        let sa = |s: &str| s.parse::<SocketAddr>().unwrap();
        let mixed = vec![sa("203.0.113.9:0"), sa("192.168.1.20:0")];
        assert_eq!(
            allowed_addrs("llm", mixed, &guard).unwrap(),
            vec![sa("192.168.1.20:0")]
        );
        let err = allowed_addrs("llm", vec![sa("203.0.113.9:0")], &guard).unwrap_err();
        assert!(err.contains("allowed_networks"), "{err}");
    }
}
