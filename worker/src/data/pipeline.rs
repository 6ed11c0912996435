//! The whole pipeline on one machine: ingest, chunk, generate, filter, split, mine, write.
//! CPU-heavy steps run on blocking threads; each step's counts and duration go to the manifest.
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;
use tokio_util::sync::CancellationToken;

use super::chunk::{Chunk, ChunkConfig, ChunkError, Chunker};
use super::embed::{dot, embed_all, EmbedError, Embedder};
use super::filter::{
    judge_filter, round_trip_filter, round_trip_keep, text_filters, FilterConfig, FilterCounts,
    FilterError,
};
use super::ingest::{ingest, IngestError, IngestOptions};
use super::llm::generate::{GenerateError, GeneratedQuery, QueryGenerator};
use super::llm::LlmBackend;
use super::mine::{mine_hard_negatives, MineConfig, MineError, MineInput};
use super::output::{
    write_beir, write_manifest, write_train, Manifest, NegativeRef, OutputError, StepRecord,
    TestQuery, TrainRecord,
};
use super::split::{split_by_chunk, SplitConfig, SplitError};
use super::ProgressSender;

/// Pipeline errors: a step that cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// Ingestion failed.
    #[error(transparent)]
    Ingest(#[from] IngestError),
    /// Chunking failed.
    #[error(transparent)]
    Chunk(#[from] ChunkError),
    /// Generation failed.
    #[error(transparent)]
    Generate(#[from] GenerateError),
    /// Filtering failed.
    #[error(transparent)]
    Filter(#[from] FilterError),
    /// Embedding failed.
    #[error(transparent)]
    Embed(#[from] EmbedError),
    /// Mining failed.
    #[error(transparent)]
    Mine(#[from] MineError),
    /// Splitting failed.
    #[error(transparent)]
    Split(#[from] SplitError),
    /// Writing failed.
    #[error(transparent)]
    Output(#[from] OutputError),
    /// Nothing to work on.
    #[error("{step} left nothing to work on: {hint}")]
    Empty {
        /// The step.
        step: String,
        /// What to check.
        hint: String,
    },
    /// A blocking step panicked or was aborted.
    #[error("step {step} did not finish: {message}")]
    Join {
        /// The step.
        step: String,
        /// What happened.
        message: String,
    },
}

/// Pipeline settings.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PipelineConfig {
    /// Ingestion.
    #[serde(skip)]
    pub ingest: IngestOptions,
    /// Chunk sizes.
    pub chunk: ChunkConfig,
    /// Text filters.
    pub filter: FilterConfig,
    /// Round-trip top-k (`None` disables).
    pub round_trip_k: Option<usize>,
    /// Judge concurrency when a judge is given.
    pub judge_concurrency: usize,
    /// Mining.
    pub mine: MineConfig,
    /// Split.
    pub split: SplitConfig,
    /// Embedding batch size.
    pub embed_batch: usize,
    /// Run seed (recorded in the manifest).
    pub seed: u64,
}

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

async fn blocking<T: Send + 'static, E>(
    step: &str,
    f: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, PipelineError>
where
    E: Send + 'static,
    PipelineError: From<E>,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| PipelineError::Join {
            step: step.into(),
            message: e.to_string(),
        })?
        .map_err(PipelineError::from)
}

fn counts<I: IntoIterator<Item = (K, usize)>, K: ToString>(it: I) -> BTreeMap<String, u64> {
    it.into_iter()
        .map(|(k, v)| (k.to_string(), v as u64))
        .collect()
}

/// The serde (snake_case) name of a unit enum variant.
fn snake<T: Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        _ => "unknown".into(),
    }
}

/// Steps done so far, with their duration and counts, for the manifest.
pub type StepLog = Vec<(String, StepRecord)>;

fn record(steps: &mut StepLog, name: &str, start: Instant, counts: BTreeMap<String, u64>) {
    steps.push((
        name.to_string(),
        StepRecord {
            seconds: start.elapsed().as_secs_f64(),
            counts,
        },
    ));
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

/// What generated the queries, for the manifest.
#[derive(Debug, Clone, Default)]
pub struct GeneratorSummary {
    /// Backend kind.
    pub kind: String,
    /// Model.
    pub model: String,
    /// Endpoint, if any.
    pub endpoint: Option<String>,
    /// Prompt hash, if any.
    pub prompt_hash: Option<String>,
    /// LLM tokens per second.
    pub tokens_per_second: f64,
}

/// Filters generated queries, splits them by chunk, mines hard negatives and writes
/// `train.jsonl`, `test/` and `manifest.json` under `out` (steps `filter` to `write`).
#[allow(clippy::too_many_arguments)]
pub async fn finish_step(
    chunks: Arc<Vec<Chunk>>,
    generated: Vec<GeneratedQuery>,
    out: &Path,
    config: &PipelineConfig,
    embedder: Arc<dyn Embedder>,
    judge: Option<Arc<dyn LlmBackend>>,
    generator: GeneratorSummary,
    progress: Option<ProgressSender>,
    cancel: CancellationToken,
    mut steps: StepLog,
    total: Instant,
) -> Result<Manifest, PipelineError> {
    let mut step = |name: &str, start: Instant, counts| record(&mut steps, name, start, counts);
    // Filter.
    let t = Instant::now();
    let by_id: HashMap<&str, &Chunk> = chunks.iter().map(|c| (c.id.as_str(), c)).collect();
    let row_of: HashMap<&str, usize> = chunks
        .iter()
        .enumerate()
        .map(|(i, c)| (c.id.as_str(), i))
        .collect();
    let (mut queries, mut fc): (Vec<GeneratedQuery>, FilterCounts) =
        text_filters(generated, &by_id, &config.filter)?;
    let mut extra = BTreeMap::new();
    if let Some(judge) = &judge {
        let (kept, jc) = judge_filter(
            queries,
            &by_id,
            judge.as_ref(),
            config.judge_concurrency,
            &mut fc,
            &cancel,
        )
        .await?;
        queries = kept;
        extra.insert("judge_unreadable".to_string(), jc.unreadable as u64);
    }
    // Embeddings of the corpus, the queries and ICT positives, used by round trip and mining.
    let texts: Vec<String> = chunks.iter().map(|c| c.text.clone()).collect();
    let (emb, batch, tx, c) = (
        embedder.clone(),
        config.embed_batch.max(1),
        progress.clone(),
        cancel.clone(),
    );
    let texts2 = texts.clone();
    let corpus_emb = Arc::new(
        blocking("embed corpus", move || {
            embed_all(
                emb.as_ref(),
                &texts2,
                batch,
                "embed corpus",
                tx.as_ref(),
                &c,
            )
        })
        .await?,
    );
    let embed_queries = |qs: &[GeneratedQuery]| {
        let q_texts: Vec<String> = qs.iter().map(|q| q.query.clone()).collect();
        let (emb, tx, c) = (embedder.clone(), progress.clone(), cancel.clone());
        blocking("embed queries", move || {
            embed_all(
                emb.as_ref(),
                &q_texts,
                batch,
                "embed queries",
                tx.as_ref(),
                &c,
            )
        })
    };
    let mut query_emb = embed_queries(&queries).await?;
    if let Some(k) = config.round_trip_k {
        let rows: Vec<usize> = queries
            .iter()
            .map(|q| row_of[q.chunk_id.as_str()])
            .collect();
        let (ce, tx, c) = (corpus_emb.clone(), progress.clone(), cancel.clone());
        let (keep, all) = blocking("round trip", move || {
            round_trip_keep(&query_emb, &rows, &ce, k, tx.as_ref(), &c)
                .map(|keep| (keep, query_emb))
        })
        .await?;
        queries = round_trip_filter(queries, &keep, &mut fc);
        let rows = (0..all.len())
            .filter(|&i| keep[i])
            .map(|i| all.row(i).to_vec());
        query_emb = super::embed::EmbeddingMatrix::from_rows(rows.collect())?;
    }
    let mut fcounts = counts(
        fc.iter()
            .map(|(k, v)| (format!("dropped_{}", snake(k)), *v)),
    );
    fcounts.extend(extra);
    fcounts.insert("kept".into(), queries.len() as u64);
    step("filter", t, fcounts);
    if queries.is_empty() {
        return Err(PipelineError::Empty {
            step: "filtering".into(),
            hint: "every generated query was dropped; see the manifest's filter counts".into(),
        });
    }

    // Split.
    let t = Instant::now();
    let indexed: Vec<GeneratedQuery> = queries;
    let split = split_by_chunk(indexed.clone(), &config.split)?;
    step(
        "split",
        t,
        counts([
            ("train", split.train.len()),
            ("test", split.test.len()),
            ("test_chunks", split.test_chunks.len()),
        ]),
    );

    // Mine negatives for the training queries.
    let t = Instant::now();
    let train_idx: Vec<usize> = indexed
        .iter()
        .enumerate()
        .filter(|(_, q)| !split.test_chunks.contains(&q.chunk_id))
        .map(|(i, _)| i)
        .collect();
    let train_q = super::embed::EmbeddingMatrix::from_rows(
        train_idx
            .iter()
            .map(|&i| query_emb.row(i).to_vec())
            .collect(),
    )?;
    let pos_rows: Vec<usize> = split
        .train
        .iter()
        .map(|q| row_of[q.chunk_id.as_str()])
        .collect();
    let ict_texts: Vec<String> = split
        .train
        .iter()
        .filter_map(|q| q.positive_text.clone())
        .collect();
    let ict_emb = if ict_texts.is_empty() {
        None
    } else {
        let (emb, tx, c) = (embedder.clone(), progress.clone(), cancel.clone());
        Some(
            blocking("embed positives", move || {
                embed_all(
                    emb.as_ref(),
                    &ict_texts,
                    batch,
                    "embed positives",
                    tx.as_ref(),
                    &c,
                )
            })
            .await?,
        )
    };
    let mut k = 0;
    let pos_scores: Vec<f32> = split
        .train
        .iter()
        .enumerate()
        .map(|(i, q)| match (&q.positive_text, &ict_emb) {
            (Some(_), Some(e)) => {
                k += 1;
                dot(train_q.row(i), e.row(k - 1))
            }
            _ => dot(train_q.row(i), corpus_emb.row(pos_rows[i])),
        })
        .collect();
    let (mc, tx, c, ce) = (
        config.mine.clone(),
        progress.clone(),
        cancel.clone(),
        corpus_emb.clone(),
    );
    let mined = blocking("mine", move || {
        let input = MineInput {
            queries: &train_q,
            positive_scores: &pos_scores,
            positive_rows: &pos_rows,
            corpus: &ce,
            corpus_texts: &texts,
        };
        mine_hard_negatives(input, &mc, tx.as_ref(), &c)
    })
    .await?;
    let m = &mined.counts;
    step(
        "mine",
        t,
        counts([
            ("queries", m.queries),
            ("negatives", m.negatives),
            ("short_of_negatives", m.short_of_negatives),
            ("skipped_positive", m.skipped_positive),
            ("skipped_absolute_margin", m.skipped_absolute_margin),
            ("skipped_relative_margin", m.skipped_relative_margin),
            ("skipped_max_score", m.skipped_max_score),
            ("skipped_min_score", m.skipped_min_score),
        ]),
    );

    // Write.
    let t = Instant::now();
    let records: Vec<TrainRecord> = split
        .train
        .iter()
        .zip(&mined.negatives)
        .map(|(q, negs)| {
            let chunk = by_id[q.chunk_id.as_str()];
            TrainRecord {
                query: q.query.clone(),
                positive: q
                    .positive_text
                    .clone()
                    .unwrap_or_else(|| chunk.text.clone()),
                positive_id: chunk.id.clone(),
                negatives: negs
                    .iter()
                    .map(|h| NegativeRef {
                        id: chunks[h.index].id.clone(),
                        text: chunks[h.index].text.clone(),
                    })
                    .collect(),
                source_document: chunk.document_id.clone(),
            }
        })
        .collect();
    let mut per_chunk: HashMap<&str, usize> = HashMap::new();
    let test_queries: Vec<TestQuery> = split
        .test
        .iter()
        .map(|q| {
            let n = per_chunk.entry(q.chunk_id.as_str()).or_default();
            *n += 1;
            TestQuery {
                id: format!("{}_q{}", q.chunk_id, *n - 1),
                text: q.query.clone(),
                chunk_id: q.chunk_id.clone(),
            }
        })
        .collect();
    let out_dir: PathBuf = out.to_path_buf();
    write_train(&out_dir.join("train.jsonl"), &records)?;
    write_beir(&out_dir.join("test"), &chunks, &test_queries)?;
    step(
        "write",
        t,
        counts([
            ("train_records", records.len()),
            ("test_queries", test_queries.len()),
        ]),
    );

    let manifest = Manifest {
        tool: format!("ragd-worker {}", env!("CARGO_PKG_VERSION")),
        generator: generator.kind,
        model: generator.model,
        endpoint: generator.endpoint,
        prompt_hash: generator.prompt_hash,
        embedder: embedder.name(),
        seed: config.seed,
        settings: serde_json::to_value(config).unwrap_or_default(),
        steps,
        tokens_per_second: generator.tokens_per_second,
        train_records: records.len(),
        test_queries: test_queries.len(),
        total_seconds: total.elapsed().as_secs_f64(),
    };
    write_manifest(&out_dir.join("manifest.json"), &manifest)?;
    tracing::info!(
        train = manifest.train_records,
        test = manifest.test_queries,
        "training data written"
    );
    Ok(manifest)
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
    finish_step(
        chunks,
        generation.queries,
        out,
        config,
        parts.embedder,
        parts.judge,
        summary,
        progress,
        cancel,
        steps,
        total,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::chunk::train_wordpiece;
    use crate::data::embed::HashingEmbedder;
    use crate::data::filter::DropReason;
    use crate::data::llm::ict::{IctConfig, IctGenerator};

    #[test]
    fn reason_names_are_snake_case() {
        assert_eq!(snake(&DropReason::NearDuplicate), "near_duplicate");
    }

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
