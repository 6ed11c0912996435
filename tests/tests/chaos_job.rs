//! Chaos over a whole job, as separate processes on loopback: a coordinator and two workers with
//! Ollama stand-ins run one job (generation, preparation, training, evaluation, export) while
//! the coordinator and the workers are SIGKILLed at seeded random moments and restarted. The
//! output must be exact: every chunk's questions committed once (one done shard per chunk, each
//! question in the shard of its chunk, no question twice), the model registered and exported
//! once, nothing left beside the export.
//!
//! `RAGD_CHAOS_SEED` replays a run's kill schedule (which process, when, for how long; the seed
//! is printed); `RAGD_CHAOS_ROUNDS` sets the number of kills.

use anyhow::{ensure, Context, Result};
use ragd_shared::protocol::jobs::{Chunk, GeneratedQuery};
use ragd_tests::cluster::{free_udp_port, Proc, TestCluster};
use ragd_tests::jobs::{number_after, write_inputs, Jobs, MODEL};
use ragd_tests::standin::ollama::OllamaStandin;
use ragd_tests::standin::StandinConfig;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

/// The whole test's bound: the job must finish within it, kills included.
const LIMIT: Duration = Duration::from_secs(300);

/// A small seeded generator (xorshift64*), so a failing run can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.next() % (hi - lo))
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_survives_random_kills_with_exact_output() -> Result<()> {
    let mut standins = Vec::new();
    for _ in 0..2 {
        standins.push(
            OllamaStandin::start(StandinConfig {
                models: vec![MODEL.into()],
                latency: Duration::from_millis(300),
                ..Default::default()
            })
            .await?,
        );
    }
    tokio::task::spawn_blocking(move || chaos(standins)).await?
}

/// What a restart needs of the coordinator.
fn coordinator_args(ports: &[u16]) -> Vec<String> {
    let mut extra: Vec<String> = vec![
        "--no-mdns".into(),
        "--heartbeat-interval".into(),
        "300ms".into(),
    ];
    for p in ports {
        extra.push("--peer".into());
        extra.push(format!("127.0.0.1:{p}"));
    }
    extra
}

fn chaos(standins: Vec<OllamaStandin>) -> Result<()> {
    let seed = env_u64("RAGD_CHAOS_SEED", 0x5eed_c4a0);
    let rounds = env_u64("RAGD_CHAOS_ROUNDS", 8);
    eprintln!(
        "chaos seed {seed} (RAGD_CHAOS_SEED={seed} replays the kill schedule), {rounds} rounds"
    );
    let mut rng = Rng(seed.max(1));

    let mut cluster = TestCluster::new()?;
    let (corpus, model) = write_inputs(cluster.root.path());
    let ports: Vec<u16> = (0..2).map(|_| free_udp_port()).collect();
    let token = cluster.init()?;
    let extra = coordinator_args(&ports);
    cluster.start_coordinator(&extra)?;
    for name in ["w1", "w2"] {
        let out = cluster.join(name, &token)?;
        ensure!(
            out.status.success(),
            "join {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut jobs = Jobs {
        cluster,
        corpus,
        model,
        ports,
        standins,
    };
    let mut workers: Vec<Proc> = (0..2)
        .map(|i| jobs.start_worker(i))
        .collect::<Result<_>>()?;
    jobs.cluster
        .wait_for(Duration::from_secs(30), "two ready workers", |c| {
            Ok(c.workers()?
                .iter()
                .filter(|w| w["state"] == "Ready")
                .count()
                == 2)
        })?;

    let out_dir = jobs.cluster.root.path().join("exported");
    let out_arg = out_dir.display().to_string();
    // Every kill may cost the task it hits an attempt (training gets two more than this): enough
    // attempts that the job is not set aside because of the kills themselves.
    let attempts = (rounds + 2).to_string();
    let id = jobs.submit(&[
        "--max-attempts",
        &attempts,
        "--llm",
        &format!("ollama:{MODEL}"),
        "--epochs",
        "300",
        "--checkpoint-every",
        "50",
        "--seed",
        "3",
        "--out",
        &out_arg,
    ])?;

    // Kill and restart at random moments while the job runs.
    let start = Instant::now();
    let mut kills = Vec::new();
    for round in 0..rounds {
        std::thread::sleep(rng.millis(500, 5000));
        if jobs.show(&id).is_ok_and(|v| v["state"] != "running") {
            break;
        }
        let victim = rng.next() % 3;
        let down = rng.millis(100, 1500);
        match victim {
            0 => {
                jobs.cluster
                    .coordinator
                    .as_mut()
                    .context("no coordinator")?
                    .kill9();
                let _ = std::fs::remove_file(jobs.cluster.coord_dir().join("admin.sock"));
                std::thread::sleep(down);
                jobs.cluster.start_coordinator(&extra)?;
            }
            w => {
                let i = (w - 1) as usize;
                workers[i].kill9();
                std::thread::sleep(down);
                workers[i] = jobs.start_worker(i)?;
            }
        }
        let who = ["coordinator", "w1", "w2"][victim as usize];
        eprintln!(
            "round {round}: killed {who} at {:?}, down {down:?}",
            start.elapsed()
        );
        kills.push(who);
    }
    ensure!(
        !kills.is_empty(),
        "the job ended before the first kill: the test exercised nothing"
    );

    let v = jobs.wait_finished(&id, "the job to finish", LIMIT)?;
    let logs = jobs.logs(&id)?;
    eprintln!("--- job ---\n{logs}\nkills: {kills:?}");
    ensure!(
        v["state"] == "succeeded",
        "the job did not succeed: {v}\n{logs}"
    );

    check_shards(&jobs.cluster.coord_dir().join("jobs.db"), &id, &logs)?;
    check_embedding(&jobs.cluster.coord_dir().join("jobs.db"), &id, &logs)?;
    check_export(&jobs, &id, &out_dir)?;
    drop(workers);
    Ok(())
}

/// Every chunk's questions committed once, read from the job database.
fn check_shards(db: &Path, job: &str, logs: &str) -> Result<()> {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let mut st = conn.prepare(
        "SELECT idx, state, payload, output FROM tasks WHERE job_id = ?1 AND stage = 'generate' ORDER BY idx",
    )?;
    let rows: Vec<(i64, String, String, Option<String>)> = st
        .query_map([job], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
        .collect::<Result<_, _>>()?;
    let chunks = number_after(logs, "ingest: ").context("no ingest line")?;
    ensure!(
        rows.len() as u64 == chunks,
        "{} generation shards for {chunks} chunks (shard size 1)",
        rows.len()
    );
    let mut owner: BTreeMap<String, i64> = BTreeMap::new();
    let mut questions: BTreeSet<(String, String)> = BTreeSet::new();
    let mut total = 0u64;
    for (idx, state, payload, output) in rows {
        ensure!(state == "done", "shard {idx} is {state}");
        let shard: Vec<Chunk> = serde_json::from_str(&payload)?;
        for c in &shard {
            ensure!(
                owner.insert(c.id.clone(), idx).is_none(),
                "chunk {} is in two shards",
                c.id
            );
        }
        let out: serde_json::Value =
            serde_json::from_str(output.as_deref().context("a done shard without output")?)?;
        let qs: Vec<GeneratedQuery> = serde_json::from_value(out["questions"].clone())?;
        let answered: BTreeSet<&str> = qs.iter().map(|q| q.chunk_id.as_str()).collect();
        for c in &shard {
            ensure!(
                answered.contains(c.id.as_str()),
                "chunk {} has no question",
                c.id
            );
        }
        for q in qs {
            ensure!(
                shard.iter().any(|c| c.id == q.chunk_id),
                "shard {idx} holds a question of chunk {} that is not its own",
                q.chunk_id
            );
            ensure!(
                questions.insert((q.chunk_id.clone(), q.query.clone())),
                "question {:?} of chunk {} committed twice",
                q.query,
                q.chunk_id
            );
            total += 1;
        }
    }
    let reported = logs
        .lines()
        .filter(|l| l.contains(" questions ("))
        .find_map(|l| l.split_once("generate: "))
        .and_then(|(_, r)| r.split_whitespace().next()?.parse::<u64>().ok())
        .context("no generation summary")?;
    ensure!(
        reported == total,
        "the job reports {reported} questions, its shards hold {total}"
    );
    Ok(())
}

/// The prepare stage's embedding shards: their ranges cover the text list once, every one was
/// committed, and the table the search read held every text.
fn check_embedding(db: &Path, job: &str, logs: &str) -> Result<()> {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let mut st = conn.prepare(
        "SELECT idx, state, payload FROM tasks WHERE job_id = ?1 AND stage = 'embed' ORDER BY idx",
    )?;
    let rows: Vec<(i64, String, String)> = st
        .query_map([job], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<Result<_, _>>()?;
    ensure!(
        !rows.is_empty(),
        "no embedding shard: the workers speak v4, they should embed"
    );
    let mut next = 0u64;
    for (idx, state, payload) in &rows {
        ensure!(state == "done", "embedding shard {idx} is {state}");
        let p: serde_json::Value = serde_json::from_str(payload)?;
        ensure!(
            p["start"].as_u64() == Some(next),
            "embedding shard {idx} starts at {} where {next} was expected",
            p["start"]
        );
        next = p["end"].as_u64().context("a shard without an end")?;
    }
    let summary = logs
        .lines()
        .rev()
        .filter_map(|l| l.split_once("embed: ").map(|(_, r)| r))
        .find(|r| r.contains(" shards in "))
        .context("no embedding summary")?;
    let expected = format!(
        "{next} of {next} texts in {n} of {n} shards",
        n = rows.len()
    );
    ensure!(
        summary.starts_with(&expected),
        "the embedding summary says {summary:?}, expected {expected:?}"
    );
    Ok(())
}

/// The model registered once and exported once, whole, with nothing left beside it.
fn check_export(jobs: &Jobs, job: &str, out_dir: &Path) -> Result<()> {
    let models: serde_json::Value =
        serde_json::from_str(&jobs.coord(&["models", "list", "--json"])?)?;
    let mine: Vec<&serde_json::Value> = models
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| m["id"] == job)
        .collect();
    ensure!(
        mine.len() == 1,
        "the job's model is registered {} times",
        mine.len()
    );
    ensure!(
        Path::new(mine[0]["path"].as_str().unwrap_or_default()) == out_dir,
        "registered at {} instead of --out",
        mine[0]["path"]
    );
    for f in [
        "model.safetensors",
        "config.json",
        "modules.json",
        ".ragd-export.json",
    ] {
        ensure!(out_dir.join(f).is_file(), "{f} missing in the export");
    }
    let parent = out_dir.parent().context("export has no parent")?;
    let name = out_dir.file_name().unwrap_or_default().to_string_lossy();
    let leftovers: Vec<String> = std::fs::read_dir(parent)?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != name.as_ref() && n.contains(name.as_ref()))
        .collect();
    ensure!(
        leftovers.is_empty(),
        "left beside the export: {leftovers:?}"
    );
    Ok(())
}
