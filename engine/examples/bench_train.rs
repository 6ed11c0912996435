//! Training and inference throughput of this engine against sentence-transformers on the same
//! machine in the same run (all-MiniLM-L6-v2, batch 32, max length 128):
//!
//! `cargo run --release -p ragd-engine --example bench_train -- MODEL_DIR [BEIR_DIR] [PYTHON]`
//!
//! BEIR_DIR (default `../shared/data/debfaq`) supplies texts: (title, text) pairs for training
//! and the passages for inference. PYTHON (default `python3`) runs
//! `scripts/bench_train_reference.py`; pass `none` to skip the reference. Steps and threads come
//! from BENCH_STEPS (default 10) and the usual RAYON_NUM_THREADS / torch thread count (2).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use anyhow::Context as _;

#[path = "common/reference.rs"]
mod reference;
use candle_core::Device;
use ragd_engine::device::{estimate_training_memory_with, peak_rss_bytes, LayerKernels};
use ragd_engine::embed::SentenceEncoder;
use ragd_engine::train::data::TrainPair;
use ragd_engine::train::{train, TrainConfig};

const BATCH: usize = 32;
const MAX_LEN: usize = 128;

fn load_texts(dir: &Path) -> anyhow::Result<(Vec<TrainPair>, Vec<String>)> {
    let corpus = std::fs::read_to_string(dir.join("corpus.jsonl"))
        .with_context(|| format!("{}: need a BEIR corpus.jsonl", dir.display()))?;
    let mut pairs = Vec::new();
    let mut passages = Vec::new();
    for line in corpus.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line)?;
        let text = v["text"].as_str().unwrap_or_default().to_string();
        let title = v["title"].as_str().unwrap_or_default().to_string();
        if !title.is_empty() && !text.is_empty() {
            pairs.push(TrainPair {
                query: title,
                positive: text.clone(),
                negatives: vec![],
            });
        }
        passages.push(text);
    }
    Ok((pairs, passages))
}

fn write_jsonl(path: &Path, rows: impl Iterator<Item = serde_json::Value>) -> anyhow::Result<()> {
    let mut f = std::fs::File::create(path)?;
    for r in rows {
        writeln!(f, "{r}")?;
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let model = PathBuf::from(
        args.get(1)
            .context("usage: bench_train MODEL_DIR [BEIR_DIR] [PYTHON]")?,
    );
    let beir = PathBuf::from(args.get(2).map_or("../shared/data/debfaq", String::as_str));
    let python = args.get(3).cloned().unwrap_or_else(|| "python3".into());
    let steps: usize = std::env::var("BENCH_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let (pairs, passages) = load_texts(&beir)?;
    let tmp = std::env::temp_dir().join(format!("ragd-bench-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let pairs_path = tmp.join("pairs.jsonl");
    let passages_path = tmp.join("passages.jsonl");
    write_jsonl(
        &pairs_path,
        pairs
            .iter()
            .map(|p| serde_json::json!({"query": p.query, "positive": p.positive})),
    )?;
    write_jsonl(
        &passages_path,
        passages.iter().map(|t| serde_json::json!({"text": t})),
    )?;

    // Inference first, so that its peak RSS is not masked by training's.
    let mut enc = SentenceEncoder::load_dir(&model, &Device::Cpu)?;
    enc.set_max_seq_length(MAX_LEN)?;
    let refs: Vec<&str> = passages.iter().map(String::as_str).collect();
    enc.encode(&refs[..64.min(refs.len())], BATCH)?;
    let t = Instant::now();
    enc.encode(&refs, BATCH)?;
    let infer = refs.len() as f64 / t.elapsed().as_secs_f64();
    let rss_infer = peak_rss_bytes().unwrap_or(0);

    let cfg = TrainConfig {
        batch_size: BATCH,
        max_seq_len: Some(MAX_LEN),
        max_steps: Some(steps + 2),
        epochs: 1 + (steps + 2) * BATCH / pairs.len().max(1),
        ..TrainConfig::default()
    };
    // Two warm-up steps are included in the run; throughput is taken from the last `steps`.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let out = train(&mut enc, &pairs, &cfg, &AtomicBool::new(false), Some(&tx))?;
    let mut times = Vec::new();
    while let Ok(ev) = rx.try_recv() {
        if let ragd_engine::train::TrainEvent::Step(p) = ev {
            times.push((p.step, p.pairs_per_sec));
        }
    }
    let total_pairs = (steps + 2) * BATCH;
    let warm_pairs = 2 * BATCH;
    let rate_all = out.pairs_per_sec;
    let secs_all = total_pairs as f64 / rate_all;
    let secs_warm = times.get(1).map_or(0.0, |(_, r)| warm_pairs as f64 / r);
    let train_rate = (total_pairs - warm_pairs) as f64 / (secs_all - secs_warm).max(1e-9);
    let rss_train = peak_rss_bytes().unwrap_or(0);
    let avg_len = {
        let b = enc.tokenize(&refs[..BATCH.min(refs.len())])?;
        b.input_ids.dim(1)?
    };
    let est = estimate_training_memory_with(
        LayerKernels::FusedCpu,
        enc.bert().config(),
        2 * BATCH,
        avg_len.min(MAX_LEN),
        enc.bert().num_parameters() as u64,
    );
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    println!("engine: ragd-worker (candle), threads: {}", rayon_threads());
    println!(
        "  training:  {train_rate:.2} pairs/s (last loss {:?})",
        out.losses.last()
    );
    println!(
        "  inference: {infer:.1} texts/s over {} passages",
        refs.len()
    );
    println!(
        "  peak RSS: inference {:.2} GiB, training {:.2} GiB",
        gib(rss_infer),
        gib(rss_train)
    );
    println!(
        "  memory estimate for training (64 texts x {} tokens): {:.2} GiB",
        avg_len.min(MAX_LEN),
        gib(est.total)
    );

    if python != "none" {
        let (batch, max_len, steps) = (BATCH.to_string(), MAX_LEN.to_string(), steps.to_string());
        let r = reference::run_reference(
            &python,
            "bench_train_reference.py",
            &[
                &model,
                &pairs_path,
                &passages_path,
                &"--batch-size",
                &batch,
                &"--max-len",
                &max_len,
                &"--steps",
                &steps,
            ],
        )?;
        let pt_train = r["train_pairs_per_s"].as_f64().unwrap_or(f64::NAN);
        let pt_infer = r["infer_texts_per_s"].as_f64().unwrap_or(f64::NAN);
        println!("engine: {}", r["engine"]);
        println!(
            "  training:  {pt_train:.2} pairs/s (last loss {})",
            r["last_loss"]
        );
        println!("  inference: {pt_infer:.1} texts/s");
        println!(
            "  peak RSS: inference {:.2} GiB, training {:.2} GiB",
            gib(r["peak_rss_infer_bytes"].as_u64().unwrap_or(0)),
            gib(r["peak_rss_train_bytes"].as_u64().unwrap_or(0))
        );
        println!(
            "ratio (ragd / PyTorch): training {:.2}x, inference {:.2}x, training memory {:.2}x",
            train_rate / pt_train,
            infer / pt_infer,
            rss_train as f64 / r["peak_rss_train_bytes"].as_f64().unwrap_or(f64::NAN)
        );
    }
    std::fs::remove_dir_all(&tmp).ok();
    Ok(())
}

fn rayon_threads() -> usize {
    candle_core::utils::get_num_threads()
}
