//! Hard-negative mining throughput of this engine against sentence-transformers'
//! `mine_hard_negatives` on the same model, queries and corpus, same run, same settings
//! (5 negatives, relative margin 0.05, top sampling, exact search, batch 32). Both sides are
//! timed from texts to negatives: embedding the corpus and the queries, then searching.
//!
//! `cargo run --release -p ragd-engine --example bench_mine -- MODEL_DIR [BEIR_DIR] [PYTHON]`
//!
//! BEIR_DIR (default `../shared/data/debfaq`) gives the corpus (section texts) and the queries:
//! its questions with their judged section, and every section's title with its section. PYTHON
//! (default `python3`) runs `scripts/bench_mine_reference.py`; `none` skips it. Prints chunks/s
//! of each, the ratio, and how many of the mined negatives the two agree on.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context as _;
use candle_core::Device;
use tokio_util::sync::CancellationToken;

#[path = "common/reference.rs"]
mod reference;
use ragd_engine::data::embed::{dot, embed_all, ModelEmbedder};
use ragd_engine::data::mine::{mine_hard_negatives, MineConfig, MineInput};
use ragd_engine::embed::SentenceEncoder;

const NEGATIVES: usize = 5;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let model_dir = PathBuf::from(
        args.get(1)
            .context("usage: bench_mine MODEL_DIR [BEIR_DIR] [PYTHON]")?,
    );
    let beir = PathBuf::from(args.get(2).map_or("../shared/data/debfaq", String::as_str));
    let python = args.get(3).cloned().unwrap_or_else(|| "python3".into());

    // Queries and their positives: the judged questions, then every section's title.
    let raw = std::fs::read_to_string(beir.join("corpus.jsonl"))
        .with_context(|| format!("{}: need a BEIR corpus.jsonl", beir.display()))?;
    let mut corpus: Vec<String> = Vec::new();
    let mut row_of: HashMap<String, usize> = HashMap::new();
    let mut titled: Vec<(String, usize)> = Vec::new();
    for line in raw.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line)?;
        let text = v["text"].as_str().unwrap_or_default().to_string();
        if text.is_empty() {
            continue;
        }
        row_of.insert(
            v["_id"].as_str().unwrap_or_default().to_string(),
            corpus.len(),
        );
        if let Some(title) = v["title"].as_str().filter(|t| !t.is_empty()) {
            titled.push((title.to_string(), corpus.len()));
        }
        corpus.push(text);
    }
    let data = ragd_engine::eval::beir::load(&beir, false)?;
    let mut pairs: Vec<(String, usize)> = Vec::new();
    for (qid, text) in &data.queries {
        if let Some(row) = data
            .qrels
            .get(qid)
            .and_then(|rel| rel.iter().filter_map(|d| row_of.get(d)).min())
        {
            pairs.push((text.clone(), *row));
        }
    }
    // Titles that are also questions are not asked twice (sentence-transformers would merge them).
    let asked: HashSet<String> = pairs.iter().map(|(q, _)| q.clone()).collect();
    pairs.extend(titled.into_iter().filter(|(t, _)| !asked.contains(t)));
    let queries: Vec<String> = pairs.iter().map(|(q, _)| q.clone()).collect();
    let rows: Vec<usize> = pairs.iter().map(|(_, r)| *r).collect();
    println!(
        "data: {} corpus chunks, {} queries ({}), model {}, {} threads",
        corpus.len(),
        queries.len(),
        beir.display(),
        model_dir.display(),
        candle_core::utils::get_num_threads()
    );

    // This engine: load outside the timing, then texts -> negatives.
    let encoder = SentenceEncoder::load_dir(&model_dir, &Device::Cpu)?;
    let embedder = ModelEmbedder::new(encoder, 32, model_dir.display().to_string());
    let cancel = CancellationToken::new();
    embed_all(
        &embedder,
        &corpus[..32.min(corpus.len())],
        32,
        "warm-up",
        None,
        &cancel,
    )?;
    let start = Instant::now();
    let corpus_emb = embed_all(&embedder, &corpus, 32, "corpus", None, &cancel)?;
    let query_emb = embed_all(&embedder, &queries, 32, "queries", None, &cancel)?;
    let embedded = start.elapsed().as_secs_f64();
    let positive_scores: Vec<f32> = rows
        .iter()
        .enumerate()
        .map(|(i, &r)| dot(query_emb.row(i), corpus_emb.row(r)))
        .collect();
    let config = MineConfig {
        num_negatives: NEGATIVES,
        ..MineConfig::default()
    };
    let mined = mine_hard_negatives(
        MineInput {
            queries: &query_emb,
            positive_scores: &positive_scores,
            positive_rows: &rows,
            corpus: &corpus_emb,
            corpus_texts: &corpus,
        },
        &config,
        None,
        &cancel,
    )?;
    let ours = start.elapsed().as_secs_f64();
    let full_rows = mined
        .negatives
        .iter()
        .filter(|n| n.len() == NEGATIVES)
        .count();
    println!(
        "ragd:                  {ours:.2} s ({embedded:.2} s embedding, {:.3} s search) = {:.1} chunks/s, {} of {} queries with {NEGATIVES} negatives",
        ours - embedded,
        corpus.len() as f64 / ours,
        full_rows,
        queries.len()
    );
    if python == "none" {
        return Ok(());
    }

    let tmp = std::env::temp_dir().join(format!("ragd-bench-mine-{}.json", std::process::id()));
    let positives: Vec<&String> = rows.iter().map(|&r| &corpus[r]).collect();
    std::fs::write(
        &tmp,
        serde_json::to_vec(&serde_json::json!({
            "queries": queries, "positives": positives, "corpus": corpus,
        }))?,
    )?;
    let reference = reference::run_reference(
        &python,
        "bench_mine_reference.py",
        &[&model_dir, &tmp, &"--negatives", &NEGATIVES.to_string()],
    );
    let _ = std::fs::remove_file(&tmp);
    let reference = reference?;
    let theirs = reference["seconds"].as_f64().context("reference seconds")?;
    println!(
        "sentence-transformers: {theirs:.2} s = {:.1} chunks/s, {} of {} queries kept",
        corpus.len() as f64 / theirs,
        reference["rows"],
        queries.len()
    );
    println!(
        "ratio (ragd / sentence-transformers throughput): {:.2}x",
        theirs / ours
    );
    // Agreement: the share of their negatives ours also chose, over queries both kept.
    let (mut same, mut total) = (0usize, 0usize);
    for (i, theirs) in reference["negatives"]
        .as_array()
        .context("reference negatives")?
        .iter()
        .enumerate()
    {
        let (Some(theirs), Some(ours)) = (theirs.as_array(), mined.negatives.get(i)) else {
            continue;
        };
        if ours.len() < NEGATIVES {
            continue;
        }
        let ours: HashSet<&str> = ours.iter().map(|h| corpus[h.index].as_str()).collect();
        total += theirs.len();
        same += theirs
            .iter()
            .filter(|t| t.as_str().is_some_and(|t| ours.contains(t)))
            .count();
    }
    println!(
        "agreement: {same} of {total} negatives identical ({:.1}%)",
        100.0 * same as f64 / total.max(1) as f64
    );
    Ok(())
}
