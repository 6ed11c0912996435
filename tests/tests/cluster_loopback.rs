//! A coordinator and three workers as separate processes on loopback with static peers:
//! enrol, list, heartbeat; kill -9 a worker: Unreachable within the documented bound; restart
//! it: Ready again under the same id, with no duplicate entry.

use anyhow::Result;
use ragd_tests::cluster::{free_udp_port, run, tail, TestCluster};
use std::time::{Duration, Instant};

/// Heartbeat settings of this test; the documented bound for a dead worker to become
/// Unreachable is (heartbeat_misses + 1) * heartbeat_interval = 4 * 300 ms = 1.2 s.
const HEARTBEAT: &str = "300ms";
const UNREACHABLE_BOUND: Duration = Duration::from_millis(1200);
/// Slack for a loaded 2-core CI machine on top of the bound.
const SLACK: Duration = Duration::from_secs(4);

#[test]
fn three_workers_enrol_heartbeat_die_and_come_back() -> Result<()> {
    let mut cluster = TestCluster::new()?;
    cluster
        .env
        .push(("RAGD_COORD_RECONNECT_MAX".into(), "1s".into()));
    cluster
        .env
        .push(("RAGD_COORD_RECONNECT_INITIAL".into(), "200ms".into()));
    let token = cluster.init()?;

    let names = ["alpha", "bravo", "charlie"];
    let ports: Vec<u16> = names.iter().map(|_| free_udp_port()).collect();
    let mut extra = vec![
        "--no-mdns".to_string(),
        "--heartbeat-interval".into(),
        HEARTBEAT.into(),
    ];
    for p in &ports {
        extra.push("--peer".into());
        extra.push(format!("127.0.0.1:{p}"));
    }
    cluster.start_coordinator(&extra)?;

    for name in names {
        let out = cluster.join(name, &token)?;
        assert!(
            out.status.success(),
            "join {name} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Keys are private.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(cluster.worker_dir("alpha").join("worker.key"))?
        .permissions()
        .mode();
    assert_eq!(
        mode & 0o077,
        0,
        "worker key is readable by others: {mode:o}"
    );

    let no_mdns = vec!["--no-mdns".to_string()];
    let mut workers: Vec<_> = names
        .iter()
        .zip(&ports)
        .map(|(n, p)| cluster.start_worker(n, *p, &no_mdns))
        .collect::<Result<_>>()?;

    cluster.wait_for(Duration::from_secs(30), "three Ready workers", |c| {
        let ws = c.workers()?;
        Ok(ws.len() == 3 && ws.iter().all(|w| w["state"] == "Ready"))
    })?;
    let listed = cluster.workers()?;
    for w in &listed {
        let caps = &w["capabilities"];
        assert!(
            caps["logical_cores"].as_u64().unwrap_or(0) >= 1,
            "no cores reported: {w}"
        );
        assert!(
            caps["total_memory_bytes"].as_u64().unwrap_or(0) > 0,
            "no RAM reported: {w}"
        );
        assert!(
            caps["backends"]
                .as_array()
                .is_some_and(|b| b.iter().any(|b| b == "Cpu")),
            "{w}"
        );
        assert!(w["load"].is_object(), "no heartbeat load yet: {w}");
    }
    let table = run(cluster.coord_cmd().arg("workers"))?;
    for name in names {
        assert!(table.contains(name), "table lacks {name}:\n{table}");
    }
    assert!(table.contains("ready"), "{table}");

    // Heartbeats keep coming: last_seen advances.
    let seen = |c: &TestCluster| -> Result<u64> {
        Ok(c.workers()?
            .iter()
            .find(|w| w["id"] == "bravo")
            .and_then(|w| w["last_seen_ms"].as_u64())
            .unwrap_or(0))
    };
    let first = seen(&cluster)?;
    cluster.wait_for(
        Duration::from_secs(10),
        "a newer heartbeat from bravo",
        |c| Ok(seen(c)? > first),
    )?;

    // kill -9 bravo.
    workers[1].kill9();
    let killed_at = Instant::now();
    cluster.wait_for(
        UNREACHABLE_BOUND + SLACK,
        "bravo to turn Unreachable",
        |c| Ok(c.state_of("bravo")?.as_deref() == Some("Unreachable")),
    )?;
    let took = killed_at.elapsed();
    eprintln!(
        "bravo turned Unreachable {took:?} after kill -9 (documented bound {UNREACHABLE_BOUND:?})"
    );
    assert_eq!(cluster.state_of("alpha")?.as_deref(), Some("Ready"));
    assert_eq!(cluster.state_of("charlie")?.as_deref(), Some("Ready"));

    // Restart it with the same identity: Ready again, same entry.
    workers[1] = cluster.start_worker("bravo", ports[1], &no_mdns)?;
    cluster.wait_for(Duration::from_secs(20), "bravo Ready again", |c| {
        Ok(c.state_of("bravo")?.as_deref() == Some("Ready"))
    })?;
    let ws = cluster.workers()?;
    assert_eq!(ws.len(), 3, "duplicate entries after restart: {ws:?}");

    // A clean shutdown of the coordinator (SIGTERM) ends its process.
    let coord = cluster.coordinator.as_mut().unwrap();
    let pid = coord.child.id().to_string();
    run(std::process::Command::new("kill").args(["-TERM", &pid]))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if coord.child.try_wait()?.is_some() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "coordinator ignored SIGTERM:\n{}",
            tail(&coord.log_text(), 30)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        !cluster.coord_dir().join("admin.sock").exists(),
        "admin socket left behind"
    );
    drop(workers);
    Ok(())
}
