//! A coordinator and three workers on a simulated LAN of network namespaces, finding each other
//! with mDNS only (no static peers, no --coordinator): workers find the coordinator to enrol,
//! the coordinator finds the workers to dial. A host with a public address is refused by the
//! LAN-only guard. mDNS never runs in the default namespace.

use anyhow::{Context, Result};
use ragd_tests::cluster::{binary, run, spawn, tail, token_from, Proc};
use ragd_tests::netns::SimLan;
use serde_json::Value;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const PUBLIC_ADDR: &str = "198.51.100.5";

fn coord(state: &Path) -> Command {
    let mut c = Command::new(binary("ragd-coord"));
    c.arg("--state-dir").arg(state);
    c
}

fn workers(state: &Path) -> Result<Vec<Value>> {
    let out = run(coord(state).args(["workers", "--json"]))?;
    Ok(serde_json::from_str::<Value>(&out)?
        .as_array()
        .cloned()
        .unwrap_or_default())
}

fn wait(
    timeout: Duration,
    what: &str,
    log: &Proc,
    mut f: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if f().unwrap_or(false) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    anyhow::bail!(
        "timed out after {timeout:?} waiting for {what}\n--- coordinator log ---\n{}",
        tail(&log.log_text(), 60)
    )
}

fn worker_run(lan: &SimLan, host: usize, dir: &Path, logs: &Path) -> Result<Proc> {
    let mut cmd = lan.command(host, binary("ragd-worker"));
    cmd.arg("--state-dir")
        .arg(dir)
        .args(["run", "--listen", "0.0.0.0:7701"]);
    cmd.env("RAGD_WORKER_LLM__OLLAMA_URL", "off");
    spawn(cmd, &logs.join(format!("worker{host}.log")))
}

#[test]
fn workers_and_coordinator_find_each_other_with_mdns_across_namespaces() -> Result<()> {
    let lan = SimLan::create(5).context("creating the simulated LAN")?;
    let tmp = tempfile::tempdir()?;
    let state = tmp.path().join("coordinator");
    let token = token_from(&run(coord(&state).args(["init", "--id", "coord"]))?)?;

    let mut cmd = lan.command(0, binary("ragd-coord"));
    cmd.arg("--state-dir").arg(&state).args([
        "serve",
        "--listen",
        "0.0.0.0:7700",
        "--heartbeat-interval",
        "300ms",
    ]);
    cmd.env("RAGD_COORD_RECONNECT_MAX", "1s");
    let coordinator = spawn(cmd, &tmp.path().join("coordinator.log"))?;
    wait(
        Duration::from_secs(20),
        "the admin socket",
        &coordinator,
        || Ok(state.join("admin.sock").exists()),
    )?;

    // Enrol through mDNS: no coordinator address given.
    let mut procs = Vec::new();
    for host in 1..=3 {
        let dir = tmp.path().join(format!("worker{host}"));
        let mut join = lan.command(host, binary("ragd-worker"));
        join.arg("--state-dir")
            .arg(&dir)
            .args(["join", &token, "--name", &format!("w{host}")]);
        let out = join.output()?;
        anyhow::ensure!(
            out.status.success(),
            "w{host} could not join through mDNS: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            tail(&coordinator.log_text(), 40)
        );
        procs.push(worker_run(&lan, host, &dir, tmp.path())?);
    }

    wait(
        Duration::from_secs(40),
        "three Ready workers found by mDNS",
        &coordinator,
        || {
            let ws = workers(&state)?;
            Ok(ws.len() == 3 && ws.iter().all(|w| w["state"] == "Ready"))
        },
    )?;
    for w in workers(&state)? {
        assert_eq!(w["found_by"], "mdns", "{w}");
        let addr: std::net::SocketAddr = w["addr"].as_str().context("no addr")?.parse()?;
        assert!(
            lan.contains(addr.ip()),
            "{addr} is not on the simulated LAN"
        );
    }

    // kill -9 one worker: Unreachable; restart it: Ready again under the same id.
    procs[1].kill9();
    wait(
        Duration::from_secs(15),
        "w2 Unreachable",
        &coordinator,
        || {
            Ok(workers(&state)?
                .iter()
                .any(|w| w["id"] == "w2" && w["state"] == "Unreachable"))
        },
    )?;
    procs[1] = worker_run(&lan, 2, &tmp.path().join("worker2"), tmp.path())?;
    wait(
        Duration::from_secs(30),
        "w2 Ready again",
        &coordinator,
        || {
            let ws = workers(&state)?;
            Ok(ws.len() == 3 && ws.iter().any(|w| w["id"] == "w2" && w["state"] == "Ready"))
        },
    )?;

    // A job across the namespaces: ICT generation sharded over the three workers, training on
    // the best of them, the model back on the coordinator.
    let corpus = tmp.path().join("corpus");
    std::fs::create_dir_all(&corpus)?;
    let texts: Vec<String> = (0..9)
        .map(|i| {
            format!(
                "Topic {i} starts with a sentence about subject number {i}. The second sentence adds more detail about subject {i}. A third sentence closes the note on subject {i} for good."
            )
        })
        .collect();
    for (i, t) in texts.iter().enumerate() {
        std::fs::write(corpus.join(format!("note{i}.txt")), t)?;
    }
    let model = tmp.path().join("tiny-model");
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    ragd_engine::embed::tiny::write_tiny_model(&model, &refs, &Default::default())?;
    let out = run(coord(&state).args([
        "submit",
        "--corpus",
        &corpus.display().to_string(),
        "--base-model",
        &model.display().to_string(),
        "--llm",
        "ict",
        "--chunk-size",
        "40",
        "--chunk-overlap",
        "4",
        "--chunk-min",
        "8",
        "--shard-size",
        "1",
        "--negatives",
        "1",
        "--round-trip-k",
        "0",
        "--test-fraction",
        "0.3",
        "--batch-size",
        "2",
        "--epochs",
        "2",
        "--json",
    ]))?;
    let id = serde_json::from_str::<Value>(out.trim())?["id"]
        .as_str()
        .context("no job id")?
        .to_string();
    let mut job = Value::Null;
    wait(
        Duration::from_secs(180),
        "the job to end",
        &coordinator,
        || {
            job = serde_json::from_str(&run(coord(&state).args(["jobs", "show", &id, "--json"]))?)?;
            Ok(job["state"] != "running")
        },
    )?;
    let logs = run(coord(&state).args(["logs", &id]))?;
    assert_eq!(job["state"], "succeeded", "{logs}");
    let shards: u64 = job["generation_by_worker"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|w| w["shards"].as_u64())
        .sum();
    assert_eq!(shards, 9, "one shard per note, each committed once: {job}");
    assert!(
        std::path::Path::new(job["model_path"].as_str().unwrap_or_default())
            .join("model.safetensors")
            .is_file()
    );

    // A host with a public address is refused by the coordinator's LAN-only guard.
    let (net, prefix) = lan.subnet();
    lan.run(4, "ip", &["addr", "flush", "dev", "eth0"])?;
    lan.run(
        4,
        "ip",
        &["addr", "add", &format!("{PUBLIC_ADDR}/24"), "dev", "eth0"],
    )?;
    lan.run(
        4,
        "ip",
        &["route", "add", &format!("{net}/{prefix}"), "dev", "eth0"],
    )?;
    lan.run(0, "ip", &["route", "add", "198.51.100.0/24", "dev", "eth0"])?;
    let mut join = lan.command(4, binary("ragd-worker"));
    join.arg("--state-dir")
        .arg(tmp.path().join("public"))
        .args([
            "--no-mdns",
            "join",
            &token,
            "--name",
            "public",
            "--coordinator",
            &format!("{}:7700", lan.host_addr(0)),
        ]);
    let out = join.output()?;
    assert!(
        !out.status.success(),
        "a public-address worker was enrolled"
    );
    let log = coordinator.log_text();
    assert!(
        log.contains(PUBLIC_ADDR)
            && log.contains("refused an enrolment peer")
            && log.contains("not on the local network"),
        "no LAN-guard refusal in the coordinator log:\n{}",
        tail(&log, 30)
    );
    assert_eq!(workers(&state)?.len(), 3);
    Ok(())
}
