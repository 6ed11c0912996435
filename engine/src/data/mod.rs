//! Synthetic training-data pipeline: ingestion, chunking, question generation, filtering,
//! hard-negative mining, splitting and output.
//!
//! Steps, in the order [`pipeline::run_pipeline`] runs them (`ragd-worker generate-data`):
//! 1. [`ingest`]: a directory of .md/.txt/.rst/.html and ragd chunk exports; bad files counted;
//! 2. [`chunk`]: token windows with the base model's tokenizer, ids `{document_id}_chunk_{i}`;
//! 3. [`llm`]: questions per chunk from Ollama, an OpenAI-compatible server, the built-in GGUF
//!    model, or ICT pseudo-queries;
//! 4. [`filter`]: length, near-duplicates, copies, optional LLM judge, round-trip consistency
//!    through an [`embed::Embedder`];
//! 5. [`split`]: a held-out test set by chunk;
//! 6. [`mine`]: hard negatives with sentence-transformers' `mine_hard_negatives` semantics;
//! 7. [`output`]: `train.jsonl` (ragd F-058), `test/` (BEIR) and `manifest.json`.
//!
//! Steps 4 to 7 are the prepare step ([`prepare`]; as a cluster job runs it, [`prepare_job`]), the one path that `generate-data`, a
//! worker's prepare task and the coordinator's fallback all run; [`step`] holds what the steps
//! share (settings, error, step log); [`search`] the exact blocked top-k search;
//! [`embed_table`] the embeddings a cluster job's shards made ahead of the step.
//!
//! Every step works on a shard (a list of chunks in, records out) with stable ids and output that
//! is deterministic for a seed, so the steps can later be spread over machines. Long CPU steps are
//! blocking functions meant for `tokio::task::spawn_blocking`; they take a
//! [`tokio_util::sync::CancellationToken`] and report [`Progress`] on an optional channel.
pub mod chunk;
pub mod embed;
pub mod embed_table;
pub mod filter;
pub mod ingest;
pub mod llm;
pub mod mine;
pub mod output;
pub mod pipeline;
pub mod prepare;
pub mod prepare_job;
pub mod search;
pub mod split;
pub mod step;

/// Progress of a long step: `done` of `total` units of `stage`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// The step reporting (`"ingest"`, `"chunk"`, `"generate"`, `"embed"`, `"mine"`, ...).
    pub stage: &'static str,
    /// Units done so far.
    pub done: u64,
    /// Units in all (0 when unknown).
    pub total: u64,
}

impl Progress {
    /// A progress report.
    pub fn new(stage: &'static str, done: u64, total: u64) -> Self {
        Self { stage, done, total }
    }
}

/// Where long steps send their [`Progress`].
pub type ProgressSender = tokio::sync::mpsc::UnboundedSender<Progress>;
