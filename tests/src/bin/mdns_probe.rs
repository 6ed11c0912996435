//! mDNS probe for the discovery tests: advertises or browses ragd services with
//! [`ragd_shared::discovery::MdnsDiscovery`]. Run it ONLY inside a network namespace (see
//! `ragd_tests::netns`): the mDNS daemon joins the multicast group on every interface it sees.
//!
//! - `mdns_probe advertise --id w1 --port 7400 --ca ab12 [--kind worker] [--for 120]`
//!   advertises, prints `{"advertising": ...}`, then waits for SIGTERM/SIGINT or `--for` seconds
//!   and withdraws the advertisement.
//! - `mdns_probe selftest` checks in one process: fan-out to two subscribers, the kind filter,
//!   and that shutdown closes every receiver.
//! - `mdns_probe browse --kind worker --expect 3 --timeout 20` prints one JSON
//!   [`DiscoveryEvent`] per line; exits 0 once 3 distinct peers were found, 1 on timeout.
//!   With `--lost-from-stdin`, it then reads one node id from stdin, verifies it every
//!   `--verify-every` seconds (0: never) until a `Lost` for it arrives (exit 0) or `--lost-timeout` passes;
//!   `--control ID` peers are verified too and must not be reported lost (exit 1).

use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand};
use ragd_shared::discovery::{
    Advertisement, Discovery, DiscoveryEvent, MdnsConfig, MdnsDiscovery, ServiceKind,
};
use ragd_shared::protocol::SUPPORTED_VERSIONS;
use std::collections::BTreeSet;
use std::time::Duration;
use tokio::io::AsyncBufReadExt as _;
use tokio::time::Instant;

/// Longest any phase may last, in seconds.
const MAX_SECS: u64 = 3600;

#[derive(Parser)]
#[command(about = "Advertise or browse ragd services over mDNS (namespaced tests only)")]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Args)]
struct Common {
    /// mDNS UDP port (all probes of a test must agree).
    #[arg(long)]
    mdns_port: Option<u16>,
    /// Interfaces to use (names or addresses); default all.
    #[arg(long = "interface")]
    interfaces: Vec<String>,
    /// How long `verify` waits for an answer, in milliseconds.
    #[arg(long)]
    verify_timeout_ms: Option<u64>,
}

impl Common {
    fn discovery(&self) -> anyhow::Result<MdnsDiscovery> {
        Ok(MdnsDiscovery::new(&MdnsConfig {
            interfaces: self.interfaces.clone(),
            port: self.mdns_port,
            verify_timeout_ms: self.verify_timeout_ms,
        })?)
    }
}

#[derive(Subcommand)]
enum Mode {
    /// Advertise one service until killed or `--for` seconds.
    Advertise {
        /// Node id (instance name).
        #[arg(long)]
        id: String,
        /// QUIC port to announce.
        #[arg(long)]
        port: u16,
        /// Cluster CA fingerprint, hex.
        #[arg(long)]
        ca: String,
        /// Role to announce: worker or coordinator.
        #[arg(long, default_value = "worker")]
        kind: ServiceKind,
        /// Seconds to stay (at most 3600).
        #[arg(long = "for", default_value_t = 120)]
        for_secs: u64,
        #[command(flatten)]
        common: Common,
    },
    /// In one process: advertise, browse twice, check the fan-out, the kind filter and that
    /// shutdown closes every receiver; prints `{"selftest":"ok"}` or fails.
    Selftest {
        #[command(flatten)]
        common: Common,
    },
    /// Browse and print peers until `--expect` distinct ones were found.
    Browse {
        /// Role to look for: worker or coordinator.
        #[arg(long, default_value = "worker")]
        kind: ServiceKind,
        /// Distinct peers to wait for.
        #[arg(long)]
        expect: usize,
        /// Seconds to wait for them (at most 3600).
        #[arg(long)]
        timeout: u64,
        /// Afterwards read a node id from stdin and wait until it is reported lost, verifying it
        /// every `--verify-every` seconds.
        #[arg(long)]
        lost_from_stdin: bool,
        /// Live peers verified alongside the stdin one; exit 1 if one of them is reported lost.
        #[arg(long = "control")]
        controls: Vec<String>,
        /// Seconds between two verifications; 0 never verifies (waits for a goodbye).
        #[arg(long, default_value_t = 3)]
        verify_every: u64,
        /// Seconds to wait for the `Lost` event (at most 3600).
        #[arg(long, default_value_t = 60)]
        lost_timeout: u64,
        #[command(flatten)]
        common: Common,
    },
}

fn print(value: &impl serde::Serialize) {
    // One line per event; a broken pipe only means the test stopped listening.
    if let Ok(line) = serde_json::to_string(value) {
        println!("{line}");
    }
}

async fn advertise(ad: Advertisement, for_secs: u64, common: Common) -> anyhow::Result<()> {
    let discovery = common.discovery()?;
    discovery.advertise(&ad)?;
    print(&serde_json::json!({ "advertising": ad }));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot listen for SIGTERM")?;
    tokio::select! {
        _ = tokio::time::sleep(Duration::from_secs(for_secs.min(MAX_SECS))) => {}
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    discovery.shutdown().await;
    Ok(())
}

struct BrowseArgs {
    kind: ServiceKind,
    expect: usize,
    timeout: u64,
    lost_from_stdin: bool,
    controls: Vec<String>,
    verify_every: u64,
    lost_timeout: u64,
    verify_timeout_ms: Option<u64>,
}

async fn browse(args: BrowseArgs, common: Common) -> anyhow::Result<()> {
    let discovery = common.discovery()?;
    let result = browse_with(&discovery, &args).await;
    discovery.shutdown().await;
    result
}

async fn browse_with(discovery: &MdnsDiscovery, args: &BrowseArgs) -> anyhow::Result<()> {
    let mut events = discovery.browse(args.kind)?;
    let deadline = Instant::now() + Duration::from_secs(args.timeout.min(MAX_SECS));
    let mut found = BTreeSet::new();
    while found.len() < args.expect {
        let event = match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some(event)) => event,
            Ok(None) => bail!("discovery stopped before {} peers were found", args.expect),
            Err(_) => bail!(
                "timeout: found {} of {} {} peers in {} s ({found:?}); is multicast working \
                 between the namespaces, and do all probes use the same --mdns-port?",
                found.len(),
                args.expect,
                args.kind,
                args.timeout
            ),
        };
        if let DiscoveryEvent::Found(peer) = &event {
            found.insert(peer.node_id.clone());
        }
        print(&event);
    }
    if !args.lost_from_stdin {
        return Ok(());
    }
    let mut line = String::new();
    tokio::io::BufReader::new(tokio::io::stdin())
        .read_line(&mut line)
        .await
        .context("cannot read the node id to verify from stdin")?;
    let target = line.trim().to_string();
    let mut deadline = Instant::now() + Duration::from_secs(args.lost_timeout.min(MAX_SECS));
    let mut tick = tokio::time::interval(Duration::from_secs(args.verify_every.clamp(1, 60)));
    // Once the target is lost, keep watching the controls for one more verification round.
    let mut target_lost = false;
    let grace = Duration::from_millis(common_verify_timeout_ms(args) + 1000);
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => {
                if target_lost {
                    return Ok(());
                }
                bail!(
                    "timeout: {target} was not reported lost within {} s of verifying it",
                    args.lost_timeout
                )
            }
            _ = tick.tick(), if !target_lost && args.verify_every > 0 => {
                for id in std::iter::once(&target).chain(&args.controls) {
                    discovery.verify(args.kind, id).await?;
                }
            }
            event = events.recv() => {
                let Some(event) = event else { bail!("discovery stopped while verifying {target}") };
                print(&event);
                if let DiscoveryEvent::Lost { node_id, .. } = &event {
                    if args.controls.contains(node_id) {
                        bail!("control peer {node_id} was reported lost although it is alive");
                    }
                    if *node_id == target && !target_lost {
                        target_lost = true;
                        deadline = Instant::now() + grace;
                    }
                }
            }
        }
    }
}

/// The verify timeout in effect (the library default is 10 s).
fn common_verify_timeout_ms(args: &BrowseArgs) -> u64 {
    args.verify_timeout_ms.unwrap_or(10_000)
}

/// The next `Found` on `rx` within `secs`, skipping other events.
async fn next_found(
    rx: &mut tokio::sync::mpsc::Receiver<DiscoveryEvent>,
    secs: u64,
    what: &str,
) -> anyhow::Result<ragd_shared::discovery::DiscoveredPeer> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(DiscoveryEvent::Found(peer))) => return Ok(peer),
            Ok(Some(_)) => {}
            Ok(None) => bail!("receiver closed while waiting for {what}"),
            Err(_) => bail!("no Found within {secs} s while waiting for {what}"),
        }
    }
}

/// Whether `rx` closes within 5 s (events still queued are drained first).
async fn closes(rx: &mut tokio::sync::mpsc::Receiver<DiscoveryEvent>) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(_)) => {}
            Ok(None) => return true,
            Err(_) => return false,
        }
    }
}

async fn selftest(common: Common) -> anyhow::Result<()> {
    let d = common.discovery()?;
    let ad = |kind, id: &str, port| Advertisement {
        kind,
        node_id: id.to_string(),
        port,
        versions: SUPPORTED_VERSIONS,
        ca_fingerprint: "0123abcd".into(),
    };
    let mut workers1 = d.browse(ServiceKind::Worker)?;
    d.advertise(&ad(ServiceKind::Worker, "self-w", 7500))?;
    let peer = next_found(&mut workers1, 15, "own worker advertisement").await?;
    if (peer.node_id.as_str(), peer.addrs.first().map(|a| a.port())) != ("self-w", Some(7500)) {
        bail!("first subscriber got {peer:?}, expected self-w on port 7500");
    }
    // A second subscriber of the same kind shares the running query and gets what is known.
    let mut workers2 = d.browse(ServiceKind::Worker)?;
    let snapshot = next_found(&mut workers2, 1, "snapshot for the second subscriber").await?;
    if snapshot.node_id != "self-w" {
        bail!("second subscriber's snapshot is {snapshot:?}, expected self-w");
    }
    // The other kind is a separate query: workers never show up there, and vice versa.
    let mut coords = d.browse(ServiceKind::Coordinator)?;
    d.advertise(&ad(ServiceKind::Coordinator, "self-c", 7600))?;
    let coord = next_found(&mut coords, 15, "own coordinator advertisement").await?;
    if coord.node_id != "self-c" || coord.kind != ServiceKind::Coordinator {
        bail!("coordinator browse got {coord:?}, expected self-c");
    }
    for (name, rx) in [("first", &mut workers1), ("second", &mut workers2)] {
        while let Ok(event) = rx.try_recv() {
            if matches!(&event, DiscoveryEvent::Found(p) if p.kind != ServiceKind::Worker) {
                bail!("{name} worker subscriber got a non-worker: {event:?}");
            }
        }
    }
    // Nobody listens to workers any more: the query stops at the next event, and a later
    // browse starts a fresh one that sees both workers.
    drop(workers1);
    drop(workers2);
    d.advertise(&ad(ServiceKind::Worker, "self-w2", 7501))?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut workers3 = d.browse(ServiceKind::Worker)?;
    let mut seen = BTreeSet::new();
    while seen.len() < 2 {
        seen.insert(
            next_found(&mut workers3, 15, "both workers after a fresh browse")
                .await?
                .node_id,
        );
    }
    if !seen.contains("self-w") || !seen.contains("self-w2") {
        bail!("fresh browse found {seen:?}, expected self-w and self-w2");
    }
    d.shutdown().await;
    for (name, rx) in [("worker", &mut workers3), ("coordinator", &mut coords)] {
        if !closes(rx).await {
            bail!("the {name} receiver did not close after shutdown");
        }
    }
    if d.browse(ServiceKind::Worker).is_ok()
        || d.advertise(&ad(ServiceKind::Worker, "late", 1)).is_ok()
    {
        bail!("browse/advertise after shutdown must fail");
    }
    d.shutdown().await; // idempotent
    print(&serde_json::json!({ "selftest": "ok" }));
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().mode {
        Mode::Advertise {
            id,
            port,
            ca,
            kind,
            for_secs,
            common,
        } => {
            let ad = Advertisement {
                kind,
                node_id: id,
                port,
                versions: SUPPORTED_VERSIONS,
                ca_fingerprint: ca,
            };
            advertise(ad, for_secs, common).await
        }
        Mode::Selftest { common } => selftest(common).await,
        Mode::Browse {
            kind,
            expect,
            timeout,
            lost_from_stdin,
            controls,
            verify_every,
            lost_timeout,
            common,
        } => {
            let args = BrowseArgs {
                kind,
                expect,
                timeout,
                lost_from_stdin,
                controls,
                verify_every,
                lost_timeout,
                verify_timeout_ms: common.verify_timeout_ms,
            };
            browse(args, common).await
        }
    }
}
