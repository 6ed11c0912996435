//! `ragd-worker generate-data`: the training-data pipeline on one machine.
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use tokio_util::sync::CancellationToken;

use ragd_engine::data::embed::{Embedder, HashingEmbedder, ModelEmbedder};
use ragd_engine::data::llm::builtin::BuiltinBackend;
use ragd_engine::data::llm::generate::{
    GenerateConfig, LlmGenerator, PromptTemplate, QueryGenerator,
};
use ragd_engine::data::llm::ict::{IctConfig, IctGenerator, ReadWindow};
use ragd_engine::data::llm::mixed::{LlmBudget, MixedGenerator};
use ragd_engine::data::llm::ollama::{OllamaBackend, OllamaConfig};
use ragd_engine::data::llm::openai::{OpenAiBackend, OpenAiConfig};
use ragd_engine::data::llm::{LlmBackend, RequestPolicy, RetryPolicy};
use ragd_engine::data::mine::{MineConfig, Sampling};
use ragd_engine::data::pipeline::{run_pipeline, PipelineConfig, PipelineParts};
use ragd_engine::data::split::SplitConfig;
use ragd_engine::data::{
    chunk::ChunkConfig, filter::FilterConfig, ingest::IngestError, ingest::IngestOptions, Progress,
};

/// Negative sampling strategy on the command line.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum SamplingArg {
    /// The hardest candidates.
    Top,
    /// A seeded random sample of the candidates.
    Random,
}

/// Arguments of `generate-data`.
#[derive(Debug, Clone, Args)]
pub struct GenerateDataArgs {
    /// Corpus: a directory of .md/.txt/.rst/.html files and ragd chunk-export .jsonl files.
    #[arg(long)]
    pub corpus: PathBuf,
    /// Output directory (train.jsonl, test/, manifest.json).
    #[arg(long)]
    pub out: PathBuf,
    /// Query generator: `ollama:MODEL`, `openai:URL` (model from --model or the server's
    /// first), `builtin` (the GGUF model of --gguf, in-process), or `ict` (no LLM). Append
    /// `+ict` (`builtin+ict`) to have the LLM write for the chunks `--llm-budget` allows and
    /// ICT cover the rest.
    #[arg(long, default_value = "builtin")]
    pub llm: String,
    /// With `--llm X+ict`: how much the LLM writes, in chunks (`500`) or minutes (`30m`; no
    /// chunk is started after that time).
    #[arg(long, default_value = "30m")]
    pub llm_budget: String,
    /// The built-in generator's model: a GGUF file, a catalogue name (`ragd-worker models
    /// list`) or OWNER/REPO:FILE.gguf, pulled beforehand with `ragd-worker models pull`.
    #[arg(
        long,
        default_value = "models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
    )]
    pub gguf: String,
    /// Model id for `openai:URL`.
    #[arg(long)]
    pub model: Option<String>,
    /// A network `openai:URL` may be in besides the LAN ranges (repeatable, e.g.
    /// `203.0.113.0/24`); the CLI's counterpart of the config's `allowed_networks`. An API key
    /// (RAGD_LLM_API_KEY / OPENAI_API_KEY) is only sent over https or to this machine.
    #[arg(long = "allowed-network", value_name = "CIDR")]
    pub allowed_networks: Vec<ipnet::IpNet>,
    /// Ollama's address (loopback only).
    #[arg(long, default_value = "http://127.0.0.1:11434")]
    pub ollama_url: String,
    /// The base model's tokenizer.json, used for token-aware chunking.
    #[arg(long)]
    pub tokenizer: PathBuf,
    /// Questions per chunk.
    #[arg(long, default_value_t = 2)]
    pub queries_per_chunk: usize,
    /// ICT draws its queries only from the first N tokens of each chunk: what the encoder reads
    /// when trained with `train --max-seq-len N`. 0 draws from whole chunks.
    #[arg(long, default_value_t = 0)]
    pub ict_window: usize,
    /// Share of ICT pairs whose positive keeps the query's sentence (the ICT paper keeps it in
    /// 10%, so the encoder also learns word overlap); 0 always removes it. Between 0 and 1.
    #[arg(long, default_value_t = 0.0, value_parser = parse_probability)]
    pub ict_keep_sentence: f64,
    /// Longest ICT query, in words: a longer sentence gives a random run of this many of its
    /// words (real questions are shorter than most sentences); the whole sentence still leaves
    /// the positive. 0 keeps whole sentences.
    #[arg(long, default_value_t = 0)]
    pub ict_query_words: usize,
    /// Hard negatives per query.
    #[arg(long, default_value_t = 5)]
    pub negatives: usize,
    /// Chunk size in tokens.
    #[arg(long, default_value_t = 512)]
    pub chunk_size: usize,
    /// Chunk overlap in tokens.
    #[arg(long, default_value_t = 50)]
    pub chunk_overlap: usize,
    /// Minimum chunk size in tokens.
    #[arg(long, default_value_t = 100)]
    pub chunk_min: usize,
    /// Share of chunks held out as the test set.
    #[arg(long, default_value_t = 0.1)]
    pub test_fraction: f64,
    /// Seed for generation, splitting and sampling.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// LLM requests in flight at once.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// Timeout of one LLM request, in seconds.
    #[arg(long, default_value_t = 120)]
    pub timeout_secs: u64,
    /// Sampling temperature.
    #[arg(long, default_value_t = 0.7)]
    pub temperature: f32,
    /// Most tokens per answer.
    #[arg(long, default_value_t = 256)]
    pub max_tokens: u32,
    /// Stream LLM replies.
    #[arg(long)]
    pub stream: bool,
    /// A JSON file `{"system": ..., "user": ...}` replacing the default prompt; the user template
    /// must contain {passage} and may contain {n}.
    #[arg(long)]
    pub prompt_file: Option<PathBuf>,
    /// Keep a query only if its chunk is in the embedder's top K for it (0 disables).
    #[arg(long, default_value_t = 5)]
    pub round_trip_k: usize,
    /// Ask the LLM to judge each question against its passage (doubles LLM calls).
    #[arg(long)]
    pub judge: bool,
    /// Best mining candidates skipped.
    #[arg(long, default_value_t = 0)]
    pub range_min: usize,
    /// Mining candidates considered (default as sentence-transformers).
    #[arg(long)]
    pub range_max: Option<usize>,
    /// Drop candidates scoring within this of the positive.
    #[arg(long)]
    pub absolute_margin: Option<f32>,
    /// Drop candidates scoring above positive * (1 - this); negative to disable.
    #[arg(long, default_value_t = 0.05)]
    pub relative_margin: f32,
    /// Drop candidates above this score.
    #[arg(long)]
    pub max_score: Option<f32>,
    /// Drop candidates below this score.
    #[arg(long)]
    pub min_score: Option<f32>,
    /// Negative sampling.
    #[arg(long, value_enum, default_value = "top")]
    pub sampling: SamplingArg,
    /// Embedder for round-trip filtering and mining: `hashing` (lexical, no model needed) or
    /// `model:DIR` (a sentence-transformers model, normally the base model being fine-tuned).
    #[arg(long, default_value = "hashing")]
    pub embedder: String,
    /// Hide the progress bar.
    #[arg(long)]
    pub no_progress: bool,
}

/// A probability flag: a number from 0 to 1.
fn parse_probability(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(p) if (0.0..=1.0).contains(&p) => Ok(p),
        _ => Err(format!(
            "{text:?} is not a probability: give a number from 0 to 1, e.g. 0.1"
        )),
    }
}

fn policy(args: &GenerateDataArgs) -> RequestPolicy {
    RequestPolicy {
        concurrency: args.concurrency.max(1),
        timeout: Duration::from_secs(args.timeout_secs.max(1)),
        retry: RetryPolicy::default(),
    }
}

/// The LLM backend `--llm` names, if it names one (loading a built-in model takes a while).
pub async fn backend_from_args(
    args: &GenerateDataArgs,
) -> anyhow::Result<Option<Arc<dyn LlmBackend>>> {
    let spec = args.llm.strip_suffix("+ict").unwrap_or(&args.llm);
    if spec == "ict" && args.llm.ends_with("+ict") {
        bail!(
            "--llm ict+ict names no LLM: use ict, or builtin+ict, ollama:MODEL+ict, openai:URL+ict"
        );
    }
    let (kind, rest) = spec.split_once(':').unwrap_or((spec, ""));
    Ok(match kind {
        "ollama" => {
            if rest.is_empty() {
                bail!("--llm ollama:MODEL needs a model name, e.g. --llm ollama:qwen2.5:3b");
            }
            let mut c = OllamaConfig::new(rest);
            c.base_url = args.ollama_url.clone();
            c.stream = args.stream;
            c.policy = policy(args);
            Some(Arc::new(OllamaBackend::new(c)?))
        }
        "openai" => {
            if rest.is_empty() {
                bail!("--llm openai:URL needs the server's URL, e.g. --llm openai:http://127.0.0.1:8080");
            }
            let mut c = OpenAiConfig::new(rest);
            c.guard = ragd_shared::netguard::LanGuard::new(args.allowed_networks.clone());
            c.model = args.model.clone();
            c.stream = args.stream;
            c.policy = policy(args);
            Some(Arc::new(OpenAiBackend::new(c)?))
        }
        "builtin" => {
            let path = ragd_engine::models::resolve_gguf(
                &args.gguf,
                &ragd_engine::models::HubAccess::from_env(),
            )
            .map_err(|e| {
                anyhow::anyhow!("{e}; or {}", ragd_engine::data::llm::builtin::FETCH_HINT)
            })?;
            let backend =
                tokio::task::spawn_blocking(move || BuiltinBackend::load(&path)).await??;
            Some(Arc::new(backend))
        }
        "ict" => None,
        other => bail!("unknown --llm {other:?}: use ollama:MODEL, openai:URL, builtin or ict"),
    })
}

fn progress_printer(
    hidden: bool,
) -> (
    tokio::sync::mpsc::UnboundedSender<Progress>,
    tokio::task::JoinHandle<()>,
) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Progress>();
    let task = tokio::spawn(async move {
        let bar = if hidden {
            indicatif::ProgressBar::hidden()
        } else {
            indicatif::ProgressBar::new(0)
        };
        bar.set_style(
            indicatif::ProgressStyle::with_template("{msg:>16} [{bar:40}] {pos}/{len} {elapsed}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        let mut stage = "";
        while let Some(p) = rx.recv().await {
            if p.stage != stage {
                stage = p.stage;
                bar.set_message(stage);
                bar.reset();
            }
            bar.set_length(p.total);
            bar.set_position(p.done);
        }
        bar.finish_and_clear();
    });
    (tx, task)
}

/// Runs `generate-data`.
pub async fn run_generate_data(args: GenerateDataArgs) -> anyhow::Result<()> {
    if !args.corpus.exists() {
        return Err(IngestError::CorpusMissing {
            path: args.corpus.clone(),
        }
        .into());
    }
    let tokenizer = tokenizers::Tokenizer::from_file(&args.tokenizer)
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| {
            format!(
                "cannot load tokenizer {}: pass the base model's tokenizer.json (for all-MiniLM-L6-v2, run ../shared/tools/fetch-minilm.sh DIR and use DIR/tokenizer.json)",
                args.tokenizer.display()
            )
        })?;
    let embedder: Arc<dyn Embedder> = match args.embedder.split_once(':') {
        None if args.embedder == "hashing" => Arc::new(HashingEmbedder::new(1024)),
        Some(("model", dir)) if !dir.is_empty() => {
            let path = std::path::PathBuf::from(dir);
            let encoder = tokio::task::spawn_blocking(move || {
                ragd_engine::embed::SentenceEncoder::load_dir(&path, &candle_core::Device::Cpu)
            })
            .await??;
            Arc::new(ModelEmbedder::new(encoder, 32, dir.to_string()))
        }
        _ => bail!(
            "unknown --embedder {:?}: use `hashing` or `model:DIR`",
            args.embedder
        ),
    };
    let budget: Option<LlmBudget> = args
        .llm
        .ends_with("+ict")
        .then(|| args.llm_budget.parse())
        .transpose()
        .map_err(|e: String| anyhow::anyhow!("--llm-budget: {e}"))?;
    let ict = || {
        let g = IctGenerator::new(IctConfig {
            queries_per_chunk: args.queries_per_chunk.max(1),
            seed: args.seed,
            keep_sentence_probability: args.ict_keep_sentence,
            query_words: args.ict_query_words,
            ..Default::default()
        });
        match args.ict_window {
            0 => g,
            n => g.reading(ReadWindow::new(tokenizer.clone(), n)),
        }
    };
    let backend = backend_from_args(&args).await?;
    let generator: Arc<dyn QueryGenerator> = match &backend {
        Some(b) => {
            let template = match &args.prompt_file {
                Some(p) => {
                    let text = std::fs::read_to_string(p)
                        .with_context(|| format!("cannot read prompt file {}", p.display()))?;
                    serde_json::from_str::<PromptTemplate>(&text).with_context(|| {
                        format!(
                            "{} must be JSON {{\"system\": ..., \"user\": ...}}",
                            p.display()
                        )
                    })?
                }
                None => PromptTemplate::default(),
            };
            let config = GenerateConfig {
                queries_per_chunk: args.queries_per_chunk.max(1),
                temperature: args.temperature,
                max_tokens: args.max_tokens,
                seed: args.seed,
                concurrency: args.concurrency.max(1),
                ..Default::default()
            };
            Arc::new(LlmGenerator::new(b.clone(), template, config)?)
        }
        None => Arc::new(ict()),
    };
    let generator: Arc<dyn QueryGenerator> = if let Some(budget) = budget {
        Arc::new(MixedGenerator::new(generator, ict(), budget, args.seed))
    } else {
        generator
    };
    let config = PipelineConfig {
        ingest: IngestOptions::default(),
        chunk: ChunkConfig {
            size: args.chunk_size,
            overlap: args.chunk_overlap,
            min: args.chunk_min,
        },
        filter: FilterConfig::default(),
        round_trip_k: (args.round_trip_k > 0).then_some(args.round_trip_k),
        judge_concurrency: args.concurrency.max(1),
        mine: MineConfig {
            num_negatives: args.negatives,
            range_min: args.range_min,
            range_max: args.range_max,
            absolute_margin: args.absolute_margin,
            relative_margin: (args.relative_margin >= 0.0).then_some(args.relative_margin),
            max_score: args.max_score,
            min_score: args.min_score,
            sampling: match args.sampling {
                SamplingArg::Top => Sampling::Top,
                SamplingArg::Random => Sampling::Random,
            },
            seed: args.seed,
            ..Default::default()
        },
        split: SplitConfig {
            test_fraction: args.test_fraction,
            seed: args.seed,
        },
        embed_batch: 64,
        seed: args.seed,
    };
    let parts = PipelineParts {
        tokenizer,
        generator,
        embedder,
        judge: if args.judge { backend.clone() } else { None },
    };
    if args.judge && backend.is_none() {
        bail!("--judge needs an LLM: use --llm ollama:MODEL or --llm openai:URL");
    }
    let cancel = CancellationToken::new();
    let (tx, printer) = progress_printer(args.no_progress);
    let pipeline = run_pipeline(
        &args.corpus,
        &args.out,
        &config,
        parts,
        Some(tx),
        cancel.clone(),
    );
    tokio::pin!(pipeline);
    // Ctrl-C cancels the run, which stops at its next cancellation point.
    let result = loop {
        tokio::select! {
            r = &mut pipeline => break r,
            Ok(()) = tokio::signal::ctrl_c(), if !cancel.is_cancelled() => cancel.cancel(),
        }
    };
    let _ = printer.await;
    let manifest = result?;
    println!(
        "wrote {} training records and {} test queries to {} (generator {} {}, {:.1}s)",
        manifest.train_records,
        manifest.test_queries,
        args.out.display(),
        manifest.generator,
        manifest.model,
        manifest.total_seconds
    );
    for (name, step) in &manifest.steps {
        let counts: Vec<String> = step
            .counts
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        println!("  {name:<9} {:>7.2}s  {}", step.seconds, counts.join(" "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrapper {
        #[command(flatten)]
        args: GenerateDataArgs,
    }

    fn args(extra: &[&str]) -> GenerateDataArgs {
        let mut argv = vec!["x", "--corpus", "c", "--out", "o", "--tokenizer", "t.json"];
        argv.extend_from_slice(extra);
        Wrapper::parse_from(argv).args
    }

    #[test]
    fn the_ict_keep_share_is_a_probability() {
        assert_eq!(args(&[]).ict_keep_sentence, 0.0);
        assert_eq!(args(&["--ict-keep-sentence", "0.1"]).ict_keep_sentence, 0.1);
        for bad in ["1.5", "ten", "NaN"] {
            let err = Wrapper::try_parse_from([
                "x",
                "--corpus",
                "c",
                "--out",
                "o",
                "--tokenizer",
                "t.json",
                "--ict-keep-sentence",
                bad,
            ])
            .err()
            .expect("refused")
            .to_string();
            assert!(err.contains("not a probability"), "{bad}: {err}");
        }
    }

    #[tokio::test]
    async fn llm_specs_are_checked() {
        let mixed = backend_from_args(&args(&["--llm", "ollama:qwen2.5:3b+ict"]))
            .await
            .unwrap()
            .expect("the LLM of a mixed spec");
        assert_eq!(mixed.info().model, "qwen2.5:3b");
        let err = backend_from_args(&args(&["--llm", "ict+ict"]))
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("builtin+ict"), "{err}");
        assert!(backend_from_args(&args(&["--llm", "ict"]))
            .await
            .unwrap()
            .is_none());
        let b = backend_from_args(&args(&["--llm", "ollama:qwen2.5:3b"]))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(b.info().model, "qwen2.5:3b");
        let b = backend_from_args(&args(&[
            "--llm",
            "openai:http://127.0.0.1:8080",
            "--model",
            "m",
        ]))
        .await
        .unwrap()
        .unwrap();
        assert_eq!(
            b.info().endpoint.as_deref(),
            Some("http://127.0.0.1:8080/v1")
        );
        for (spec, needle) in [
            ("ollama", "needs a model"),
            ("openai:", "needs the server"),
            ("gpt", "unknown --llm"),
        ] {
            let e = backend_from_args(&args(&["--llm", spec]))
                .await
                .err()
                .unwrap();
            assert!(e.to_string().contains(needle), "{spec}: {e}");
        }
        let e = backend_from_args(&args(&[
            "--llm",
            "ollama:m",
            "--ollama-url",
            "http://192.168.1.5:11434",
        ]))
        .await
        .err()
        .unwrap();
        assert!(e.to_string().contains("127.0.0.1"), "{e}");
    }
}
