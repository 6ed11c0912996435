//! Admission of peers without a certificate on the enrolment endpoint: what anyone on the LAN
//! can make the coordinator spend before proving it knows the join token.
//!
//! - at most [`AdmissionLimits::max_connections`] such connections at once, and
//!   [`AdmissionLimits::per_source`] from one source (an IPv4 address or an IPv6 /64);
//! - a source that sent [`AdmissionLimits::failed_proofs`] wrong join proofs is refused until
//!   [`AdmissionLimits::failure_window`] has passed since the first of them;
//! - refusals are logged at most once per source per [`AdmissionLimits::log_interval`], with
//!   the number of refusals not logged since.
//!
//! Every table here is bounded ([`AdmissionLimits::tracked_sources`]); time is passed in, so the
//! rules are tested without clocks.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The budget of unauthenticated peers.
#[derive(Debug, Clone)]
pub struct AdmissionLimits {
    /// Connections without a certificate open at once, from everyone.
    pub max_connections: usize,
    /// Such connections open at once from one source.
    pub per_source: usize,
    /// Wrong join proofs from one source before it is refused.
    pub failed_proofs: u32,
    /// How long a source's wrong proofs count against it.
    pub failure_window: Duration,
    /// At most one refusal logged per source in this interval.
    pub log_interval: Duration,
    /// Sources remembered for failures and log suppression (oldest forgotten first).
    pub tracked_sources: usize,
}

impl Default for AdmissionLimits {
    fn default() -> Self {
        Self {
            max_connections: 64,
            per_source: 4,
            failed_proofs: 5,
            failure_window: Duration::from_secs(60),
            log_interval: Duration::from_secs(30),
            tracked_sources: 4096,
        }
    }
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// Every unauthenticated slot is taken.
    #[error("{open} enrolment connections are already open (the limit)")]
    Busy {
        /// Connections open.
        open: usize,
    },
    /// This source has its share open already.
    #[error("{open} enrolment connections from this address are already open (the limit)")]
    SourceBusy {
        /// Connections open from the source.
        open: usize,
    },
    /// This source sent too many wrong join proofs.
    #[error("{failures} wrong join tokens from this address; refused for {retry_in:?}")]
    Throttled {
        /// Wrong proofs counted.
        failures: u32,
        /// How long until the source is admitted again.
        retry_in: Duration,
    },
}

/// The key sources are counted by: the address for IPv4, the /64 network for IPv6 (one host
/// holds a whole /64).
fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

#[derive(Debug, Default)]
struct State {
    open: usize,
    open_by_source: HashMap<IpAddr, usize>,
    failures: HashMap<IpAddr, (Instant, u32)>,
    logged: HashMap<IpAddr, (Instant, u64)>,
}

/// The admission book-keeping, shared by the accept loop and the connections it admits.
#[derive(Debug)]
pub struct Admission {
    limits: AdmissionLimits,
    state: Mutex<State>,
}

/// One admitted connection's slot; dropping it frees the slot.
#[derive(Debug)]
pub struct Permit {
    admission: Arc<Admission>,
    source: IpAddr,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut st = self.admission.lock();
        st.open = st.open.saturating_sub(1);
        if let Some(n) = st.open_by_source.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                st.open_by_source.remove(&self.source);
            }
        }
    }
}

impl Admission {
    /// Book-keeping under `limits`.
    pub fn new(limits: AdmissionLimits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            state: Mutex::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits a connection from `ip` at `now`, or says why not.
    pub fn admit(self: &Arc<Self>, ip: IpAddr, now: Instant) -> Result<Permit, Refused> {
        let source = source_key(ip);
        let mut st = self.lock();
        if let Some(&(first, failures)) = st.failures.get(&source) {
            let elapsed = now.saturating_duration_since(first);
            if elapsed >= self.limits.failure_window {
                st.failures.remove(&source);
            } else if failures >= self.limits.failed_proofs {
                return Err(Refused::Throttled {
                    failures,
                    retry_in: self.limits.failure_window - elapsed,
                });
            }
        }
        if st.open >= self.limits.max_connections {
            return Err(Refused::Busy { open: st.open });
        }
        let from_source = st.open_by_source.get(&source).copied().unwrap_or(0);
        if from_source >= self.limits.per_source {
            return Err(Refused::SourceBusy { open: from_source });
        }
        st.open += 1;
        *st.open_by_source.entry(source).or_default() += 1;
        Ok(Permit {
            admission: self.clone(),
            source,
        })
    }

    /// Counts a wrong join proof from `ip` at `now`.
    pub fn record_failed_proof(&self, ip: IpAddr, now: Instant) {
        let source = source_key(ip);
        let mut st = self.lock();
        let window = self.limits.failure_window;
        let entry = st.failures.entry(source).or_insert((now, 0));
        if now.saturating_duration_since(entry.0) >= window {
            *entry = (now, 0);
        }
        entry.1 += 1;
        let cap = self.limits.tracked_sources;
        bound_table(&mut st.failures, cap, |&(first, _)| first);
    }

    /// Whether a refusal of `ip` at `now` should be logged: `Some(n)` with the refusals of this
    /// source not logged since the last one, or `None` to stay quiet.
    pub fn log_refusal(&self, ip: IpAddr, now: Instant) -> Option<u64> {
        let source = source_key(ip);
        let mut st = self.lock();
        let interval = self.limits.log_interval;
        let decision = match st.logged.get_mut(&source) {
            Some((last, suppressed)) if now.saturating_duration_since(*last) < interval => {
                *suppressed += 1;
                None
            }
            Some((last, suppressed)) => {
                let n = *suppressed;
                *last = now;
                *suppressed = 0;
                Some(n)
            }
            None => {
                st.logged.insert(source, (now, 0));
                Some(0)
            }
        };
        let cap = self.limits.tracked_sources;
        bound_table(&mut st.logged, cap, |&(last, _)| last);
        decision
    }

    /// Connections admitted and still open.
    pub fn open(&self) -> usize {
        self.lock().open
    }
}

/// Forgets the oldest entries (by `stamp`) of a table above `cap` entries, down to 3/4 of it.
fn bound_table<V>(table: &mut HashMap<IpAddr, V>, cap: usize, stamp: impl Fn(&V) -> Instant) {
    if table.len() <= cap {
        return;
    }
    let mut stamps: Vec<Instant> = table.values().map(&stamp).collect();
    stamps.sort_unstable();
    let keep_from = stamps[table.len() - cap * 3 / 4];
    table.retain(|_, v| stamp(v) >= keep_from);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn limits() -> AdmissionLimits {
        AdmissionLimits {
            max_connections: 3,
            per_source: 2,
            failed_proofs: 2,
            failure_window: Duration::from_secs(60),
            log_interval: Duration::from_secs(10),
            tracked_sources: 8,
        }
    }

    #[test]
    fn connections_are_capped_overall_and_per_source_and_freed_on_drop() {
        let a = Admission::new(limits());
        let now = Instant::now();
        let p1 = a.admit(ip("10.0.0.1"), now).unwrap();
        let _p2 = a.admit(ip("10.0.0.1"), now).unwrap();
        assert_eq!(
            a.admit(ip("10.0.0.1"), now).unwrap_err(),
            Refused::SourceBusy { open: 2 }
        );
        let _p3 = a.admit(ip("10.0.0.2"), now).unwrap();
        assert_eq!(
            a.admit(ip("10.0.0.3"), now).unwrap_err(),
            Refused::Busy { open: 3 }
        );
        drop(p1);
        assert_eq!(a.open(), 2);
        a.admit(ip("10.0.0.1"), now).unwrap();
    }

    #[test]
    fn ipv6_sources_are_counted_by_their_slash_64() {
        let a = Admission::new(limits());
        let now = Instant::now();
        let _p1 = a.admit(ip("fd00:1:2:3::1"), now).unwrap();
        let _p2 = a.admit(ip("fd00:1:2:3::ffff"), now).unwrap();
        assert!(matches!(
            a.admit(ip("fd00:1:2:3:abcd::9"), now),
            Err(Refused::SourceBusy { .. })
        ));
        a.admit(ip("fd00:1:2:4::1"), now).unwrap();
    }

    #[test]
    fn wrong_proofs_throttle_the_source_for_the_window_only() {
        let a = Admission::new(limits());
        let t0 = Instant::now();
        a.record_failed_proof(ip("10.0.0.9"), t0);
        drop(a.admit(ip("10.0.0.9"), t0).expect("one failure is allowed"));
        a.record_failed_proof(ip("10.0.0.9"), t0 + Duration::from_secs(1));
        let refused = a
            .admit(ip("10.0.0.9"), t0 + Duration::from_secs(30))
            .unwrap_err();
        assert_eq!(
            refused,
            Refused::Throttled {
                failures: 2,
                retry_in: Duration::from_secs(30)
            }
        );
        // Other sources are unaffected; the window's end lifts it.
        drop(a.admit(ip("10.0.0.10"), t0).unwrap());
        a.admit(ip("10.0.0.9"), t0 + Duration::from_secs(60))
            .unwrap();
    }

    #[test]
    fn refusals_are_logged_once_per_interval_with_the_count_suppressed() {
        let a = Admission::new(limits());
        let t0 = Instant::now();
        assert_eq!(a.log_refusal(ip("10.0.0.1"), t0), Some(0));
        for s in 1..=5 {
            assert_eq!(
                a.log_refusal(ip("10.0.0.1"), t0 + Duration::from_secs(s)),
                None
            );
        }
        assert_eq!(a.log_refusal(ip("10.0.0.2"), t0), Some(0));
        assert_eq!(
            a.log_refusal(ip("10.0.0.1"), t0 + Duration::from_secs(10)),
            Some(5)
        );
    }

    #[test]
    fn the_tables_stay_bounded_under_many_sources() {
        let a = Admission::new(limits());
        let t0 = Instant::now();
        for i in 0..1000u32 {
            let addr = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            let at = t0 + Duration::from_millis(u64::from(i));
            a.record_failed_proof(addr, at);
            a.log_refusal(addr, at);
        }
        let st = a.lock();
        assert!(st.failures.len() <= 8 && st.logged.len() <= 8);
        // The newest sources are the ones remembered.
        assert!(st
            .failures
            .contains_key(&IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + 999))));
    }
}
