//! Benchmark (not a test) of a large corpus end to end: real Debian documentation (the text files
//! and decompressed changelogs under `/usr/share/doc`) concatenated into documents until the
//! corpus reaches `--sizes` chunks' worth of text, then for each size:
//!
//! 1. `ragd-worker generate-data --llm ict` (one machine): each step's seconds from the manifest
//!    and the process's resident memory sampled every 100 ms, its peak per step (the step windows
//!    are laid end to end back from the process's exit, from the manifest's durations);
//! 2. with `--job`, the same corpus as a cluster job with ICT (a coordinator and two workers on
//!    loopback, training cut to `--max-steps`): each stage's seconds from `jobs show`, and the
//!    peak resident memory (VmHWM) of the coordinator and of each worker.
//!
//! The embedder is a small BERT written here (WordPiece of 8,000 pieces trained on the corpus,
//! 2 layers of 64, 256 positions) unless `--model` gives a real one: on this 2-core machine
//! all-MiniLM-L6-v2 embeds ~20 texts/s, hours for 50,000 chunks and their questions, while the
//! small model keeps every step other than the encoder's arithmetic at its real size. Between
//! sizes it prints each step's growth against the growth of the corpus: linear steps grow like
//! the corpus; the exact search (round trip, mining) grows with queries x chunks, as an exact
//! search must, its memory does not (blocked top-k).
//!
//! `cargo build --release --workspace --bins`, then
//! `target/release/bench_scale --sizes 5000,50000 [--job] [--model DIR]`.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use ragd_engine::embed::tiny::{write_tiny_model, TinySpec};
use ragd_tests::cluster::{binary, free_udp_port, run, Proc, TestCluster};
use serde_json::Value;

#[derive(Parser)]
struct Args {
    /// Corpus sizes in chunks (approximate: text for that many 512-token chunks is gathered).
    #[arg(long, value_delimiter = ',', default_value = "5000,50000")]
    sizes: Vec<usize>,
    /// Where the documentation comes from.
    #[arg(long, default_value = "/usr/share/doc")]
    doc_root: PathBuf,
    /// A sentence-transformers model to embed with instead of the small one written here.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Embed with the lexical hashing embedder (`--embedder hashing`) in generate-data: it keeps
    /// the filter and miner's counts near a real model's, where an untrained small model's round
    /// trip drops most questions.
    #[arg(long)]
    hashing: bool,
    /// Also run each corpus as a cluster job with ICT.
    #[arg(long)]
    job: bool,
    /// Training steps of the job.
    #[arg(long, default_value_t = 20)]
    max_steps: usize,
    /// Bytes of text per chunk, to size the corpus (512 WordPiece tokens of English prose).
    #[arg(long, default_value_t = 2000)]
    bytes_per_chunk: usize,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let root = tempfile::tempdir()?;
    let texts = gather_texts(&args.doc_root)?;
    let total: usize = texts.iter().map(String::len).sum();
    println!(
        "bench_scale: {} files, {:.1} MiB of text under {}",
        texts.len(),
        total as f64 / (1 << 20) as f64,
        args.doc_root.display()
    );
    let model = match &args.model {
        Some(m) => m.clone(),
        None => {
            let dir = root.path().join("model");
            let sample: Vec<&str> = texts.iter().take(2000).map(String::as_str).collect();
            let spec = TinySpec {
                vocab_size: 8000,
                hidden_size: 64,
                layers: 2,
                heads: 4,
                intermediate_size: 128,
                max_positions: 256,
                ..Default::default()
            };
            write_tiny_model(&dir, &sample, &spec)?;
            dir
        }
    };
    let mut previous: Option<(u64, BTreeMap<String, f64>)> = None;
    for &size in &args.sizes {
        let corpus = root.path().join(format!("corpus-{size}"));
        let docs = write_corpus(&texts, &corpus, size * args.bytes_per_chunk)?;
        let (chunks, steps) = generate_data(&corpus, &model, args.hashing, root.path(), size)?;
        println!(
            "\n== {size} chunks asked, {chunks} made from {docs} documents: generate-data --llm ict{}",
            if args.hashing { " --embedder hashing" } else { "" }
        );
        println!(
            "{:<10} {:>9} {:>14}  counts",
            "step", "seconds", "peak RSS MiB"
        );
        for s in &steps {
            println!(
                "{:<10} {:>9.1} {:>14.0}  {}",
                s.name, s.seconds, s.peak_mib, s.counts
            );
        }
        let times: BTreeMap<String, f64> =
            steps.iter().map(|s| (s.name.clone(), s.seconds)).collect();
        if let Some((prev_chunks, prev)) = &previous {
            let growth = chunks as f64 / *prev_chunks as f64;
            println!("growth from {prev_chunks} to {chunks} chunks ({growth:.1}x; quadratic would be {:.0}x):", growth * growth);
            for (name, t) in &times {
                if let Some(p) = prev.get(name).filter(|p| **p > 0.05) {
                    println!("  {name:<10} {:>7.1}x", t / p);
                }
            }
        }
        previous = Some((chunks, times));
        if args.job {
            run_job(&corpus, &model, args.max_steps)?;
        }
    }
    Ok(())
}

/// The readable text files under `root` (plain files and gzip-compressed ones), sorted by path.
fn gather_texts(root: &Path) -> Result<Vec<String>> {
    let mut paths = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            let Ok(meta) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            if meta.is_dir() {
                stack.push(p);
            } else if meta.is_file() && meta.len() > 200 {
                paths.push(p);
            }
        }
    }
    paths.sort();
    let mut out = Vec::new();
    for p in paths {
        let bytes = if p.extension().is_some_and(|e| e == "gz") {
            let o = Command::new("gzip").arg("-dc").arg(&p).output()?;
            if !o.status.success() {
                continue;
            }
            o.stdout
        } else {
            std::fs::read(&p)?
        };
        // Text only: valid UTF-8 without NUL bytes.
        if let Ok(text) = String::from_utf8(bytes) {
            if !text.contains('\0') && text.split_whitespace().count() > 30 {
                out.push(text);
            }
        }
    }
    if out.is_empty() {
        bail!("no text files under {}", root.display());
    }
    Ok(out)
}

/// Writes documents of `texts` (cycled, each document one or more files concatenated to at
/// least 8 KiB) into `dir` until `bytes` are written; returns the number of documents.
fn write_corpus(texts: &[String], dir: &Path, bytes: usize) -> Result<usize> {
    std::fs::create_dir_all(dir)?;
    let (mut written, mut n, mut doc) = (0, 0, String::new());
    for (i, t) in texts.iter().cycle().enumerate() {
        if written >= bytes {
            break;
        }
        doc.push_str(t);
        doc.push_str("\n\n");
        if doc.len() >= 8 << 10 {
            // A cycled file repeats: mark its round so documents stay distinct.
            let round = i / texts.len();
            std::fs::write(
                dir.join(format!("doc{n:06}.txt")),
                format!("Part {round}.\n\n{doc}"),
            )?;
            written += doc.len();
            n += 1;
            doc.clear();
        }
    }
    Ok(n)
}

/// One step of a `generate-data` run.
struct Step {
    name: String,
    seconds: f64,
    peak_mib: f64,
    counts: String,
}

/// Runs `generate-data --llm ict` on `corpus`, sampling its memory; returns the chunk count and
/// its steps.
fn generate_data(
    corpus: &Path,
    model: &Path,
    hashing: bool,
    root: &Path,
    size: usize,
) -> Result<(u64, Vec<Step>)> {
    let embedder = if hashing {
        "hashing".to_string()
    } else {
        format!("model:{}", model.display())
    };
    let out = root.join(format!("data-{size}"));
    let mut child = Command::new(binary("ragd-worker"))
        .args(["generate-data", "--llm", "ict", "--corpus"])
        .arg(corpus)
        .arg("--out")
        .arg(&out)
        .arg("--tokenizer")
        .arg(model.join("tokenizer.json"))
        .arg("--embedder")
        .arg(&embedder)
        .env("RUST_LOG", "warn")
        .spawn()?;
    let started = Instant::now();
    let mut samples: Vec<(f64, f64)> = Vec::new();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if let Some(kib) = status_kib(child.id(), "VmRSS") {
            samples.push((started.elapsed().as_secs_f64(), kib / 1024.0));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let end = started.elapsed().as_secs_f64();
    if !status.success() {
        bail!("generate-data failed on {} ({status})", corpus.display());
    }
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json"))?)?;
    let steps = manifest["steps"]
        .as_array()
        .context("manifest without steps")?;
    // Steps ran one after another and the run ended with the last: lay them out back from the end.
    let mut windows = Vec::new();
    let mut t = end;
    for s in steps.iter().rev() {
        let secs = s[1]["seconds"].as_f64().unwrap_or(0.0);
        windows.push((t - secs, t));
        t -= secs;
    }
    windows.reverse();
    let mut chunks = 0;
    let mut out_steps = Vec::new();
    for (s, (a, b)) in steps.iter().zip(windows) {
        let name = s[0].as_str().unwrap_or("?").to_string();
        let counts = &s[1]["counts"];
        if name == "chunk" {
            chunks = counts["chunks"].as_u64().unwrap_or(0);
        }
        let peak = samples
            .iter()
            .filter(|(at, _)| *at >= a - 0.1 && *at <= b + 0.1)
            .map(|(_, m)| *m)
            .fold(0.0, f64::max);
        out_steps.push(Step {
            name,
            seconds: b - a,
            peak_mib: peak,
            counts: counts.to_string(),
        });
    }
    let overall = samples.iter().map(|(_, m)| *m).fold(0.0, f64::max);
    out_steps.push(Step {
        name: "total".into(),
        seconds: end,
        peak_mib: overall,
        counts: String::new(),
    });
    Ok((chunks, out_steps))
}

/// A field of `/proc/PID/status` in KiB.
fn status_kib(pid: u32, field: &str) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// The corpus as a cluster job with ICT on a coordinator and two workers.
fn run_job(corpus: &Path, model: &Path, max_steps: usize) -> Result<()> {
    let mut cluster = TestCluster::new()?;
    cluster.env[0].1 = "warn".into();
    let ports: Vec<u16> = (0..2).map(|_| free_udp_port()).collect();
    let token = cluster.init()?;
    cluster.start_coordinator_with_peers(&ports)?;
    let workers = cluster.start_ready_workers(&token, &ports, &[])?;
    let id = cluster.submit(&[
        "--corpus",
        &corpus.display().to_string(),
        "--base-model",
        &model.display().to_string(),
        "--llm",
        "ict",
        "--max-steps",
        &max_steps.to_string(),
    ])?;
    let started = Instant::now();
    let v = loop {
        let out = run(cluster.coord_cmd().args(["jobs", "show", &id, "--json"]))?;
        let v: Value = serde_json::from_str(&out)?;
        if v["state"] != "running" {
            break v;
        }
        if started.elapsed() > Duration::from_secs(4 * 3600) {
            bail!("the job did not finish in 4 hours");
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    if v["state"] != "succeeded" {
        let logs = run(cluster.coord_cmd().args(["logs", &id])).unwrap_or_default();
        bail!("the job ended {}:\n{logs}", v["state"]);
    }
    println!(
        "job with ICT ({:.0} s in all):",
        started.elapsed().as_secs_f64()
    );
    for s in v["stages"].as_array().into_iter().flatten() {
        println!(
            "  {:<15} {:>8.1} s  on {}",
            s["name"].as_str().unwrap_or("?"),
            s["seconds"].as_f64().unwrap_or(0.0),
            s["ran_on"].as_str().unwrap_or("-")
        );
    }
    let peak = |p: &Proc| status_kib(p.child.id(), "VmHWM").map_or(0.0, |k| k / 1024.0);
    let coord = cluster.coordinator.as_ref().map_or(0.0, peak);
    let ws: Vec<String> = workers.iter().map(|w| format!("{:.0}", peak(w))).collect();
    println!(
        "  peak RSS: coordinator {coord:.0} MiB, workers {} MiB",
        ws.join(" / ")
    );
    Ok(())
}
