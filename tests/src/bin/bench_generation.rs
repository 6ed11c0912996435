//! Benchmark (not a test) of distributed generation scaling: records/s with 1, 2, 4, 8 workers
//! against the ideal sum of their capacities (target: efficiency >= 0.9).
//!
//! For every worker count N it starts a fresh cluster of real processes on 127.0.0.1 (a
//! `ragd-coord serve` and N `ragd-worker run`, static peers, no mDNS), each worker with its own
//! in-process Ollama stand-in that answers one request at a time after a fixed latency L. One
//! generation request is made per chunk and every worker runs one lane (default slots), so a
//! worker's capacity is 1/L chunks/s and the cluster's ideal is N/L chunks/s. A corpus of
//! `--chunks` small distinct documents (one chunk each) is submitted with
//! `--llm ollama:MODEL --shard-size S --round-trip-k 0 --max-steps 1`; the generate stage's
//! duration is measured, then the job is cancelled (training is not part of the measurement).
//!
//! The figures include the per-shard overhead of the real system: the task start over QUIC, the
//! coordinator's long poll of the result (the worker answers as soon as the shard ends), the
//! lease and commit in the coordinator's database (SQLite, synchronous), and the 250 ms tick at
//! which the coordinator starts lanes on newly eligible workers.
//!
//! Build the release binaries first (`cargo build --release --workspace --bins`), then:
//!
//! `cargo run --release -p ragd-tests --bin bench_generation -- --workers 1,2,4`
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use ragd_engine::embed::tiny::{write_tiny_model, TinySpec};
use ragd_tests::cluster::{free_udp_port, run, spawn, tail, token_from, Proc, TestCluster};
use ragd_tests::standin::ollama::OllamaStandin;
use ragd_tests::standin::StandinConfig;
use serde_json::Value;

const MODEL: &str = "standin-bench";
const TARGET: f64 = 0.9;

#[derive(Parser, Debug, Clone)]
struct Args {
    /// Worker counts to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    workers: Vec<usize>,
    /// Stand-in latency per request, milliseconds (each stand-in runs one request at a time).
    #[arg(long, default_value_t = 100)]
    latency_ms: u64,
    /// Documents in the corpus (one chunk each).
    #[arg(long, default_value_t = 160)]
    chunks: usize,
    /// Chunks per generation shard.
    #[arg(long, default_value_t = 2)]
    shard_size: usize,
}

/// What one worker count measured.
struct Measured {
    workers: usize,
    chunks: u64,
    shards: u64,
    /// The generate stage's duration from the coordinator's own timestamps.
    stage_secs: f64,
    /// From the first poll that saw generation running to the first that saw every shard done.
    polled_secs: f64,
    /// Shards, queries and summed shard seconds per worker.
    by_worker: Vec<(String, u64, u64, f64)>,
    /// Requests each stand-in answered, and its peak of requests in flight.
    requests: Vec<(usize, usize)>,
}

const ADJ: &[&str] = &[
    "quick", "silent", "heavy", "bright", "narrow", "gentle", "frozen", "hollow",
];
const NOUN: &[&str] = &[
    "river", "engine", "garden", "ledger", "harbor", "castle", "forest", "signal", "market",
    "bridge",
];
const VERB: &[&str] = &["carries", "guards", "feeds", "measures", "shapes"];
const OBJ: &[&str] = &[
    "copper", "timber", "grain", "letters", "silver", "stones", "water", "cattle",
];

/// A short document made of distinct sentences; `i` picks a unique word combination.
fn document(i: usize) -> String {
    let a = ADJ[i % ADJ.len()];
    let n = NOUN[(i / ADJ.len()) % NOUN.len()];
    let v = VERB[(i / (ADJ.len() * NOUN.len())) % VERB.len()];
    let o = OBJ[(i / (ADJ.len() * NOUN.len() * VERB.len())) % OBJ.len()];
    let o2 = OBJ[(i + 3) % OBJ.len()];
    format!(
        "The {a} {n} {v} {o} every morning. Travellers watch the {n} and count the {o2}. Record {i} keeps this story."
    )
}

fn write_inputs(root: &Path, chunks: usize) -> Result<(PathBuf, PathBuf)> {
    let corpus = root.join("corpus");
    std::fs::create_dir_all(&corpus)?;
    let docs: Vec<String> = (0..chunks).map(document).collect();
    for (i, d) in docs.iter().enumerate() {
        std::fs::write(corpus.join(format!("doc{i:04}.md")), d)?;
    }
    let model = root.join("tiny-model");
    let texts: Vec<&str> = docs.iter().map(String::as_str).collect();
    write_tiny_model(
        &model,
        &texts,
        &TinySpec {
            max_positions: 64,
            ..Default::default()
        },
    )?;
    Ok((corpus, model))
}

/// A [`TestCluster`] with the job's inputs.
struct Bench {
    cluster: TestCluster,
    corpus: PathBuf,
    model: PathBuf,
}

impl Bench {
    fn coord(&self, args: &[&str]) -> Result<String> {
        run(self.cluster.coord_cmd().args(args))
    }

    fn show(&self, id: &str) -> Result<Value> {
        Ok(serde_json::from_str(
            &self.coord(&["jobs", "show", id, "--json"])?,
        )?)
    }

    fn coordinator_tail(&self) -> String {
        tail(
            &self
                .cluster
                .coordinator
                .as_ref()
                .map(|c| c.log_text())
                .unwrap_or_default(),
            40,
        )
    }
}

fn stage<'a>(v: &'a Value, name: &str) -> Option<&'a Value> {
    v["stages"].as_array()?.iter().find(|s| s["name"] == name)
}

fn count(v: &Value, state: &str) -> u64 {
    v["tasks"]["generate"][state].as_u64().unwrap_or(0)
}

fn total_shards(v: &Value) -> u64 {
    v["tasks"]["generate"]
        .as_object()
        .map(|m| m.values().filter_map(Value::as_u64).sum())
        .unwrap_or(0)
}

/// Runs one worker count: a fresh cluster, one stand-in per worker.
fn measure(args: &Args, n: usize, standins: &[OllamaStandin]) -> Result<Measured> {
    let mut cluster = TestCluster::new()?;
    // Debug logging of N+1 processes costs CPU on a small machine; the figures need none of it.
    cluster.env = vec![("RUST_LOG".into(), "info".into())];
    let (corpus, model) = write_inputs(cluster.root.path(), args.chunks)?;
    let mut bench = Bench {
        cluster,
        corpus,
        model,
    };
    let ports: Vec<u16> = (0..n).map(|_| free_udp_port()).collect();
    let token = token_from(&bench.coord(&["init", "--id", "coord"])?)?;
    let mut extra: Vec<String> = vec![
        "--no-mdns".into(),
        "--heartbeat-interval".into(),
        "300ms".into(),
    ];
    for p in &ports {
        extra.push("--peer".into());
        extra.push(format!("127.0.0.1:{p}"));
    }
    bench.cluster.start_coordinator(&extra)?;
    for i in 0..n {
        let out = bench.cluster.join(&format!("w{}", i + 1), &token)?;
        if !out.status.success() {
            bail!("join failed: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    let mut workers: Vec<Proc> = Vec::with_capacity(n);
    for (i, (port, standin)) in ports.iter().zip(standins).enumerate() {
        let name = format!("w{}", i + 1);
        let mut cmd = bench.cluster.worker_cmd(&name);
        cmd.args(["--no-mdns", "run", "--listen", &format!("127.0.0.1:{port}")]);
        cmd.env("RAGD_WORKER_LLM__OLLAMA_URL", standin.url());
        workers.push(spawn(
            cmd,
            &bench.cluster.root.path().join(format!("worker-{name}.log")),
        )?);
    }
    bench.cluster.wait_for(
        Duration::from_secs(60),
        "every worker ready with its stand-in listed",
        |c| {
            let ws = c.workers()?;
            Ok(ws
                .iter()
                .filter(|w| {
                    w["state"] == "Ready"
                        && w.pointer("/capabilities/llm_endpoints")
                            .and_then(Value::as_array)
                            .is_none_or(|a| !a.is_empty())
                })
                .count()
                == n)
        },
    )?;

    let (corpus, model) = (
        bench.corpus.display().to_string(),
        bench.model.display().to_string(),
    );
    let llm = format!("ollama:{MODEL}");
    let shard_size = args.shard_size.to_string();
    let out = bench.coord(&[
        "submit",
        "--corpus",
        &corpus,
        "--base-model",
        &model,
        "--chunk-size",
        "40",
        "--chunk-overlap",
        "4",
        "--chunk-min",
        "8",
        "--llm",
        &llm,
        "--shard-size",
        &shard_size,
        "--round-trip-k",
        "0",
        "--max-steps",
        "1",
        "--batch-size",
        "4",
        "--negatives",
        "1",
        "--test-fraction",
        "0.25",
        "--json",
    ])?;
    let v: Value =
        serde_json::from_str(out.trim()).with_context(|| format!("submit said {out:?}"))?;
    let id = v["id"].as_str().context("no job id")?.to_string();

    // Generous bound: the ideal time times ten, plus a minute.
    let ideal_secs = args.chunks as f64 * args.latency_ms as f64 / 1000.0 / n as f64;
    let limit = Duration::from_secs_f64(60.0 + 10.0 * ideal_secs);
    let start = Instant::now();
    let mut first_running: Option<Instant> = None;
    let (v, polled_secs) = loop {
        if start.elapsed() > limit {
            bail!(
                "timed out after {limit:?} waiting for generation\n--- coordinator log ---\n{}",
                bench.coordinator_tail()
            );
        }
        let v = match bench.show(&id) {
            Ok(v) => v,
            Err(_) => {
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let now = Instant::now();
        let gen_state = stage(&v, "generate").map(|s| s["state"].clone());
        if first_running.is_none() && gen_state.as_ref().is_some_and(|s| s == "running") {
            first_running = Some(now);
        }
        let shards = total_shards(&v);
        let all_done = shards > 0 && count(&v, "done") == shards;
        let stage_done = gen_state.as_ref().is_some_and(|s| s == "done");
        if all_done || stage_done {
            let polled = first_running.map_or(f64::NAN, |t| (now - t).as_secs_f64());
            break (v, polled);
        }
        if v["state"] != "running" {
            bail!(
                "job {id} ended ({}) before generation finished: {}",
                v["state"],
                bench.coord(&["logs", &id]).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // The stage's own duration, recorded once it is done (a moment after the last shard).
    let mut v = v;
    let t = Instant::now();
    while stage(&v, "generate").is_none_or(|s| s["state"] != "done") {
        if t.elapsed() > Duration::from_secs(20) {
            bail!(
                "the generate stage never finished: {v}\n--- coordinator log ---\n{}",
                bench.coordinator_tail()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
        v = bench.show(&id)?;
    }
    let stage_secs = stage(&v, "generate")
        .and_then(|s| s["seconds"].as_f64())
        .context("the generate stage has no duration")?;
    let logs = bench.coord(&["logs", &id])?;
    let chunks = logs
        .lines()
        .find_map(|l| {
            let rest = l.split_once("generate: ")?.1;
            let (c, rest) = rest.split_once(" chunks in ")?;
            rest.contains(" shards with ")
                .then(|| c.trim().parse().ok())?
        })
        .with_context(|| format!("no chunk count in the job log:\n{logs}"))?;
    let by_worker = v["generation_by_worker"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|w| {
            (
                w["worker"].as_str().unwrap_or("?").to_string(),
                w["shards"].as_u64().unwrap_or(0),
                w["queries"].as_u64().unwrap_or(0),
                w["seconds"].as_f64().unwrap_or(0.0),
            )
        })
        .collect();
    let shards = total_shards(&v);

    // Training is not measured: cancel and wait (bounded) for the job to stop.
    let _ = bench.coord(&["cancel", &id]);
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(15) {
        match bench.show(&id) {
            Ok(v) if v["state"] != "running" => break,
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    }
    let requests = standins
        .iter()
        .take(n)
        .map(|s| {
            (
                s.state.seen.requests().len(),
                s.state
                    .seen
                    .peak_in_flight
                    .load(std::sync::atomic::Ordering::SeqCst),
            )
        })
        .collect();
    drop(workers);
    drop(bench);
    Ok(Measured {
        workers: n,
        chunks,
        shards,
        stage_secs,
        polled_secs,
        by_worker,
        requests,
    })
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Args::parse();
    if args.workers.is_empty() || args.workers.contains(&0) {
        bail!("--workers needs positive counts");
    }
    let latency = Duration::from_millis(args.latency_ms);
    println!(
        "generation scaling: {} documents, shard size {}, stand-in latency {} ms, one request at a time per stand-in, one lane per worker",
        args.chunks, args.shard_size, args.latency_ms
    );
    println!(
        "seconds = the coordinator's generate stage (its own timestamps); polled = first poll seeing it running to first seeing every shard done (50 ms polls)"
    );
    println!(
        "per-shard overhead is included: task start over QUIC, long poll of the result, lease and commit (SQLite), the 250 ms lane tick"
    );
    let mut results = Vec::new();
    for &n in &args.workers {
        let mut standins = Vec::with_capacity(n);
        for _ in 0..n {
            standins.push(
                OllamaStandin::start(StandinConfig {
                    models: vec![MODEL.into()],
                    latency,
                    max_parallel: 1,
                    max_queue: 64,
                })
                .await?,
            );
        }
        let a = args.clone();
        let (m, standins) =
            tokio::task::spawn_blocking(move || (measure(&a, n, &standins), standins)).await?;
        drop(standins);
        let m = m.with_context(|| format!("measuring {n} workers"))?;
        eprintln!(
            "{n} workers: {} chunks in {:.3}s (polled {:.3}s)",
            m.chunks, m.stage_secs, m.polled_secs
        );
        results.push(m);
    }

    let l = latency.as_secs_f64();
    println!();
    println!(
        "{:>7} {:>6} {:>6} {:>8} {:>8} {:>9} {:>9} {:>10} {:>12} {:>13}",
        "workers",
        "chunks",
        "shards",
        "seconds",
        "polled",
        "chunks/s",
        "ideal/s",
        "efficiency",
        "mean shard s",
        "ideal shard s"
    );
    let mut all_met = true;
    for m in &results {
        let rate = m.chunks as f64 / m.stage_secs;
        let ideal = m.workers as f64 / l;
        let eff = rate / ideal;
        all_met &= eff >= TARGET;
        let (shards, secs) = m
            .by_worker
            .iter()
            .fold((0u64, 0.0f64), |(s, t), w| (s + w.1, t + w.3));
        let mean_shard = if shards > 0 {
            secs / shards as f64
        } else {
            f64::NAN
        };
        let ideal_shard = m.chunks as f64 / m.shards.max(1) as f64 * l;
        println!(
            "{:>7} {:>6} {:>6} {:>8.3} {:>8.3} {:>9.2} {:>9.2} {:>10.3} {:>12.3} {:>13.3}",
            m.workers,
            m.chunks,
            m.shards,
            m.stage_secs,
            m.polled_secs,
            rate,
            ideal,
            eff,
            mean_shard,
            ideal_shard
        );
    }
    if let Some(m) = results.iter().max_by_key(|m| m.workers) {
        println!();
        println!("split at {} workers (shards per worker):", m.workers);
        for (w, shards, queries, secs) in &m.by_worker {
            println!("  {w:>4}: {shards:>3} shards, {queries:>4} queries, {secs:.2}s in shards");
        }
        let reqs: Vec<String> = m
            .requests
            .iter()
            .map(|(r, p)| format!("{r} (peak {p})"))
            .collect();
        println!(
            "  stand-in requests answered (peak in flight): {}",
            reqs.join(", ")
        );
    }
    println!();
    println!(
        "target efficiency >= {TARGET}: {}",
        if all_met {
            "met for every worker count".to_string()
        } else {
            let missed: Vec<String> = results
                .iter()
                .filter(|m| m.chunks as f64 / m.stage_secs / (m.workers as f64 / l) < TARGET)
                .map(|m| m.workers.to_string())
                .collect();
            format!("NOT met for {} worker(s)", missed.join(", "))
        }
    );
    Ok(())
}
