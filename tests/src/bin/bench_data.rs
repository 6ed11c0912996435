//! Benchmarks of the data pipeline (not timed tests):
//! 1. generation throughput through the `ollama` backend against the stand-in with a fixed
//!    latency and a concurrency of 4;
//! 2. exact-search mining throughput on random embeddings (the search alone; the comparison
//!    with sentence-transformers' `mine_hard_negatives`, embedding included, is
//!    `cargo run --release -p ragd-engine --example bench_mine`);
//! 3. the built-in generator's tokens/s when a GGUF is given.
//!
//! `cargo run --release -p ragd-tests --bin bench_data -- [--gguf PATH]`
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use ragd_engine::data::chunk::Chunk;
use ragd_engine::data::embed::EmbeddingMatrix;
use ragd_engine::data::llm::builtin::BuiltinBackend;
use ragd_engine::data::llm::generate::{
    GenerateConfig, LlmGenerator, PromptTemplate, QueryGenerator,
};
use ragd_engine::data::llm::ollama::{OllamaBackend, OllamaConfig};
use ragd_engine::data::llm::{LlmBackend, RequestPolicy};
use ragd_engine::data::mine::{mine_hard_negatives, MineConfig, MineInput};
use ragd_tests::standin::ollama::OllamaStandin;
use ragd_tests::standin::StandinConfig;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
struct Args {
    /// Stand-in latency per request, milliseconds.
    #[arg(long, default_value_t = 100)]
    latency_ms: u64,
    /// Chunks to generate for.
    #[arg(long, default_value_t = 40)]
    chunks: usize,
    /// Corpus rows for the mining benchmark.
    #[arg(long, default_value_t = 20_000)]
    corpus: usize,
    /// Queries for the mining benchmark.
    #[arg(long, default_value_t = 20_000)]
    queries: usize,
    /// Embedding width for the mining benchmark.
    #[arg(long, default_value_t = 384)]
    dim: usize,
    /// A GGUF to measure the built-in generator with.
    #[arg(long)]
    gguf: Option<std::path::PathBuf>,
}

fn random_matrix(rows: usize, dim: usize, seed: u64) -> anyhow::Result<EmbeddingMatrix> {
    let mut state = seed;
    let mut next = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 33) as f32 / (1u64 << 31) as f32) - 0.5
    };
    Ok(EmbeddingMatrix::from_rows(
        (0..rows)
            .map(|_| (0..dim).map(|_| next()).collect())
            .collect(),
    )?)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // 1. Generation against the stand-in.
    let latency = Duration::from_millis(args.latency_ms);
    let standin = OllamaStandin::start(StandinConfig {
        latency,
        max_parallel: 4,
        ..Default::default()
    })
    .await?;
    let mut config = OllamaConfig::new("standin");
    config.base_url = standin.url();
    config.policy = RequestPolicy {
        concurrency: 4,
        ..Default::default()
    };
    let backend: Arc<dyn LlmBackend> = Arc::new(OllamaBackend::new(config)?);
    let generator = LlmGenerator::new(
        backend,
        PromptTemplate::default(),
        GenerateConfig {
            concurrency: 4,
            ..Default::default()
        },
    )?;
    let chunks: Vec<Chunk> = (0..args.chunks)
        .map(|i| Chunk {
            id: format!("doc_chunk_{i}"),
            document_id: "doc".into(),
            text: format!("Passage number {i} explains how replication slots retain segments."),
        })
        .collect();
    let start = Instant::now();
    let out = generator
        .generate(&chunks, None, &CancellationToken::new())
        .await?;
    let secs = start.elapsed().as_secs_f64();
    let ideal = args.chunks as f64 * latency.as_secs_f64() / 4.0;
    println!(
        "generation: {} chunks, {} queries in {secs:.2}s = {:.1} chunks/s (ideal at concurrency 4: {ideal:.2}s, efficiency {:.0}%)",
        args.chunks,
        out.queries.len(),
        args.chunks as f64 / secs,
        100.0 * ideal / secs
    );

    // 2. Mining.
    let corpus = random_matrix(args.corpus, args.dim, 1)?;
    let queries = random_matrix(args.queries, args.dim, 2)?;
    let texts: Vec<String> = (0..args.corpus).map(|i| format!("chunk {i}")).collect();
    let rows: Vec<usize> = (0..args.queries).map(|i| i % args.corpus).collect();
    let scores = vec![1.0f32; args.queries];
    let start = Instant::now();
    let mined = tokio::task::spawn_blocking(move || {
        let input = MineInput {
            queries: &queries,
            positive_scores: &scores,
            positive_rows: &rows,
            corpus: &corpus,
            corpus_texts: &texts,
        };
        mine_hard_negatives(
            input,
            &MineConfig::default(),
            None,
            &CancellationToken::new(),
        )
    })
    .await??;
    let secs = start.elapsed().as_secs_f64();
    println!(
        "mining: {} queries x {} chunks x {} dims in {secs:.2}s = {:.0} queries/s ({} negatives)",
        args.queries,
        args.corpus,
        args.dim,
        args.queries as f64 / secs,
        mined.counts.negatives
    );

    // 3. Built-in generator.
    if let Some(path) = args.gguf {
        let backend = tokio::task::spawn_blocking(move || BuiltinBackend::load(&path)).await??;
        let backend: Arc<dyn LlmBackend> = Arc::new(backend);
        let generator = LlmGenerator::new(
            backend.clone(),
            PromptTemplate::default(),
            GenerateConfig {
                concurrency: 1,
                max_tokens: 128,
                ..Default::default()
            },
        )?;
        let start = Instant::now();
        let out = generator
            .generate(
                &chunks[..4.min(chunks.len())],
                None,
                &CancellationToken::new(),
            )
            .await?;
        let stats = backend.stats();
        println!(
            "builtin: {} queries in {:.1}s, {:.1} generated tokens/s ({} tokens)",
            out.queries.len(),
            start.elapsed().as_secs_f64(),
            stats.tokens_per_second,
            stats.completion_tokens
        );
    }
    Ok(())
}
