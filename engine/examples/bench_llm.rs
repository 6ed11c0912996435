//! Throughput and yield of the built-in question generator: loads a GGUF model with each weight
//! format (`WeightFormat`), asks it for questions about the first passages of a BEIR corpus with
//! the product's own prompt and sampling settings, and prints per format the load time, prompt and
//! decode tokens/s, seconds per request, and how many answers held usable questions (parsed as
//! `generate-data` parses them).
//!
//! `cargo run --release -p ragd-engine --example bench_llm -- GGUF [BEIR_DIR] [REQUESTS] [FORMATS]`
//!
//! BEIR_DIR defaults to `../shared/data/debfaq`, REQUESTS to 12, FORMATS to `q8,f32` (also
//! `stored`: weights as the file stores them). `BENCH_SHOW=1` prints every answer.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use ragd_engine::data::llm::builtin::{BuiltinBackend, BuiltinOptions, WeightFormat};
use ragd_engine::data::llm::generate::{questions_schema, GenerateConfig, PromptTemplate};
use ragd_engine::data::llm::parse::parse_questions;
use ragd_engine::data::llm::{ChatRequest, LlmBackend};

fn main() -> anyhow::Result<()> {
    ragd_engine::device::settle_thread_count();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(run())
}

async fn run() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let gguf = PathBuf::from(
        args.get(1)
            .context("usage: bench_llm GGUF [BEIR_DIR] [REQUESTS] [FORMATS]")?,
    );
    let beir = PathBuf::from(args.get(2).map_or("../shared/data/debfaq", String::as_str));
    let requests: usize = args.get(3).map_or(Ok(12), |s| s.parse())?;
    let formats = args.get(4).map_or("q8,f32", String::as_str);
    let show = std::env::var_os("BENCH_SHOW").is_some();

    let corpus = std::fs::read_to_string(beir.join("corpus.jsonl"))
        .with_context(|| format!("{}: need a BEIR corpus.jsonl", beir.display()))?;
    let passages: Vec<String> = corpus
        .lines()
        .take(requests)
        .map(|l| -> anyhow::Result<String> {
            let v: serde_json::Value = serde_json::from_str(l)?;
            Ok(v["text"].as_str().unwrap_or_default().to_string())
        })
        .collect::<Result<_, _>>()?;

    let config = GenerateConfig::default();
    let template = PromptTemplate::default();
    println!(
        "{} requests, {} questions asked per passage, temperature {}, at most {} tokens",
        passages.len(),
        config.queries_per_chunk,
        config.temperature,
        config.max_tokens
    );
    println!(
        "{:<8} {:>7} {:>9} {:>10} {:>10} {:>8} {:>8} {:>10}",
        "weights", "load s", "prompt/s", "decode/s", "s/request", "usable", "quest.", "not quest."
    );
    for name in formats.split(',') {
        let weights = match name {
            "q8" => WeightFormat::Q8,
            "f32" => WeightFormat::F32,
            "stored" => WeightFormat::AsStored,
            other => bail!("unknown weight format {other:?} (q8, f32, stored)"),
        };
        let t0 = Instant::now();
        let owned = gguf.clone();
        let backend = tokio::task::spawn_blocking(move || {
            BuiltinBackend::load_with(&owned, BuiltinOptions { weights })
        })
        .await??;
        let load = t0.elapsed();
        let (mut prompt_tokens, mut completion_tokens) = (0u64, 0u64);
        let (mut prompt_time, mut decode_time, mut wall) =
            (Duration::ZERO, Duration::ZERO, Duration::ZERO);
        let (mut usable, mut questions, mut dropped) = (0usize, 0usize, 0usize);
        for (i, passage) in passages.iter().enumerate() {
            let req = ChatRequest {
                system: Some(template.system.clone()),
                user: template.render(config.queries_per_chunk, passage),
                schema: Some(questions_schema(config.queries_per_chunk)),
                temperature: config.temperature,
                seed: Some(i as u64),
                max_tokens: config.max_tokens,
            };
            let reply = backend.chat(&req).await?;
            let generation = reply.generation_time.unwrap_or_default();
            prompt_tokens += reply.prompt_tokens.unwrap_or(0);
            completion_tokens += reply.completion_tokens.unwrap_or(0);
            decode_time += generation;
            prompt_time += reply.wall_time.saturating_sub(generation);
            wall += reply.wall_time;
            let parsed = parse_questions(&reply.text);
            if show {
                println!(
                    "--- {name} reply {i} ({} tokens): {}\n    kept: {:?}",
                    reply.completion_tokens.unwrap_or(0),
                    reply.text,
                    parsed.questions
                );
            }
            usable += usize::from(!parsed.questions.is_empty());
            questions += parsed.questions.len();
            dropped += parsed.dropped;
        }
        let rate = |n: u64, t: Duration| n as f64 / t.as_secs_f64().max(1e-9);
        println!(
            "{:<8} {:>7.1} {:>9.0} {:>10.1} {:>10.2} {:>5}/{:<2} {:>8} {:>10}",
            name,
            load.as_secs_f64(),
            rate(prompt_tokens, prompt_time),
            rate(completion_tokens, decode_time),
            wall.as_secs_f64() / passages.len().max(1) as f64,
            usable,
            passages.len(),
            questions,
            dropped
        );
    }
    Ok(())
}
