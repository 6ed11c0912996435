//! mDNS discovery across a simulated LAN: three workers advertise from three network namespaces,
//! a browser in a fourth finds them all, then notices (through `verify`) one that was killed.
//! Runs only inside namespaces it creates (never multicast on the real network); needs root.

use ragd_shared::discovery::{DiscoveredPeer, DiscoveryEvent, DiscoverySource, ServiceKind};
use ragd_shared::protocol::SUPPORTED_VERSIONS;
use ragd_tests::netns::SimLan;
use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader, Write as _};
use std::net::SocketAddr;
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const PROBE: &str = env!("CARGO_BIN_EXE_mdns_probe");
/// Not 5353: exercises the configurable port (the namespaces are isolated either way).
const MDNS_PORT: &str = "5454";

/// Kills and reaps the probes on every exit path (the LAN's Drop would kill them too).
struct Probes(Vec<(String, Child)>);

impl Drop for Probes {
    fn drop(&mut self) {
        for (_, child) in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Reads a child's stdout lines on a thread, so the test can wait with a deadline.
fn line_reader(stdout: std::process::ChildStdout) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn next_event(lines: &mpsc::Receiver<String>, deadline: Instant, what: &str) -> DiscoveryEvent {
    let left = deadline.saturating_duration_since(Instant::now());
    let line = lines.recv_timeout(left).unwrap_or_else(|e| {
        panic!("browser printed nothing more while waiting for {what} ({e}); see its stderr above")
    });
    serde_json::from_str(&line)
        .unwrap_or_else(|e| panic!("browser printed {line:?}, not a discovery event: {e}"))
}

#[test]
fn browser_finds_workers_in_other_namespaces_and_verify_reports_a_killed_one() {
    let lan = SimLan::create(4).unwrap_or_else(|e| panic!("cannot build the simulated LAN: {e:#}"));
    let workers = [
        ("w1", 7401u16, "aa01"),
        ("w2", 7402, "bb02"),
        ("w3", 7403, "cc03"),
    ];
    let mut probes = Probes(Vec::new());
    for (i, (id, port, ca)) in workers.iter().enumerate() {
        let child = lan
            .command(i, PROBE)
            .args([
                "advertise",
                "--id",
                id,
                "--port",
                &port.to_string(),
                "--ca",
                ca,
            ])
            .args(["--for", "120", "--mdns-port", MDNS_PORT])
            // Interface selection by address (w1), by name (w2), default (w3).
            .args(match i {
                0 => vec!["--interface".to_string(), lan.host_addr(0).to_string()],
                1 => vec!["--interface".to_string(), "eth0".to_string()],
                _ => vec![],
            })
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start advertiser {id}: {e}"));
        probes.0.push((id.to_string(), child));
    }
    // Negative control: announced on loopback only, so it must never reach the browser.
    let hidden = lan
        .command(2, PROBE)
        .args([
            "advertise",
            "--id",
            "hidden",
            "--port",
            "7409",
            "--ca",
            "ee05",
        ])
        .args([
            "--for",
            "120",
            "--mdns-port",
            MDNS_PORT,
            "--interface",
            "lo",
        ])
        .stdout(Stdio::null())
        .spawn()
        .expect("cannot start the loopback-only advertiser");
    probes.0.push(("hidden".into(), hidden));
    let mut browser = lan
        .command(3, PROBE)
        .args([
            "browse",
            "--kind",
            "worker",
            "--expect",
            "3",
            "--timeout",
            "30",
        ])
        .args(["--mdns-port", MDNS_PORT, "--lost-from-stdin"])
        .args(["--verify-timeout-ms", "2000", "--verify-every", "3"])
        .args(["--lost-timeout", "60", "--control", "w1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("cannot start the browser");
    let lines = line_reader(browser.stdout.take().expect("piped stdout"));
    let mut browser_stdin = browser.stdin.take().expect("piped stdin");
    probes.0.push(("browser".into(), browser));

    // Phase 1: all three found, with what they announced and an address on their own host.
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut found: BTreeMap<String, DiscoveredPeer> = BTreeMap::new();
    while found.len() < workers.len() {
        if let DiscoveryEvent::Found(peer) = next_event(&lines, deadline, "3 workers") {
            assert_ne!(
                peer.node_id, "hidden",
                "a loopback-only service crossed the LAN"
            );
            found.insert(peer.node_id.clone(), peer);
        }
    }
    for (i, (id, port, ca)) in workers.iter().enumerate() {
        let peer = &found[*id];
        assert_eq!(peer.kind, ServiceKind::Worker, "{peer:?}");
        assert_eq!(peer.source, DiscoverySource::Mdns, "{peer:?}");
        assert_eq!(peer.versions, Some(SUPPORTED_VERSIONS), "{peer:?}");
        assert_eq!(peer.ca_fingerprint.as_deref(), Some(*ca), "{peer:?}");
        let own = SocketAddr::new(lan.host_addr(i), *port);
        assert!(
            peer.addrs.contains(&own),
            "{id} should be reachable at {own}: {peer:?}"
        );
        assert!(peer.addrs.iter().all(|a| a.port() == *port), "{peer:?}");
        for a in peer.addrs.iter().filter(|a| a.is_ipv4()) {
            assert!(
                a.ip() == lan.host_addr(i) || a.ip().is_loopback(),
                "{id} announced another host's address {a}: {peer:?}"
            );
            assert!(lan.contains(a.ip()) || a.ip().is_loopback(), "{a}");
        }
        for a in peer.addrs.iter().filter(|a| a.is_ipv6()) {
            let SocketAddr::V6(v6) = a else {
                unreachable!()
            };
            if v6.ip().is_unicast_link_local() {
                assert_ne!(v6.scope_id(), 0, "link-local without scope id: {peer:?}");
            }
        }
    }

    // Phase 2: kill w2 without a goodbye; verify must report it lost (the TTL is 120 s), while
    // the live w1, verified alongside as a control, must stay (the browser exits 1 otherwise).
    let (_, w2) = probes.0.iter_mut().find(|(id, _)| id == "w2").expect("w2");
    w2.kill().expect("kill w2");
    w2.wait().expect("reap w2");
    let killed_at = Instant::now();
    writeln!(browser_stdin, "w2").expect("tell the browser what to verify");
    browser_stdin.flush().expect("flush");
    let deadline = Instant::now() + Duration::from_secs(70);
    loop {
        match next_event(&lines, deadline, "Lost w2") {
            DiscoveryEvent::Lost { kind, node_id } if node_id == "w2" => {
                assert_eq!(kind, ServiceKind::Worker);
                break;
            }
            DiscoveryEvent::Lost { node_id, .. } => {
                panic!("{node_id} reported lost, but only w2 was killed")
            }
            DiscoveryEvent::Found(peer) => {
                // Address updates of the live peers only.
                assert_ne!(
                    peer.node_id, "hidden",
                    "a loopback-only service crossed the LAN"
                );
            }
        }
    }
    let lost_after = killed_at.elapsed();
    assert!(
        lost_after < Duration::from_secs(60),
        "Lost took {lost_after:?}: that is TTL expiry, not verify"
    );
    let (_, browser) = probes.0.last_mut().expect("browser");
    let status = browser.wait().expect("browser exit");
    assert!(status.success(), "browser exited with {status}");
    drop(probes);
    drop(lan);
}

#[test]
fn shutdown_sends_a_goodbye_that_is_seen_without_verify() {
    let lan = SimLan::create(2).unwrap_or_else(|e| panic!("cannot build the simulated LAN: {e:#}"));
    let mut probes = Probes(Vec::new());
    let advertiser = lan
        .command(0, PROBE)
        .args(["advertise", "--id", "g1", "--port", "7411", "--ca", "dd04"])
        .args(["--for", "120", "--mdns-port", MDNS_PORT])
        .stdout(Stdio::null())
        .spawn()
        .expect("cannot start the advertiser");
    probes.0.push(("g1".into(), advertiser));
    let mut browser = lan
        .command(1, PROBE)
        .args([
            "browse",
            "--kind",
            "worker",
            "--expect",
            "1",
            "--timeout",
            "30",
        ])
        .args(["--mdns-port", MDNS_PORT, "--lost-from-stdin"])
        .args(["--verify-every", "0", "--lost-timeout", "30"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("cannot start the browser");
    let lines = line_reader(browser.stdout.take().expect("piped stdout"));
    let mut browser_stdin = browser.stdin.take().expect("piped stdin");
    probes.0.push(("browser".into(), browser));

    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        if let DiscoveryEvent::Found(peer) = next_event(&lines, deadline, "g1") {
            assert_eq!(peer.node_id, "g1");
            break;
        }
    }
    let (_, advertiser) = &mut probes.0[0];
    let stopped_at = Instant::now();
    let term = std::process::Command::new("kill")
        .args(["-TERM", &advertiser.id().to_string()])
        .status()
        .expect("run kill");
    assert!(term.success(), "kill -TERM failed");
    let status = advertiser.wait().expect("reap the advertiser");
    assert!(
        status.success(),
        "advertiser exited with {status} on SIGTERM"
    );
    writeln!(browser_stdin, "g1").expect("tell the browser what to wait for");
    browser_stdin.flush().expect("flush");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let DiscoveryEvent::Lost { node_id, .. } = next_event(&lines, deadline, "Lost g1") {
            assert_eq!(node_id, "g1");
            break;
        }
    }
    let seen_after = stopped_at.elapsed();
    assert!(
        seen_after < Duration::from_secs(10),
        "the goodbye took {seen_after:?}; without verify only a goodbye explains a quick Lost"
    );
    drop(probes);
    drop(lan);
}

#[test]
fn one_process_fan_out_kind_filter_and_shutdown_close_receivers() {
    let lan = SimLan::create(1).unwrap_or_else(|e| panic!("cannot build the simulated LAN: {e:#}"));
    let out = lan
        .command(0, PROBE)
        .args(["selftest", "--mdns-port", MDNS_PORT])
        .output()
        .expect("run the selftest");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains(r#"{"selftest":"ok"}"#),
        "selftest failed ({}): {}{}",
        out.status,
        stdout,
        String::from_utf8_lossy(&out.stderr)
    );
}
