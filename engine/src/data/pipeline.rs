//! The whole pipeline on one machine: ingest, chunk, generate, then the prepare step (filter,
//! split, mine, write: [`super::prepare`]). CPU-heavy steps run on blocking threads; each step's
//! counts and duration go to the manifest.
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use tokenizers::Tokenizer;
use tokio_util::sync::CancellationToken;

use super::chunk::{Chunk, Chunker};
use super::embed::Embedder;
use super::ingest::ingest;
use super::llm::generate::{QueryGenerator, QuerySource};
use super::llm::LlmBackend;
use super::output::Manifest;
use super::prepare::{prepare, PrepareInput};
use super::step::{blocking, counts, record, snake};
pub use super::step::{GeneratorSummary, PipelineConfig, PipelineError, StepLog};
use super::ProgressSender;

/// What the pipeline runs with.
pub struct PipelineParts {
    /// Tokenizer of the base model, for chunking.
    pub tokenizer: Tokenizer,
    /// Query generator.
    pub generator: Arc<dyn QueryGenerator>,
    /// Embedder for round-trip filtering and mining.
    pub embedder: Arc<dyn Embedder>,
    /// Optional LLM judge.
    pub judge: Option<Arc<dyn LlmBackend>>,
}

/// Ingests `corpus` and cuts it into chunks with the base model's tokenizer (steps `ingest`
/// and `chunk`); fails when no chunk is left.
pub async fn chunk_corpus_step(
    corpus: &Path,
    config: &PipelineConfig,
    tokenizer: Tokenizer,
    progress: Option<ProgressSender>,
    cancel: CancellationToken,
    steps: &mut StepLog,
) -> Result<Vec<Chunk>, PipelineError> {
    let mut step = |name: &str, start: Instant, counts| record(steps, name, start, counts);
    // Ingest.
    let t = Instant::now();
    let (root, opts, tx, c) = (
        corpus.to_path_buf(),
        config.ingest.clone(),
        progress.clone(),
        cancel.clone(),
    );
    let ingested = blocking("ingest", move || ingest(&root, &opts, tx.as_ref(), &c)).await?;
    let s = &ingested.summary;
    let mut ic = counts(
        s.skipped
            .iter()
            .map(|(k, v)| (format!("skipped_{}", snake(k)), *v)),
    );
    ic.insert("files_seen".into(), s.files_seen as u64);
    ic.insert("documents".into(), s.documents as u64);
    ic.insert("exported_chunks".into(), s.exported_chunks as u64);
    step("ingest", t, ic);

    // Chunk.
    let t = Instant::now();
    let chunker = Chunker::new(tokenizer, config.chunk)?;
    let (tx, c) = (progress.clone(), cancel.clone());
    let (chunks, cs) = blocking("chunk", move || {
        chunker.chunk_corpus(&ingested, tx.as_ref(), &c)
    })
    .await?;
    step(
        "chunk",
        t,
        counts([
            ("chunks", cs.chunks),
            ("duplicates_dropped", cs.duplicates_dropped),
            ("documents_too_short", cs.documents_too_short),
        ]),
    );
    if chunks.is_empty() {
        return Err(PipelineError::Empty {
            step: "chunking".into(),
            hint: format!("no chunk of at least {} tokens; check the corpus and the skipped-file warnings, or lower --chunk-min", config.chunk.min),
        });
    }
    Ok(chunks)
}

/// Runs the pipeline from `corpus` to `out` (train.jsonl, test/, manifest.json).
pub async fn run_pipeline(
    corpus: &Path,
    out: &Path,
    config: &PipelineConfig,
    parts: PipelineParts,
    progress: Option<ProgressSender>,
    cancel: CancellationToken,
) -> Result<Manifest, PipelineError> {
    let total = Instant::now();
    let mut steps = StepLog::new();
    let chunks = chunk_corpus_step(
        corpus,
        config,
        parts.tokenizer,
        progress.clone(),
        cancel.clone(),
        &mut steps,
    )
    .await?;
    let chunks = Arc::new(chunks);
    let mut step = |name: &str, start: Instant, counts| record(&mut steps, name, start, counts);

    // Generate.
    let t = Instant::now();
    parts.generator.check().await?;
    let generation = parts
        .generator
        .generate(&chunks, progress.as_ref(), &cancel)
        .await?;
    let g = &generation.counts;
    let llm_queries = generation
        .queries
        .iter()
        .filter(|q| q.source == QuerySource::Llm)
        .count();
    step(
        "generate",
        t,
        counts([
            ("chunks", g.chunks),
            ("chunks_with_queries", g.chunks_with_queries),
            ("chunks_failed", g.chunks_failed),
            ("queries", g.queries),
            ("unusable_answers", g.unusable_answers),
            ("backend_errors", g.backend_errors),
            ("non_questions_dropped", g.non_questions_dropped),
            ("llm_queries", llm_queries),
            ("ict_queries", generation.queries.len() - llm_queries),
        ]),
    );

    let info = parts.generator.info();
    let summary = GeneratorSummary {
        kind: info.backend.kind,
        model: info.backend.model,
        endpoint: info.backend.endpoint,
        prompt_hash: info.prompt_hash,
        tokens_per_second: generation.throughput.tokens_per_second,
    };
    let input = PrepareInput {
        chunks,
        generated: generation.queries,
        embedder: parts.embedder,
        judge: parts.judge,
        generator: summary,
        steps,
        started: total,
    };
    prepare(input, out, config, progress, cancel).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::chunk::{train_wordpiece, ChunkConfig};
    use crate::data::embed::HashingEmbedder;
    use crate::data::llm::ict::{IctConfig, IctGenerator};
    use crate::data::mine::MineConfig;
    use crate::data::split::SplitConfig;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ict_pipeline_on_a_tiny_corpus() {
        let tmp = tempfile::tempdir().unwrap();
        let corpus = tmp.path().join("c");
        std::fs::create_dir_all(&corpus).unwrap();
        let texts = [
            "Checkpoints write every dirty buffer to disk. The checkpointer runs at intervals set by a timeout. Recovery replays the log from the last checkpoint.",
            "Autovacuum launches worker processes that vacuum tables. Each worker removes dead row versions left by updates. Busy tables are vacuumed first.",
            "Git stores every version of a file as a blob object. Commits point to trees of blobs. Branches are movable references to commits.",
        ];
        for (i, t) in texts.iter().enumerate() {
            std::fs::write(corpus.join(format!("d{i}.txt")), t).unwrap();
        }
        let owned: Vec<String> = texts.iter().map(|s| s.to_string()).collect();
        let config = PipelineConfig {
            chunk: ChunkConfig {
                size: 64,
                overlap: 4,
                min: 5,
            },
            round_trip_k: Some(3),
            embed_batch: 8,
            mine: MineConfig {
                num_negatives: 1,
                relative_margin: None,
                ..Default::default()
            },
            split: SplitConfig {
                test_fraction: 0.34,
                seed: 1,
            },
            ..Default::default()
        };
        let parts = PipelineParts {
            tokenizer: train_wordpiece(&owned, 300).unwrap(),
            generator: Arc::new(IctGenerator::new(IctConfig::default())),
            embedder: Arc::new(HashingEmbedder::new(256)),
            judge: None,
        };
        let out = tmp.path().join("out");
        let m = run_pipeline(
            &corpus,
            &out,
            &config,
            parts,
            None,
            CancellationToken::new(),
        )
        .await
        .unwrap();
        assert_eq!(m.generator, "ict");
        assert_eq!(m.test_queries + m.train_records, 6, "{m:?}");
        assert!(m.test_queries == 2, "one chunk of three held out: {m:?}");
        let steps: Vec<&str> = m.steps.iter().map(|(s, _)| s.as_str()).collect();
        assert_eq!(
            steps,
            ["ingest", "chunk", "generate", "filter", "split", "mine", "write"]
        );
        assert!(out.join("train.jsonl").is_file() && out.join("manifest.json").is_file());
    }
}
