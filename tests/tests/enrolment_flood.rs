//! A flood of peers without a certificate on the coordinator's enrolment endpoint, from a quinn
//! client in this process: 512 connections, each opening up to 64 bidirectional and 16
//! unidirectional streams that announce 16 MiB frames and send one byte, reconnecting for the
//! whole flood, from 8 loopback source addresses; plus one connection sending 200 wrong join
//! proofs. The coordinator must stay within +64 MiB RSS of its memory before any flood; a 3 s
//! warm-up flood pages in what it allocates once (at most +32 MiB), and 10 s after the 15 s
//! flood it must be back within 10 MiB of that baseline (nothing kept per flood); its
//! enrolled worker stays Ready and a real `join` succeeds during the flood; refusals are logged
//! per source, not per stream. And a `join` from an address whose enrolment slots are all
//! taken is refused, tries again and joins once they free up.

use anyhow::{ensure, Context, Result};
use ragd_shared::identity::{self, JoinToken, COORDINATOR_SERVER_NAME};
use ragd_shared::protocol::handshake::{Hello, Role};
use ragd_shared::protocol::messages::{EnrolRequest, Request};
use ragd_shared::transport;
use ragd_tests::cluster::{free_udp_port, TestCluster};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const CONNECTIONS: usize = 512;
const BIDI_STREAMS: usize = 64;
const UNI_STREAMS: usize = 16;
const SOURCES: u8 = 8;
const FLOOD: Duration = Duration::from_secs(15);
const WARM_UP: Duration = Duration::from_secs(3);
const MIB: u64 = 1024 * 1024;

/// Resident memory of a process, from /proc.
fn rss_bytes(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS in /proc status")?;
    Ok(kib * 1024)
}

#[derive(Default)]
struct FloodStats {
    connected: AtomicU64,
    refused: AtomicU64,
    streams: AtomicU64,
}

/// One flooding connection slot: connects, says Hello as an enrollee, opens as many streams as
/// the coordinator lets it (each announcing a 16 MiB frame), and reconnects until `until`.
async fn flood_slot(
    ep: quinn::Endpoint,
    coord: SocketAddr,
    cfg: quinn::ClientConfig,
    until: Instant,
    stats: Arc<FloodStats>,
) {
    let announce = [&(16u32 * 1024 * 1024).to_be_bytes()[..], b"x"].concat();
    while Instant::now() < until {
        let Ok(connecting) = ep.connect_with(cfg.clone(), coord, COORDINATOR_SERVER_NAME) else {
            return;
        };
        let conn = match tokio::time::timeout(Duration::from_secs(2), connecting).await {
            Ok(Ok(c)) => c,
            _ => {
                stats.refused.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        stats.connected.fetch_add(1, Ordering::Relaxed);
        let hello = Hello::new(Role::Enrollee, "flood");
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            transport::client_handshake(&conn, &hello, Duration::from_secs(2)),
        )
        .await;
        let mut held = Vec::new();
        for _ in 0..BIDI_STREAMS {
            match tokio::time::timeout(Duration::from_millis(100), conn.open_bi()).await {
                Ok(Ok((mut send, recv))) => {
                    let _ = send.write_all(&announce).await;
                    stats.streams.fetch_add(1, Ordering::Relaxed);
                    held.push((send, Some(recv)));
                }
                _ => break,
            }
        }
        for _ in 0..UNI_STREAMS {
            match tokio::time::timeout(Duration::from_millis(100), conn.open_uni()).await {
                Ok(Ok(mut send)) => {
                    let _ = send.write_all(&announce).await;
                    stats.streams.fetch_add(1, Ordering::Relaxed);
                    held.push((send, None));
                }
                _ => break,
            }
        }
        // Hold what was opened until the coordinator closes the connection or the flood ends.
        let left = until.saturating_duration_since(Instant::now());
        let _ = tokio::time::timeout(left, conn.closed()).await;
        drop(held);
        conn.close(0u32.into(), b"flood over");
    }
}

/// One connection that sends wrong join proofs, one request stream after another.
async fn wrong_proofs(coord: SocketAddr, token: JoinToken, count: usize) -> usize {
    let ep = quinn::Endpoint::client(SocketAddr::new(
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, 100)),
        0,
    ))
    .expect("client endpoint");
    let cfg = identity::enrolment_client_config(token.ca_fingerprint).expect("client config");
    let Ok(Ok(conn)) = tokio::time::timeout(
        Duration::from_secs(5),
        ep.connect_with(cfg, coord, COORDINATOR_SERVER_NAME)
            .unwrap(),
    )
    .await
    else {
        return 0;
    };
    let hello = Hello::new(Role::Enrollee, "guesser");
    if transport::client_handshake(&conn, &hello, Duration::from_secs(5))
        .await
        .is_err()
    {
        return 0;
    }
    let mut answered = 0;
    for _ in 0..count {
        let req = Request::Enrol(EnrolRequest {
            worker_id: "guesser".into(),
            csr_pem: String::new(),
            proof: [0u8; 32].to_vec(),
        });
        match transport::request(&conn, &req, Duration::from_secs(2)).await {
            Ok(_) | Err(transport::TransportError::Refused { .. }) => answered += 1,
            Err(_) => break,
        }
    }
    answered
}

/// Floods `coord` from [`SOURCES`] loopback addresses with [`CONNECTIONS`] reconnecting slots
/// until `until`.
async fn flood(coord: SocketAddr, token: JoinToken, until: Instant, stats: Arc<FloodStats>) {
    let cfg = identity::enrolment_client_config(token.ca_fingerprint).unwrap();
    let mut slots = tokio::task::JoinSet::new();
    for source in 0..SOURCES {
        let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + source)), 0);
        let ep = quinn::Endpoint::client(addr).expect("client endpoint");
        for _ in 0..CONNECTIONS / SOURCES as usize {
            slots.spawn(flood_slot(
                ep.clone(),
                coord,
                cfg.clone(),
                until,
                stats.clone(),
            ));
        }
    }
    while slots.join_next().await.is_some() {}
}

#[test]
fn an_unauthenticated_flood_stays_within_its_budget() -> Result<()> {
    let mut cluster = TestCluster::new()?;
    let token = cluster.init()?;
    let worker_port = free_udp_port();
    cluster.start_coordinator(&[
        "--no-mdns".into(),
        "--heartbeat-interval".into(),
        "500ms".into(),
        "--peer".into(),
        format!("127.0.0.1:{worker_port}"),
    ])?;
    let out = cluster.join("alpha", &token)?;
    ensure!(
        out.status.success(),
        "join alpha failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _alpha = cluster.start_worker("alpha", worker_port, &["--no-mdns".into()])?;
    cluster.wait_for(Duration::from_secs(30), "alpha Ready", |c| {
        Ok(c.state_of("alpha")?.as_deref() == Some("Ready"))
    })?;
    let pid = cluster
        .coordinator
        .as_ref()
        .context("no coordinator")?
        .child
        .id();
    let parsed: JoinToken = token.parse()?;
    let coord = cluster.coord_addr();
    let rt = tokio::runtime::Runtime::new()?;
    std::thread::sleep(Duration::from_secs(2));
    let cold = rss_bytes(pid)?;
    // A short flood first pages in what the coordinator allocates once and keeps (quinn's
    // receive buffer: max UDP payload x 64 GRO segments x 32 datagrams, 13 MB at 6500 bytes;
    // a longer flood leaves the same); the baseline after it isolates what a flood leaves behind.
    rt.block_on(flood(
        coord,
        parsed.clone(),
        Instant::now() + WARM_UP,
        Arc::default(),
    ));
    std::thread::sleep(Duration::from_secs(10));
    let baseline = rss_bytes(pid)?;

    let stats = Arc::new(FloodStats::default());
    let until = Instant::now() + FLOOD;
    let flood = rt.spawn(flood(coord, parsed, until, stats.clone()));
    let guesses = rt.spawn(wrong_proofs(coord, token.parse()?, 200));

    // During the flood: peak memory, the enrolled worker's state, a real join.
    let mut peak = cold.max(baseline);
    let mut joined = None;
    let mut alpha_states = Vec::new();
    while Instant::now() < until {
        peak = peak.max(rss_bytes(pid)?);
        if joined.is_none() && Instant::now() + FLOOD / 2 > until {
            joined = Some(cluster.join("bravo", &token)?);
            alpha_states.push(cluster.state_of("alpha")?);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    alpha_states.push(cluster.state_of("alpha")?);
    rt.block_on(flood)?;
    let answered = rt.block_on(guesses)?;
    drop(rt);
    std::thread::sleep(Duration::from_secs(10));
    let after = rss_bytes(pid)?;

    let log = cluster.coordinator.as_ref().unwrap().log_text();
    let refusal_lines = log.matches("refused an enrolment peer").count();
    eprintln!(
        "flood: {} connections made, {} refused, {} streams opened; wrong proofs answered: {answered}/200; \
         RSS before any flood {} MiB, after a {} s warm-up flood (baseline) {} MiB, peak {} MiB, \
         10 s after {} MiB; {refusal_lines} refusal log lines",
        stats.connected.load(Ordering::Relaxed),
        stats.refused.load(Ordering::Relaxed),
        stats.streams.load(Ordering::Relaxed),
        cold / MIB,
        WARM_UP.as_secs(),
        baseline / MIB,
        peak / MIB,
        after / MIB,
    );
    let joined = joined.context("the join during the flood did not run")?;
    ensure!(
        joined.status.success(),
        "a real join failed during the flood: {}",
        String::from_utf8_lossy(&joined.stderr)
    );
    ensure!(
        alpha_states.iter().all(|s| s.as_deref() == Some("Ready")),
        "the enrolled worker left Ready during the flood: {alpha_states:?}"
    );
    ensure!(
        stats.connected.load(Ordering::Relaxed) > 0,
        "the flood never connected: the test measured nothing"
    );
    ensure!(
        peak < cold + 64 * MIB,
        "peak RSS {} MiB is more than 64 MiB over the {} MiB before any flood",
        peak / MIB,
        cold / MIB
    );
    ensure!(
        baseline < cold + 32 * MIB,
        "RSS after the warm-up flood is {} MiB, more than 32 MiB over the {} MiB before it",
        baseline / MIB,
        cold / MIB
    );
    ensure!(
        after < baseline + 10 * MIB,
        "RSS 10 s after the flood is {} MiB, more than 10 MiB over the baseline {} MiB",
        after / MIB,
        baseline / MIB
    );
    ensure!(
        answered <= 1,
        "{answered} wrong join proofs were answered on one connection (one request per connection)"
    );
    ensure!(
        refusal_lines <= 4 * (SOURCES as usize + 2),
        "{refusal_lines} refusal log lines: refusals must be logged per source, rate-limited"
    );
    Ok(())
}

#[test]
fn a_join_refused_while_its_address_is_busy_tries_again_and_joins() -> Result<()> {
    let mut cluster = TestCluster::new()?;
    let token = cluster.init()?;
    cluster.start_coordinator(&["--no-mdns".into()])?;
    let parsed: JoinToken = token.parse()?;
    let coord = cluster.coord_addr();
    let rt = tokio::runtime::Runtime::new()?;
    // Take every enrolment slot of 127.0.0.1 (the coordinator admits 4 unauthenticated
    // connections per source) with connections that complete TLS and then say nothing.
    let held = rt.block_on(async {
        let ep = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
        let cfg = identity::enrolment_client_config(parsed.ca_fingerprint)?;
        let mut held = Vec::new();
        for _ in 0..4 {
            let connecting = ep.connect_with(cfg.clone(), coord, COORDINATOR_SERVER_NAME)?;
            held.push(
                connecting
                    .await
                    .context("a holding connection was not admitted")?,
            );
        }
        anyhow::Ok((ep, held))
    })?;
    let mut join = cluster.worker_cmd("late");
    join.args([
        "--no-mdns",
        "join",
        &token,
        "--coordinator",
        &coord.to_string(),
    ])
    .args(["--name", "late"]);
    let child = join
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    // The join's first attempt (and maybe more) meets the full slots; then they free up.
    std::thread::sleep(Duration::from_millis(1500));
    for conn in &held.1 {
        conn.close(0u32.into(), b"done holding");
    }
    let out = child.wait_with_output()?;
    let log = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.success(), "the late join failed: {log}");
    ensure!(
        log.contains("refused the connection") && log.contains("trying again"),
        "the join was never refused, so its retry was not tested: {log}"
    );
    let ids: Vec<String> = cluster
        .workers()?
        .iter()
        .filter_map(|w| w["id"].as_str().map(str::to_string))
        .collect();
    ensure!(
        ids.iter().any(|id| id == "late"),
        "late not enrolled: {ids:?}"
    );
    Ok(())
}
