//! Benchmark (not a test) of the prepare stage spread over the cluster: the same ICT job on the
//! same corpus with 1, 2 and 4 workers, each a real `ragd-worker run` process on loopback limited
//! to `--threads` compute threads (`RAYON_NUM_THREADS`, which Candle's pool follows), so that a
//! worker stands for a small machine and n workers have n times its cores, up to the cores this
//! machine has: beyond that the workers share cores and the ideal is capped.
//!
//! Per run it prints the prepare stage's wall time (the coordinator's stage timestamps: the
//! embedding shards, the calibration of each worker, then the search, split and mining on the
//! best node), the embedding shards' own time and texts per worker (from the job's log and
//! `jobs show`), and against the one-worker run: the speed-up of the embedding and of the stage,
//! and the ideal (`min(n, cores / threads)`). The job is cancelled once prepare is done.
//!
//! Build the release binaries first (`cargo build --release --workspace --bins`), then
//! `target/release/bench_prepare --model DIR [--corpus BEIR_DIR] [--docs N]`; the model is a
//! sentence-transformers directory (`scripts/fetch-models.sh` puts all-MiniLM-L6-v2 in
//! `models/all-MiniLM-L6-v2`), the corpus a BEIR directory whose `corpus.jsonl` becomes one text
//! file per document (default `../shared/data/debfaq`).
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use ragd_tests::cluster::{free_udp_port, run, tail, TestCluster};
use serde_json::Value;

#[derive(Parser)]
struct Args {
    /// The base model (a sentence-transformers directory).
    #[arg(long)]
    model: PathBuf,
    /// A BEIR directory whose corpus is the job's documents.
    #[arg(long, default_value = "../shared/data/debfaq")]
    corpus: PathBuf,
    /// Use only the first N documents (0: all).
    #[arg(long, default_value_t = 0)]
    docs: usize,
    /// Worker counts to run, in order (the first is the baseline).
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    workers: Vec<usize>,
    /// Compute threads per worker.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Longest wait for one run's prepare stage, in seconds.
    #[arg(long, default_value_t = 3600)]
    timeout_secs: u64,
}

/// What one run measured.
struct RunFigures {
    workers: usize,
    prepare_secs: f64,
    embed_secs: f64,
    texts: u64,
    by_worker: String,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let docs = tempfile::tempdir()?;
    let n_docs = write_documents(&args.corpus, docs.path(), args.docs)?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "bench_prepare: {n_docs} documents of {}, model {}, {} thread(s) per worker, {cores} cores here",
        args.corpus.display(),
        args.model.display(),
        args.threads
    );
    let mut results: Vec<RunFigures> = Vec::new();
    for &n in &args.workers {
        let r = one_run(&args, docs.path(), n)?;
        println!(
            "  {n} worker(s): prepare {:.1} s, embedding shards {:.1} s for {} texts ({})",
            r.prepare_secs, r.embed_secs, r.texts, r.by_worker
        );
        results.push(r);
    }
    let base = &results[0];
    println!(
        "\nworkers  prepare s  embed s  embed speed-up  prepare speed-up  ideal  embed efficiency"
    );
    for r in &results {
        let ideal = (r.workers as f64 / base.workers as f64)
            .min((cores as f64 / args.threads as f64) / base.workers as f64)
            .max(1.0);
        let embed_up = base.embed_secs / r.embed_secs.max(1e-9);
        println!(
            "{:>7}  {:>9.1}  {:>7.1}  {:>13.2}x  {:>15.2}x  {:>4.2}x  {:>15.0}%",
            r.workers,
            r.prepare_secs,
            r.embed_secs,
            embed_up,
            base.prepare_secs / r.prepare_secs.max(1e-9),
            ideal,
            100.0 * embed_up / ideal
        );
    }
    Ok(())
}

/// Writes each document of the BEIR corpus as `DIR/<id>.txt` (title, blank line, text).
fn write_documents(beir: &Path, dir: &Path, limit: usize) -> Result<usize> {
    let path = beir.join("corpus.jsonl");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "cannot read {} (give --corpus a BEIR directory)",
            path.display()
        )
    })?;
    let mut n = 0;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        if limit > 0 && n >= limit {
            break;
        }
        let v: Value = serde_json::from_str(line)?;
        let id: String = v["_id"]
            .as_str()
            .context("a corpus line without _id")?
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let body = format!(
            "{}\n\n{}\n",
            v["title"].as_str().unwrap_or_default(),
            v["text"].as_str().unwrap_or_default()
        );
        std::fs::write(dir.join(format!("{n:05}_{id}.txt")), body)?;
        n += 1;
    }
    if n == 0 {
        bail!("{} has no documents", path.display());
    }
    Ok(n)
}

/// One cluster of `n` workers, one job, until its prepare stage is done.
fn one_run(args: &Args, docs: &Path, n: usize) -> Result<RunFigures> {
    let mut cluster = TestCluster::new()?;
    cluster.env[0].1 = "warn".into();
    let ports: Vec<u16> = (0..n).map(|_| free_udp_port()).collect();
    let token = cluster.init()?;
    cluster.start_coordinator_with_peers(&ports)?;
    let workers = cluster.start_ready_workers(
        &token,
        &ports,
        &[("RAYON_NUM_THREADS", args.threads.to_string())],
    )?;
    let id = cluster.submit(&[
        "--corpus",
        &docs.display().to_string(),
        "--base-model",
        &args.model.display().to_string(),
        "--llm",
        "ict",
    ])?;
    let started = Instant::now();
    let show = |c: &TestCluster| -> Result<Value> {
        let out = run(c.coord_cmd().args(["jobs", "show", &id, "--json"]))?;
        Ok(serde_json::from_str(&out)?)
    };
    let stage = |v: &Value| -> Option<Value> {
        v["stages"]
            .as_array()?
            .iter()
            .find(|s| s["name"] == "prepare")
            .cloned()
    };
    let v = loop {
        let v = show(&cluster)?;
        if stage(&v).is_some_and(|s| s["state"] == "done") {
            break v;
        }
        if v["state"] != "running" || started.elapsed() > Duration::from_secs(args.timeout_secs) {
            let logs = run(cluster.coord_cmd().args(["logs", &id])).unwrap_or_default();
            bail!(
                "the job did not get through prepare ({}):\n{logs}\n{}",
                v["state"],
                tail(
                    &cluster
                        .coordinator
                        .as_ref()
                        .map(|c| c.log_text())
                        .unwrap_or_default(),
                    30
                )
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let logs = run(cluster.coord_cmd().args(["logs", &id]))?;
    let _ = run(cluster.coord_cmd().args(["cancel", &id]));
    let prepare_secs = stage(&v)
        .and_then(|s| s["seconds"].as_f64())
        .context("prepare has no duration")?;
    // "embed: 2950 of 2950 texts in 24 of 24 shards in 95.3 s (w1 1500, w2 1450)"
    let line = logs
        .lines()
        .find_map(|l| {
            l.split_once("embed: ")
                .map(|(_, r)| r.to_string())
                .filter(|r| r.contains(" shards in "))
        })
        .context("no embedding summary in the job log (did any worker embed?)")?;
    let texts = line
        .split_whitespace()
        .next()
        .and_then(|t| t.parse().ok())
        .unwrap_or(0);
    let embed_secs = line
        .split_once(" shards in ")
        .and_then(|(_, r)| r.split_whitespace().next()?.parse().ok())
        .context("no embedding time")?;
    let by_worker = line
        .rsplit_once('(')
        .map(|(_, r)| r.trim_end_matches(')').to_string())
        .unwrap_or_default();
    for mut w in workers {
        w.kill9();
    }
    Ok(RunFigures {
        workers: n,
        prepare_secs,
        embed_secs,
        texts,
        by_worker,
    })
}
