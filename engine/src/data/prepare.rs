//! The prepare step: generated queries -> filters (text, judge, round trip) -> split by document ->
//! hard negatives for the training queries -> `train.jsonl`, `test/` and `manifest.json`.
//!
//! One path for every caller: `generate-data` on one machine ([`super::pipeline`]), a worker's
//! prepare task and the coordinator's fallback when no worker can embed
//! ([`super::prepare_job::prepare_shards`]).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use tokio_util::sync::CancellationToken;

use super::chunk::Chunk;
use super::embed::{dot, embed_all, Embedder, EmbeddingMatrix};
use super::filter::{judge_filter, round_trip_filter, round_trip_keep, text_filters};
use super::llm::generate::GeneratedQuery;
use super::llm::LlmBackend;
use super::mine::{mine_hard_negatives, MineInput, Mined};
use super::output::{
    write_beir, write_manifest, write_train, Manifest, NegativeRef, TestQuery, TrainRecord,
};
use super::split::{split_held_out, Split, SplitUnit};
use super::step::{
    blocking, counts, record, snake, GeneratorSummary, PipelineConfig, PipelineError, StepLog,
};
use super::ProgressSender;

/// What the prepare step works on.
pub struct PrepareInput {
    /// Every chunk of the corpus (the search space of mining and the round trip).
    pub chunks: Arc<Vec<Chunk>>,
    /// The generated queries.
    pub generated: Vec<GeneratedQuery>,
    /// The embedder (the base model).
    pub embedder: Arc<dyn Embedder>,
    /// An LLM judge, if one filters the queries.
    pub judge: Option<Arc<dyn LlmBackend>>,
    /// What generated the queries, for the manifest.
    pub generator: GeneratorSummary,
    /// Steps already done (ingest, chunk, generate), continued in the manifest.
    pub steps: StepLog,
    /// When the whole run started, for the manifest's total.
    pub started: Instant,
}

/// The shared parts of one prepare run.
struct Ctx<'a> {
    chunks: Arc<Vec<Chunk>>,
    row_of: HashMap<String, usize>,
    embedder: Arc<dyn Embedder>,
    config: &'a PipelineConfig,
    progress: Option<ProgressSender>,
    cancel: CancellationToken,
}

impl Ctx<'_> {
    fn chunk(&self, id: &str) -> &Chunk {
        &self.chunks[self.row_of[id]]
    }

    /// Embeds `texts` on a blocking thread, reporting progress as `stage`.
    async fn embed(
        &self,
        stage: &'static str,
        texts: Vec<String>,
    ) -> Result<EmbeddingMatrix, PipelineError> {
        let (emb, batch, tx, c) = (
            self.embedder.clone(),
            self.config.embed_batch.max(1),
            self.progress.clone(),
            self.cancel.clone(),
        );
        blocking(stage, move || {
            embed_all(emb.as_ref(), &texts, batch, stage, tx.as_ref(), &c)
        })
        .await
    }
}

/// Queries that passed the filters, with their embeddings and the corpus's.
struct Filtered {
    queries: Vec<GeneratedQuery>,
    query_emb: EmbeddingMatrix,
    corpus_emb: Arc<EmbeddingMatrix>,
}

/// Filters, splits and mines the generated queries and writes `train.jsonl`, `test/` and
/// `manifest.json` under `out` (steps `filter`, `split`, `mine`, `write`).
pub async fn prepare(
    input: PrepareInput,
    out: &Path,
    config: &PipelineConfig,
    progress: Option<ProgressSender>,
    cancel: CancellationToken,
) -> Result<Manifest, PipelineError> {
    let PrepareInput {
        chunks,
        generated,
        embedder,
        judge,
        generator,
        mut steps,
        started,
    } = input;
    let row_of = chunks
        .iter()
        .enumerate()
        .map(|(i, c)| (c.id.clone(), i))
        .collect();
    let ctx = Ctx {
        chunks,
        row_of,
        embedder,
        config,
        progress,
        cancel,
    };
    let filtered = filter(&ctx, generated, judge.as_deref(), &mut steps).await?;

    let t = Instant::now();
    let document_of: HashMap<String, String> = ctx
        .chunks
        .iter()
        .map(|c| (c.id.clone(), c.document_id.clone()))
        .collect();
    let split = split_held_out(filtered.queries.clone(), &document_of, &config.split)?;
    let by_chunk = split.unit == SplitUnit::Chunk;
    if by_chunk {
        tracing::warn!(
            "every query comes from one document: the test set is held out by chunk, so its \
             chunks' neighbours are in training and the evaluation overstates the gain"
        );
    }
    record(
        &mut steps,
        "split",
        t,
        counts([
            ("train", split.train.len()),
            ("test", split.test.len()),
            ("test_chunks", split.test_chunks.len()),
            (
                "test_documents",
                if by_chunk { 0 } else { split.test_units },
            ),
            ("held_out_by_chunk", usize::from(by_chunk)),
            ("test_llm", split.test_sources().0),
            ("test_ict", split.test_sources().1),
            ("set_aside_ict", split.set_aside_ict),
        ]),
    );

    let t = Instant::now();
    let mined = mine(&ctx, &filtered, &split).await?;
    let m = &mined.counts;
    record(
        &mut steps,
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

    let t = Instant::now();
    let (records, test_queries) = outputs(&ctx, &split, &mined);
    write_train(&out.join("train.jsonl"), &records)?;
    write_beir(&out.join("test"), &ctx.chunks, &test_queries)?;
    record(
        &mut steps,
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
        embedder: ctx.embedder.name(),
        seed: config.seed,
        settings: serde_json::to_value(config).unwrap_or_default(),
        steps,
        tokens_per_second: generator.tokens_per_second,
        train_records: records.len(),
        test_queries: test_queries.len(),
        total_seconds: started.elapsed().as_secs_f64(),
    };
    write_manifest(&out.join("manifest.json"), &manifest)?;
    tracing::info!(
        train = manifest.train_records,
        test = manifest.test_queries,
        "training data written"
    );
    Ok(manifest)
}

/// The `filter` step: text filters, the judge (if any), then the round trip (a query is kept
/// when its chunk is among its top `round_trip_k` chunks). Embeds the corpus and the queries.
async fn filter(
    ctx: &Ctx<'_>,
    generated: Vec<GeneratedQuery>,
    judge: Option<&dyn LlmBackend>,
    steps: &mut StepLog,
) -> Result<Filtered, PipelineError> {
    let t = Instant::now();
    let by_id: HashMap<&str, &Chunk> = ctx.chunks.iter().map(|c| (c.id.as_str(), c)).collect();
    let (mut queries, mut fc) = text_filters(generated, &by_id, &ctx.config.filter)?;
    let mut extra = BTreeMap::new();
    if let Some(judge) = judge {
        let (kept, jc) = judge_filter(
            queries,
            &by_id,
            judge,
            ctx.config.judge_concurrency,
            &mut fc,
            &ctx.cancel,
        )
        .await?;
        queries = kept;
        extra.insert("judge_unreadable".to_string(), jc.unreadable as u64);
    }
    let texts = ctx.chunks.iter().map(|c| c.text.clone()).collect();
    let corpus_emb = Arc::new(ctx.embed("embed corpus", texts).await?);
    let q_texts = queries.iter().map(|q| q.query.clone()).collect();
    let mut query_emb = ctx.embed("embed queries", q_texts).await?;
    if let Some(k) = ctx.config.round_trip_k {
        let rows: Vec<usize> = queries.iter().map(|q| ctx.row_of[&q.chunk_id]).collect();
        let (ce, tx, c) = (corpus_emb.clone(), ctx.progress.clone(), ctx.cancel.clone());
        let (keep, all) = blocking("round trip", move || {
            round_trip_keep(&query_emb, &rows, &ce, k, tx.as_ref(), &c)
                .map(|keep| (keep, query_emb))
        })
        .await?;
        queries = round_trip_filter(queries, &keep, &mut fc);
        let rows = (0..all.len())
            .filter(|&i| keep[i])
            .map(|i| all.row(i).to_vec());
        query_emb = EmbeddingMatrix::from_rows(rows.collect())?;
    }
    let mut fcounts = counts(
        fc.iter()
            .map(|(k, v)| (format!("dropped_{}", snake(k)), *v)),
    );
    fcounts.extend(extra);
    fcounts.insert("kept".into(), queries.len() as u64);
    record(steps, "filter", t, fcounts);
    if queries.is_empty() {
        return Err(PipelineError::Empty {
            step: "filtering".into(),
            hint: "every generated query was dropped; see the manifest's filter counts".into(),
        });
    }
    Ok(Filtered {
        queries,
        query_emb,
        corpus_emb,
    })
}

/// The `mine` step: hard negatives for the training queries of `split`, scored against each
/// query's positive (the chunk, or the ICT positive text, embedded here).
async fn mine(ctx: &Ctx<'_>, filtered: &Filtered, split: &Split) -> Result<Mined, PipelineError> {
    let train_q = EmbeddingMatrix::from_rows(
        filtered
            .queries
            .iter()
            .enumerate()
            .filter(|(_, q)| !split.test_chunks.contains(&q.chunk_id))
            .map(|(i, _)| filtered.query_emb.row(i).to_vec())
            .collect(),
    )?;
    let pos_rows: Vec<usize> = split
        .train
        .iter()
        .map(|q| ctx.row_of[&q.chunk_id])
        .collect();
    let ict_texts: Vec<String> = split
        .train
        .iter()
        .filter_map(|q| q.positive_text.clone())
        .collect();
    let ict_emb = if ict_texts.is_empty() {
        None
    } else {
        Some(ctx.embed("embed positives", ict_texts).await?)
    };
    let corpus_emb = &filtered.corpus_emb;
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
    let texts: Vec<String> = ctx.chunks.iter().map(|c| c.text.clone()).collect();
    let (mc, tx, c, ce) = (
        ctx.config.mine.clone(),
        ctx.progress.clone(),
        ctx.cancel.clone(),
        corpus_emb.clone(),
    );
    blocking("mine", move || {
        let input = MineInput {
            queries: &train_q,
            positive_scores: &pos_scores,
            positive_rows: &pos_rows,
            corpus: &ce,
            corpus_texts: &texts,
        };
        mine_hard_negatives(input, &mc, tx.as_ref(), &c)
    })
    .await
}

/// The training records (query, positive, negatives) and the held-out queries (numbered per
/// chunk) of the `write` step.
fn outputs(ctx: &Ctx<'_>, split: &Split, mined: &Mined) -> (Vec<TrainRecord>, Vec<TestQuery>) {
    let records = split
        .train
        .iter()
        .zip(&mined.negatives)
        .map(|(q, negs)| {
            let chunk = ctx.chunk(&q.chunk_id);
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
                        id: ctx.chunks[h.index].id.clone(),
                        text: ctx.chunks[h.index].text.clone(),
                    })
                    .collect(),
                source_document: chunk.document_id.clone(),
            }
        })
        .collect();
    let mut per_chunk: HashMap<&str, usize> = HashMap::new();
    let test_queries = split
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
    (records, test_queries)
}
