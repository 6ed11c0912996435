//! Stages the coordinator runs itself, with the engine: ingest (read and chunk the
//! corpus, which lives on this machine), prepare (filter, split, mine with the base embedder),
//! evaluate (base vs fine-tuned on the held-out queries) and export.

use super::drive::JobCtx;
use super::generate::ShardOutput;
use super::JobError;
use super::JobSpec;
use ragd_engine::data::chunk::{Chunk, ChunkConfig};
use ragd_engine::data::embed::{Embedder, ModelEmbedder};
use ragd_engine::data::embed_table::{EmbeddingTable, TableEmbedder};
use ragd_engine::data::mine::MineConfig;
use ragd_engine::data::output::StepRecord;
use ragd_engine::data::pipeline::{self, PipelineConfig};
use ragd_engine::data::prepare_job::{prepare_shards, ShardQueries};
use ragd_engine::data::split::SplitConfig;
use ragd_engine::embed::SentenceEncoder;
use ragd_engine::eval::compare::Comparison;
use ragd_engine::eval::{self, beir, questions, DimResult};
use ragd_shared::protocol::jobs::BlobId;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// Output of the ingest stage.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IngestOutput {
    /// Chunks (JSONL of `Chunk`) blob, hex.
    pub chunks_blob: String,
    /// Number of chunks.
    pub chunks: usize,
    /// Step records (ingest, chunk).
    pub steps: Vec<(String, StepRecord)>,
}

/// Output of the prepare stage.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PrepareOutput {
    /// `train.jsonl` blob, hex.
    pub train_blob: String,
    /// BEIR test set bundle, hex.
    pub test_bundle: String,
    /// Training records.
    pub train_records: usize,
    /// Test queries.
    pub test_queries: usize,
    /// Negatives per record (the fewest any record has).
    pub negatives: usize,
    /// Step records (filter, split, mine, write).
    pub steps: Vec<(String, StepRecord)>,
}

/// Output of the evaluate stage.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct EvalOutput {
    /// The base model per dimension (empty when the job trains no embedder).
    pub base: Vec<DimResult>,
    /// The fine-tuned model per dimension.
    pub tuned: Vec<DimResult>,
    /// Reranking: the embedder alone, with the base reranker (when it is a cross-encoder) and
    /// with the fine-tuned reranker (empty when the job trains no reranker).
    #[serde(default)]
    pub rerank: Vec<ragd_engine::rerank::eval::RerankMetrics>,
    /// Base vs fine-tuned at full width: paired bootstrap intervals and the verdict (what
    /// `models promote` goes by): on the user's questions when the job has them, else on the
    /// held-out queries.
    #[serde(default)]
    pub comparison: Option<Comparison>,
    /// The user's questions (`submit --eval-queries`), when given.
    #[serde(default)]
    pub questions: Option<QuestionsEval>,
    /// Base vs fine-tuned on the held-out queries, when the user's questions took the headline.
    #[serde(default)]
    pub held_out_comparison: Option<Comparison>,
    /// The headline's queries compared at each Matryoshka dimension, widest first.
    #[serde(default)]
    pub per_dim: Vec<(usize, Comparison)>,
    /// Every held-out query is an ICT sentence (no LLM wrote any): a verdict on them alone
    /// overstates the gain, and `models promote` does not take it without `--force`.
    #[serde(default)]
    pub held_out_all_ict: bool,
}

impl PrepareOutput {
    /// Whether every held-out query is an ICT sentence, from the split step's counts.
    pub fn held_out_all_ict(&self) -> bool {
        let split = self.steps.iter().find(|(name, _)| name == "split");
        split.is_some_and(|(_, r)| {
            let count = |k: &str| r.counts.get(k).copied().unwrap_or(0);
            count("test") > 0 && count("test_ict") == count("test")
        })
    }
}

/// The evaluation on the user's own questions.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct QuestionsEval {
    /// The question file or directory.
    pub source: PathBuf,
    /// Questions evaluated (those with at least one matching document).
    pub queries: usize,
    /// Relevant entries that matched no document (`question N: "..."`).
    pub unmatched: Vec<String>,
    /// The base model per dimension.
    pub base: Vec<DimResult>,
    /// The fine-tuned model per dimension.
    pub tuned: Vec<DimResult>,
    /// Why the questions could not be used (then the held-out queries decide).
    pub error: Option<String>,
}

/// The job's scratch directory.
pub fn job_dir(ctx: &JobCtx, job: &str) -> PathBuf {
    ctx.state_dir.join("jobs").join(job)
}

/// The pipeline settings of a job.
pub fn pipeline_config(spec: &JobSpec) -> PipelineConfig {
    PipelineConfig {
        chunk: ChunkConfig {
            size: spec.chunk_size,
            overlap: spec.chunk_overlap,
            min: spec.chunk_min,
        },
        round_trip_k: (spec.round_trip_k > 0).then_some(spec.round_trip_k),
        judge_concurrency: 1,
        mine: MineConfig {
            num_negatives: spec.negatives,
            seed: spec.seed,
            ..Default::default()
        },
        split: SplitConfig {
            test_fraction: spec.test_fraction,
            seed: spec.seed,
        },
        embed_batch: 32,
        seed: spec.seed,
        ..Default::default()
    }
}

fn stage_err(stage: &'static str) -> impl Fn(String) -> JobError {
    move |m| JobError::stage(stage, m)
}

/// Reads and chunks the corpus with the base model's tokenizer; stores the chunks as a blob.
pub async fn ingest(
    ctx: &JobCtx,
    spec: &JobSpec,
    cancel: &CancellationToken,
) -> Result<(IngestOutput, Vec<Chunk>), JobError> {
    let tok_path = spec.base_model.join("tokenizer.json");
    let tokenizer = tokenizers::Tokenizer::from_file(&tok_path)
        .map_err(|e| JobError::stage("ingest", format!("{}: {e}", tok_path.display())))?;
    let mut steps = pipeline::StepLog::new();
    let chunks = pipeline::chunk_corpus_step(
        &spec.corpus,
        &pipeline_config(spec),
        tokenizer,
        None,
        cancel.clone(),
        &mut steps,
    )
    .await
    .map_err(|e| JobError::stage("ingest", e))?;
    let texts = chunks;
    let mut jsonl = Vec::new();
    for c in &texts {
        jsonl.extend(serde_json::to_vec(c).expect("chunk serialises"));
        jsonl.push(b'\n');
    }
    let id = ctx.blobs.put_bytes(&jsonl)?;
    Ok((
        IngestOutput {
            chunks_blob: id.to_hex(),
            chunks: texts.len(),
            steps,
        },
        texts,
    ))
}

/// Reads the chunks blob of an ingest output.
pub fn read_chunks(ctx: &JobCtx, out: &IngestOutput) -> Result<Vec<Chunk>, JobError> {
    let id = BlobId::from_hex(&out.chunks_blob)
        .ok_or_else(|| JobError::stage("ingest", "bad chunks blob id"))?;
    let bytes = ctx.blobs.read(&id)?;
    bytes
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).map_err(|e| JobError::stage("ingest", e)))
        .collect()
}

/// Filters, splits and mines the generated questions with the base model as embedder, reading
/// the vectors of the embedding table blob `table` (the job's embedding shards) where it has
/// them.
pub async fn prepare(
    ctx: &JobCtx,
    job: &str,
    spec: &JobSpec,
    inputs: ShardQueries,
    table: Option<BlobId>,
    cancel: &CancellationToken,
) -> Result<PrepareOutput, JobError> {
    let base = spec.base_model.clone();
    let encoder = tokio::task::spawn_blocking(move || {
        SentenceEncoder::load_dir(&base, &candle_core::Device::Cpu)
    })
    .await
    .map_err(|e| JobError::stage("prepare", e))?
    .map_err(|e| JobError::stage("prepare", e))?;
    let name = spec.base_model.display().to_string();
    let model: Arc<dyn Embedder> = Arc::new(ModelEmbedder::new(encoder, 32, name.clone()));
    let embedder: Arc<dyn Embedder> = match table {
        // Texts of embedding shards set aside are embedded here.
        Some(id) => {
            let blobs = ctx.blobs.clone();
            let table = tokio::task::spawn_blocking(move || {
                let bytes = blobs.read(&id).map_err(|e| JobError::stage("prepare", e))?;
                EmbeddingTable::from_bytes(&bytes).map_err(|e| JobError::stage("prepare", e))
            })
            .await
            .map_err(|e| JobError::stage("prepare", e))??;
            Arc::new(TableEmbedder::new(Arc::new(table), Some(model), name))
        }
        None => model,
    };
    let out = job_dir(ctx, job).join("data");
    let manifest = prepare_shards(
        inputs,
        embedder,
        &out,
        &pipeline_config(spec),
        |p| {
            ctx.set_live(
                job,
                "prepare",
                format!("prepare: {} {}/{}", p.stage, p.done, p.total),
            )
        },
        cancel.clone(),
    )
    .await
    .map_err(|e| JobError::stage("prepare", e))?;
    let negatives = count_negatives_per_pair(&out.join("train.jsonl"));
    let (train, _) = ctx.blobs.put_file(&out.join("train.jsonl"))?;
    let test = ctx.blobs.put_dir(&out.join("test"))?;
    Ok(PrepareOutput {
        train_blob: train.to_hex(),
        test_bundle: test.to_hex(),
        train_records: manifest.train_records,
        test_queries: manifest.test_queries,
        negatives,
        steps: manifest.steps,
    })
}

/// The chunks and the shards' queries as the prepare step takes them: the generator as the
/// first shard names it, the shards' mean LLM throughput.
pub fn shard_queries(chunks: Vec<Chunk>, shards: &[ShardOutput]) -> ShardQueries {
    let tokens_per_second = if shards.is_empty() {
        0.0
    } else {
        shards.iter().map(|s| s.tokens_per_second).sum::<f64>() / shards.len() as f64
    };
    ShardQueries {
        chunks,
        queries: shards.iter().flat_map(|s| s.questions.clone()).collect(),
        generator: shards
            .first()
            .map(|s| s.generator.clone())
            .unwrap_or_default(),
        tokens_per_second,
    }
}

/// Negatives per pair that training uses for a train.jsonl: the most any record has (shorter
/// records are filled, see `ragd_engine::train::data::uniform_negatives`).
pub fn count_negatives_per_pair(path: &Path) -> usize {
    ragd_engine::train::data::read_pairs(path)
        .ok()
        .and_then(|p| p.iter().map(|x| x.negatives.len()).max())
        .unwrap_or(0)
}

/// Evaluates the base and the fine-tuned model on the held-out queries, at every Matryoshka dim,
/// and on the user's questions when the job has them (they then decide the verdict).
pub async fn evaluate(
    ctx: &JobCtx,
    job: &str,
    spec: &JobSpec,
    model_dir: &Path,
    test_bundle: &BlobId,
) -> Result<EvalOutput, JobError> {
    let test_dir = job_dir(ctx, job).join("test");
    let _ = std::fs::remove_dir_all(&test_dir);
    ctx.blobs.materialize(test_bundle, &test_dir)?;
    let (base, tuned) = (spec.base_model.clone(), model_dir.to_path_buf());
    let question_file = spec.eval_queries.clone();
    tokio::task::spawn_blocking(move || {
        let err = stage_err("evaluate");
        let dev = candle_core::Device::Cpu;
        let data = beir::load(&test_dir, false).map_err(|e| err(e.to_string()))?;
        let b = SentenceEncoder::load_dir(&base, &dev).map_err(|e| err(e.to_string()))?;
        let t = SentenceEncoder::load_dir(&tuned, &dev).map_err(|e| err(e.to_string()))?;
        let dims = ragd_engine::train::loss::matryoshka_dims(None, t.dim())
            .map_err(|e| err(e.to_string()))?;
        let base = eval::evaluate(&b, &data, &dims, 32).map_err(|e| err(e.to_string()))?;
        let tuned = eval::evaluate(&t, &data, &dims, 32).map_err(|e| err(e.to_string()))?;
        let mut out = EvalOutput {
            comparison: eval::compare_widest(&base, &tuned),
            per_dim: eval::compare_per_dim(&base, &tuned),
            base,
            tuned,
            ..EvalOutput::default()
        };
        if let Some(path) = question_file {
            let q = evaluate_questions(&path, &data, &b, &t, &dims);
            if q.error.is_none() {
                out.held_out_comparison = out.comparison.take();
                out.comparison = eval::compare_widest(&q.base, &q.tuned);
                out.per_dim = eval::compare_per_dim(&q.base, &q.tuned);
            }
            out.questions = Some(q);
        }
        Ok(out)
    })
    .await
    .map_err(|e| JobError::stage("evaluate", e))?
}

/// The user's questions judged against the job's chunks (a BEIR directory brings its own
/// corpus); a file that cannot be used is reported in `error`, never fatal to the job.
fn evaluate_questions(
    path: &Path,
    held_out: &beir::BeirDataset,
    base: &SentenceEncoder,
    tuned: &SentenceEncoder,
    dims: &[usize],
) -> QuestionsEval {
    let mut q = QuestionsEval {
        source: path.to_path_buf(),
        ..QuestionsEval::default()
    };
    let resolved = match questions::load(path, Some(&held_out.corpus)) {
        Ok(r) => r,
        Err(e) => {
            if let questions::QuestionsError::NoMatch { unmatched, .. } = &e {
                q.unmatched = unmatched.clone();
            }
            q.error = Some(e.to_string());
            return q;
        }
    };
    q.unmatched = resolved.unmatched;
    q.queries = resolved.data.queries.len();
    let run = |m: &SentenceEncoder| eval::evaluate(m, &resolved.data, dims, 32);
    match (run(base), run(tuned)) {
        (Ok(b), Ok(t)) => (q.base, q.tuned) = (b, t),
        (Err(e), _) | (_, Err(e)) => q.error = Some(e.to_string()),
    }
    q
}

/// Lays the model bundle out in `dest` (replacing what was there).
pub fn export_model(ctx: &JobCtx, model: &BlobId, dest: &Path) -> Result<(), JobError> {
    let tmp = dest.with_extension("incoming");
    let _ = std::fs::remove_dir_all(&tmp);
    ctx.blobs.materialize(model, &tmp)?;
    let _ = std::fs::remove_dir_all(dest);
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| JobError::stage("export", format!("{}: {e}", parent.display())))?;
    }
    std::fs::rename(&tmp, dest)
        .map_err(|e| JobError::stage("export", format!("{}: {e}", dest.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_out_sources_come_from_the_split_counts() {
        let prepared = |steps: Vec<(String, StepRecord)>| PrepareOutput {
            train_blob: String::new(),
            test_bundle: String::new(),
            train_records: 0,
            test_queries: 0,
            negatives: 0,
            steps,
        };
        let split = |test: u64, ict: u64| {
            let counts = [("test".to_string(), test), ("test_ict".to_string(), ict)];
            vec![(
                "split".to_string(),
                StepRecord {
                    seconds: 0.0,
                    counts: counts.into(),
                },
            )]
        };
        assert!(prepared(split(10, 10)).held_out_all_ict());
        assert!(!prepared(split(10, 4)).held_out_all_ict());
        assert!(!prepared(split(0, 0)).held_out_all_ict());
        // A manifest without the split's source counts (an older worker) says nothing.
        assert!(!prepared(Vec::new()).held_out_all_ict());
    }
}
