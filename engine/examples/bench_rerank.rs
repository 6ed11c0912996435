//! Reranker training and scoring throughput of this engine against sentence-transformers'
//! CrossEncoder on the same machine in the same run (max length 128, 16 queries x 2 pairs per
//! training batch, scoring 32 pairs per batch):
//!
//! `cargo run --release -p ragd-engine --example bench_rerank -- MODEL_DIR [BEIR_DIR] [PYTHON]`
//!
//! MODEL_DIR is a cross-encoder or an encoder (which gets a new head). BEIR_DIR (default
//! `../shared/data/debfaq`) supplies (title, section) rows with the next section as the
//! negative. PYTHON (default `python3`) runs `scripts/bench_rerank_reference.py`; pass `none` to
//! skip the reference. Steps come from BENCH_STEPS (default 10).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use anyhow::Context as _;

#[path = "common/reference.rs"]
mod reference;
use candle_core::Device;
use ragd_engine::rerank::train::{train_reranker, RerankTrainConfig};
use ragd_engine::rerank::CrossEncoder;
use ragd_engine::train::data::TrainPair;
use ragd_engine::train::{TrainConfig, TrainEvent};

const QUERIES: usize = 16;
const MAX_LEN: usize = 128;

fn load_rows(dir: &Path) -> anyhow::Result<Vec<TrainPair>> {
    let corpus = std::fs::read_to_string(dir.join("corpus.jsonl"))
        .with_context(|| format!("{}: need a BEIR corpus.jsonl", dir.display()))?;
    let docs: Vec<(String, String)> = corpus
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|v| {
            (
                v["title"].as_str().unwrap_or_default().to_string(),
                v["text"].as_str().unwrap_or_default().to_string(),
            )
        })
        .filter(|(t, x)| !t.is_empty() && !x.is_empty())
        .collect();
    let n = docs.len();
    Ok(docs
        .iter()
        .enumerate()
        .map(|(i, (title, text))| TrainPair {
            query: title.clone(),
            positive: text.clone(),
            negatives: vec![docs[(i + 1) % n].1.clone()],
        })
        .collect())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let model_dir = PathBuf::from(
        args.get(1)
            .context("usage: bench_rerank MODEL_DIR [BEIR_DIR] [PYTHON]")?,
    );
    let beir = PathBuf::from(args.get(2).map_or("../shared/data/debfaq", String::as_str));
    let python = args.get(3).cloned().unwrap_or_else(|| "python3".into());
    let steps: usize = std::env::var("BENCH_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let rows = load_rows(&beir)?;
    let tmp = std::env::temp_dir().join(format!("ragd-bench-rerank-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let rows_path = tmp.join("rows.jsonl");
    let mut f = std::fs::File::create(&rows_path)?;
    for r in &rows {
        writeln!(
            f,
            "{}",
            serde_json::json!({"query": r.query, "positive": r.positive, "negatives": r.negatives})
        )?;
    }

    let mut model = CrossEncoder::load_dir(&model_dir, &Device::Cpu, 0)?;
    model.set_max_len(MAX_LEN)?;
    let pairs: Vec<(&str, &str)> = rows
        .iter()
        .flat_map(|r| {
            std::iter::once((r.query.as_str(), r.positive.as_str()))
                .chain(r.negatives.iter().map(|n| (r.query.as_str(), n.as_str())))
        })
        .collect();
    model.predict(&pairs[..32.min(pairs.len())], 32)?;
    let t = Instant::now();
    model.predict(&pairs, 32)?;
    let score_rate = pairs.len() as f64 / t.elapsed().as_secs_f64();

    let cfg = RerankTrainConfig {
        train: TrainConfig {
            batch_size: QUERIES,
            max_seq_len: Some(MAX_LEN),
            max_steps: Some(steps + 2),
            epochs: 1 + (steps + 2) * QUERIES / rows.len().max(1),
            ..RerankTrainConfig::default().train
        },
        ..RerankTrainConfig::default()
    };
    // Two warm-up steps run first; throughput is taken over the last `steps`.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let out = train_reranker(&mut model, &rows, &cfg, &AtomicBool::new(false), Some(&tx))?;
    let per_step = QUERIES * 2;
    let warm_secs = std::iter::from_fn(|| rx.try_recv().ok())
        .find_map(|e| match e {
            TrainEvent::Step(p) if p.step == 2 => Some(2.0 * per_step as f64 / p.pairs_per_sec),
            _ => None,
        })
        .unwrap_or(0.0);
    let all_secs = ((steps + 2) * per_step) as f64 / out.pairs_per_sec;
    let train_rate = (steps * per_step) as f64 / (all_secs - warm_secs).max(1e-9);
    println!(
        "engine: ragd-worker (candle), threads: {}",
        candle_core::utils::get_num_threads()
    );
    println!(
        "  training: {train_rate:.2} pairs/s (last loss {:?})",
        out.losses.last()
    );
    println!(
        "  scoring:  {score_rate:.1} pairs/s over {} pairs",
        pairs.len()
    );

    if python != "none" {
        let (queries, max_len, steps) =
            (QUERIES.to_string(), MAX_LEN.to_string(), steps.to_string());
        let r = reference::run_reference(
            &python,
            "bench_rerank_reference.py",
            &[
                &model_dir,
                &rows_path,
                &"--batch-size",
                &queries,
                &"--max-len",
                &max_len,
                &"--steps",
                &steps,
            ],
        )?;
        let pt_train = r["train_pairs_per_s"].as_f64().unwrap_or(f64::NAN);
        let pt_score = r["score_pairs_per_s"].as_f64().unwrap_or(f64::NAN);
        println!("engine: {}", r["engine"]);
        println!(
            "  training: {pt_train:.2} pairs/s (last loss {})",
            r["last_loss"]
        );
        println!("  scoring:  {pt_score:.1} pairs/s");
        println!(
            "ratio (ragd / PyTorch): training {:.2}x, scoring {:.2}x",
            train_rate / pt_train,
            score_rate / pt_score
        );
    }
    std::fs::remove_dir_all(&tmp).ok();
    Ok(())
}
