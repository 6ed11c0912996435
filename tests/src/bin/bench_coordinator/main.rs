//! Benchmark (not a test) of the coordinator's per-task overhead: 10,000 no-op tasks over 100
//! simulated workers on loopback, reported as tasks/s and the p99 dispatch latency.
//!
//! One real `ragd-coord serve` process (static peers, one per worker, no mDNS) drives `--workers`
//! workers that live in this process: each is a real worker (`ragd_worker::enrolment::join`, then
//! `ragd_worker::server::run`: its own state directory, key and certificate, QUIC endpoint on
//! 127.0.0.1, mutual TLS, task runner), only sharing one tokio runtime so that a hundred of them
//! fit on a small machine. Ollama probing and mDNS are off and capabilities are detected once.
//!
//! The "no-op" task is a generation shard of one tiny chunk with `--llm ict` (Inverse Cloze Task
//! pseudo-queries: microseconds of work on the worker). A corpus of `--tasks` one-line documents
//! (two short sentences each) is submitted with `--shard-size 1`, so every document is one task.
//! The generate stage is measured, then the job is cancelled (training is not part of it):
//!
//! - tasks/s: shards / the generate stage's wall time, from the first poll that sees the stage
//!   running to the first that sees every shard done (the coordinator's own stage timestamps are
//!   printed too);
//! - dispatch latency: per task, the `seconds` column of the coordinator's `tasks` table (lease to
//!   commit of the completing attempt: from asking for the lease to handing the result to the
//!   database's writer: the lease's batch commit, the task's one `RunTask` round trip over QUIC
//!   (the worker's run and the answer), decoding), read from `jobs.db` after the stage;
//! - the spread of shards over workers (`done_by`), and the CPU time the coordinator process and
//!   this process (all the workers) used during the stage.
//!
//! Progress is polled from `jobs.db` directly (read-only; the coordinator runs SQLite in WAL mode,
//! so readers never block its writer) rather than with `ragd-coord jobs show --json`: that command
//! decodes every shard's output under the coordinator's database lock, which at 10,000 shards
//! would itself slow the dispatch being measured. Each poll is a few index lookups (is any shard
//! pending or leased?), every 10 ms; counting shards by state reads all of them, so that is
//! done only at the stage's end.
//!
//! Build the release binaries first (`cargo build --release --workspace --bins`: what users
//! run), then:
//!
//! `cargo run --release -p ragd-tests --bin bench_coordinator -- --workers 100 --tasks 10000`
//! (`--runs N` measures N stages on the same cluster and prints each figure's range)
//!
//! Caveats: everything shares this machine's cores, so the figures are the coordinator's overhead
//! *plus* the workers' and SQLite's (one writer thread commits leases and results in batches,
//! WAL with `synchronous = NORMAL`); loopback has no network latency; one slot (one lane) per
//! worker, so a hundred tasks are always in flight and the mean latency is about 100 / tasks/s
//! (Little's law); the coordinator starts lanes on a 250 ms tick.
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use futures::{StreamExt, TryStreamExt};
use ragd_engine::embed::tiny::{write_tiny_model, TinySpec};
use ragd_tests::cluster::{binary, free_udp_port, run, tail, token_from, TestCluster};
use ragd_worker::config::WorkerConfig;
use rusqlite::{Connection, OpenFlags};
use serde_json::Value;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

mod observe;
mod report;
use observe::{clock_tick, counts, cpu_secs, job_state, progress, CpuSample};
use report::Measured;

/// How often the stage's progress is polled (index lookups on `jobs.db`, read-only).
const POLL_MS: u64 = 10;
/// The first run's job seed (the CLI's default); run n uses this + n.
const FIRST_SEED: u64 = 42;

#[derive(Parser, Debug, Clone)]
struct Args {
    /// Simulated workers (in this process).
    #[arg(long, default_value_t = 100)]
    workers: usize,
    /// No-op tasks (one document, one chunk, one shard each).
    #[arg(long, default_value_t = 10_000)]
    tasks: usize,
    /// Limit on the generate stage, seconds.
    #[arg(long, default_value_t = 900)]
    timeout: u64,
    /// Generate stages to measure, one job each on the same cluster (each with its own seed:
    /// a job whose inputs are unchanged would reuse the last one's questions); the range of
    /// every figure is printed after the runs.
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// Workers enrolling at once (the coordinator admits 4 unauthenticated connections per
    /// source address, and every simulated worker comes from 127.0.0.1).
    #[arg(long, default_value_t = 4)]
    join_parallel: usize,
}

const ADJ: &[&str] = &[
    "quick", "silent", "heavy", "bright", "narrow", "gentle", "frozen", "hollow",
];
const NOUN: &[&str] = &[
    "river", "engine", "garden", "ledger", "harbor", "castle", "forest", "signal", "market",
    "bridge",
];
const OBJ: &[&str] = &[
    "copper", "timber", "grain", "letters", "silver", "stones", "water", "cattle",
];

/// A one-line document of two sentences of at least five words each (so ICT yields a query);
/// the record number makes every document distinct.
fn document(i: usize) -> String {
    let a = ADJ[i % ADJ.len()];
    let n = NOUN[(i / ADJ.len()) % NOUN.len()];
    let o = OBJ[(i / (ADJ.len() * NOUN.len())) % OBJ.len()];
    let o2 = OBJ[(i + 3) % OBJ.len()];
    format!("The {a} {n} carries {o} at dawn. Record {i} keeps the {o2} safe tonight.")
}

fn write_inputs(root: &Path, n: usize) -> Result<(PathBuf, PathBuf)> {
    let corpus = root.join("corpus");
    std::fs::create_dir_all(&corpus)?;
    let docs: Vec<String> = (0..n).map(document).collect();
    for (i, d) in docs.iter().enumerate() {
        std::fs::write(corpus.join(format!("doc{i:05}.txt")), d)?;
    }
    let model = root.join("tiny-model");
    let texts: Vec<&str> = docs.iter().take(2000).map(String::as_str).collect();
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

/// The coordinator process and its directories.
struct Bench {
    cluster: TestCluster,
}

impl Bench {
    fn coord(&self, args: &[&str]) -> Result<String> {
        run(self.cluster.coord_cmd().args(args))
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

    fn coordinator_pid(&self) -> Option<u32> {
        self.cluster.coordinator.as_ref().map(|c| c.child.id())
    }

    fn workers(&self) -> Result<Vec<Value>> {
        let out = self.coord(&["workers", "--json"])?;
        let v: Value = serde_json::from_str(&out)
            .with_context(|| format!("workers --json printed {out:?}"))?;
        Ok(v.as_array().cloned().unwrap_or_default())
    }

    /// `jobs.db`, opened read-only.
    fn db(&self) -> Result<Connection> {
        let path = self.cluster.coord_dir().join("jobs.db");
        let conn = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .with_context(|| format!("opening {}", path.display()))?;
        conn.busy_timeout(Duration::from_secs(5))?;
        Ok(conn)
    }
}

/// Submits the job and measures its generate stage (runs on a blocking thread).
fn measure(bench: &Bench, args: &Args, corpus: &Path, model: &Path, seed: u64) -> Result<Measured> {
    let (corpus, model) = (corpus.display().to_string(), model.display().to_string());
    let seed = seed.to_string();
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
        "4",
        "--llm",
        "ict",
        "--queries-per-chunk",
        "1",
        "--shard-size",
        "1",
        "--round-trip-k",
        "0",
        "--max-steps",
        "1",
        "--batch-size",
        "4",
        "--negatives",
        "1",
        "--seed",
        &seed,
        "--json",
    ])?;
    let v: Value =
        serde_json::from_str(out.trim()).with_context(|| format!("submit said {out:?}"))?;
    let id = v["id"].as_str().context("no job id")?.to_string();
    eprintln!("submitted job {id}");

    let db = bench.db()?;
    let tick = clock_tick();
    let coord_pid = bench.coordinator_pid().map(|p| p.to_string());
    let cpu = || {
        (
            coord_pid.as_deref().and_then(|p| cpu_secs(p, tick)),
            cpu_secs("self", tick),
        )
    };
    let limit = Duration::from_secs(args.timeout);
    let start = Instant::now();
    let mut first_running: Option<(Instant, CpuSample)> = None;
    let mut last_report = Instant::now();
    let (polled_secs, cpu_end, shards) = loop {
        if start.elapsed() > limit {
            bail!(
                "timed out after {limit:?} waiting for generation\n--- coordinator log ---\n{}",
                bench.coordinator_tail()
            );
        }
        let (stage, any, open) = progress(&db, &id)?;
        let now = Instant::now();
        let running = stage.as_ref().is_some_and(|s| s.0 == "running");
        if first_running.is_none() && running && any {
            first_running = Some((now, cpu()));
            // Not counted here: a count reads every shard, on these cores, as the first wave
            // of leases goes out.
            eprintln!(
                "generate running ({:.1}s after submit)",
                start.elapsed().as_secs_f64()
            );
        }
        let stage_done = stage.as_ref().is_some_and(|s| s.0 == "done");
        if any && (!open || stage_done) {
            let polled = first_running.map_or(f64::NAN, |(t, _)| (now - t).as_secs_f64());
            let shards: u64 = counts(&db, &id)?.values().sum();
            break (polled, cpu(), shards);
        }
        if last_report.elapsed() > Duration::from_secs(10) && any {
            let counts = counts(&db, &id)?;
            eprintln!(
                "  {}/{} done after {:.0}s ({counts:?})",
                counts.get("done").copied().unwrap_or(0),
                counts.values().sum::<u64>(),
                first_running.map_or(0.0, |(t, _)| t.elapsed().as_secs_f64()),
            );
            last_report = Instant::now();
        }
        let (state, error) = job_state(&db, &id)?;
        if state != "running" && state != "queued" && state != "pending" {
            bail!(
                "job {id} ended ({state}: {}) before generation finished\n{}",
                error.unwrap_or_default(),
                bench.coord(&["logs", &id]).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(POLL_MS));
    };
    let cpu_delta = |end: Option<f64>, begin: Option<f64>| end.zip(begin).map(|(e, b)| e - b);
    let (coord_cpu, self_cpu) = match first_running {
        Some((_, (c0, s0))) => (cpu_delta(cpu_end.0, c0), cpu_delta(cpu_end.1, s0)),
        None => (None, None),
    };

    // The stage's own timestamps, recorded once it is done (a moment after the last shard).
    let t = Instant::now();
    let stage_secs = loop {
        let (stage, _, _) = progress(&db, &id)?;
        if let Some((state, Some(a), Some(b))) = &stage {
            if state == "done" {
                break Some((b - a) as f64 / 1000.0);
            }
        }
        if t.elapsed() > Duration::from_secs(30) {
            eprintln!("the generate stage did not record its end within 30s");
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };

    let mut latencies = Vec::new();
    let mut waves = (Vec::new(), Vec::new());
    let mut per_worker: BTreeMap<String, u64> = BTreeMap::new();
    let mut retried = 0;
    let mut set_aside = 0;
    {
        let mut stmt = db.prepare(
            "SELECT state, attempts, done_by, seconds, idx FROM tasks WHERE job_id = ?1 AND stage = 'generate'",
        )?;
        let rows = stmt.query_map([&id], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, Option<String>>(2)?,
                r.get::<_, Option<f64>>(3)?,
                r.get::<_, i64>(4)?,
            ))
        })?;
        for row in rows {
            let (state, attempts, by, secs, idx) = row?;
            if attempts > 1 {
                retried += 1;
            }
            if state != "done" {
                set_aside += 1;
                continue;
            }
            if let Some(s) = secs {
                latencies.push(s);
                if (idx as usize) < args.workers {
                    waves.0.push(s);
                } else {
                    waves.1.push(s);
                }
            }
            *per_worker.entry(by.unwrap_or_default()).or_default() += 1;
        }
    }
    latencies.sort_by(f64::total_cmp);
    waves.0.sort_by(f64::total_cmp);
    waves.1.sort_by(f64::total_cmp);

    // Training is not measured: cancel and wait (bounded) for the job to stop.
    let _ = bench.coord(&["cancel", &id]);
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(20) {
        match job_state(&db, &id) {
            Ok((s, _)) if s != "running" => break,
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    }
    Ok(Measured {
        shards,
        polled_secs,
        stage_secs,
        latencies,
        waves,
        per_worker,
        retried,
        set_aside,
        coord_cpu,
        self_cpu,
    })
}

/// Distinct free UDP ports on 127.0.0.1, none equal to `avoid`.
fn distinct_ports(n: usize, avoid: u16) -> Vec<u16> {
    let mut seen = HashSet::from([avoid]);
    let mut ports = Vec::with_capacity(n);
    while ports.len() < n {
        let p = free_udp_port();
        if seen.insert(p) {
            ports.push(p);
        }
    }
    ports
}

fn worker_config(cluster: &TestCluster, i: usize, port: u16) -> WorkerConfig {
    WorkerConfig {
        // Detected once at start: a hundred periodic re-detections would only add noise.
        capability_refresh: Duration::from_secs(3600),
        ..cluster.in_process_worker(&format!("w{:03}", i + 1), port)
    }
}

/// Runs `f` on a blocking thread (the runtime's threads serve the in-process workers).
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await?
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Args::parse();
    if args.workers == 0 || args.tasks == 0 || args.runs == 0 {
        bail!("--workers, --tasks and --runs must be positive");
    }
    // The in-process workers log here: warnings only unless RUST_LOG says otherwise.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let _ = binary("ragd-coord");

    let t_setup = Instant::now();
    let mut cluster = TestCluster::new()?;
    cluster.env = vec![("RUST_LOG".into(), "warn".into())];
    let root = cluster.root.path().to_path_buf();
    let n = args.tasks;
    let (corpus, model) = blocking(move || write_inputs(&root, n)).await?;
    let ports = distinct_ports(args.workers, cluster.coord_port);
    let token = token_from(&run(cluster.coord_cmd().args(["init", "--id", "coord"]))?)?;
    let mut extra: Vec<String> = vec![
        "--no-mdns".into(),
        "--heartbeat-interval".into(),
        "1s".into(),
    ];
    for p in &ports {
        extra.push("--peer".into());
        extra.push(format!("127.0.0.1:{p}"));
    }
    cluster = blocking(move || {
        cluster.start_coordinator(&extra)?;
        Ok(cluster)
    })
    .await?;
    let bench = Arc::new(Bench { cluster });
    let cfgs: Vec<WorkerConfig> = ports
        .iter()
        .enumerate()
        .map(|(i, &p)| worker_config(&bench.cluster, i, p))
        .collect();

    // Enrol every worker in process (key, CSR, QUIC to the coordinator), a few at a time.
    let t_join = Instant::now();
    futures::stream::iter(cfgs.iter())
        .map(|cfg| {
            let token = token.clone();
            async move {
                tokio::time::timeout(
                    Duration::from_secs(60),
                    ragd_worker::enrolment::join(cfg, &token, false),
                )
                .await
                .with_context(|| format!("{:?} did not enrol within 60s", cfg.name))?
                .with_context(|| format!("enrolling {:?}", cfg.name))
            }
        })
        .buffer_unordered(args.join_parallel.max(1))
        .try_collect::<Vec<_>>()
        .await?;
    let join_secs = t_join.elapsed().as_secs_f64();

    let cancel = CancellationToken::new();
    let mut servers = JoinSet::new();
    for cfg in cfgs {
        let (cancel, name) = (cancel.child_token(), cfg.name.clone().unwrap_or_default());
        servers.spawn(async move { (name, ragd_worker::server::run(cfg, cancel).await) });
    }

    let t_ready = Instant::now();
    let want = args.workers;
    let ready_limit = Duration::from_secs(90 + want as u64);
    let b = bench.clone();
    let ready = blocking(move || {
        let start = Instant::now();
        let mut last = 0;
        while start.elapsed() < ready_limit {
            if let Ok(ws) = b.workers() {
                last = ws.iter().filter(|w| w["state"] == "Ready").count();
                if last == want {
                    return Ok(last);
                }
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        Ok(last)
    })
    .await?;
    if ready != want {
        let mut failed = Vec::new();
        while let Some(Ok((name, res))) = servers.try_join_next() {
            failed.push(format!("{name}: {res:?}"));
        }
        bail!(
            "only {ready} of {want} workers Ready after {ready_limit:?}; ended workers: {failed:?}\n--- coordinator log ---\n{}",
            bench.coordinator_tail()
        );
    }
    let ready_secs = t_ready.elapsed().as_secs_f64();
    eprintln!(
        "setup: {want} workers enrolled in {join_secs:.1}s, all Ready {ready_secs:.1}s later ({:.1}s in all)",
        t_setup.elapsed().as_secs_f64()
    );

    let (b, a) = (bench.clone(), args.clone());
    let measured = blocking(move || {
        let mut runs = Vec::new();
        for run in 0..a.runs {
            let m = measure(&b, &a, &corpus, &model, FIRST_SEED + run as u64)?;
            report::print_run(a.workers, &m);
            runs.push(m);
        }
        Ok(runs)
    })
    .await;

    // Stop the workers (bounded), then the coordinator (killed when the cluster drops).
    cancel.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(15), async {
        while servers.join_next().await.is_some() {}
    })
    .await;
    servers.abort_all();
    let measured = measured?;
    drop(bench);
    if measured.len() > 1 {
        report::print_range(&measured);
    }
    Ok(())
}
