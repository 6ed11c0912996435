//! The prepare step: generated queries -> filters (text, judge, round trip) -> split by document ->
//! hard negatives for the training queries -> `train.jsonl`, `test/` and `manifest.json`.
//!
//! One path for every caller: `generate-data` on one machine ([`super::pipeline`]), a worker's
//! prepare task and the coordinator's fallback when no worker can embed ([`prepare_shards`]).

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
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
use super::{Progress, ProgressSender};

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

/// Every text [`prepare`] embeds for these inputs (without a judge), once each, longest first:
/// the corpus, the queries that pass the text filters, and their ICT positives. A cluster job
/// embeds them as shards over its workers ahead of the step (see [`super::embed_table`]).
pub fn texts_to_embed(
    chunks: &[Chunk],
    generated: &[GeneratedQuery],
    config: &PipelineConfig,
) -> Result<Vec<String>, PipelineError> {
    let by_id: HashMap<&str, &Chunk> = chunks.iter().map(|c| (c.id.as_str(), c)).collect();
    let (kept, _) = text_filters(generated.to_vec(), &by_id, &config.filter)?;
    let texts = chunks.iter().map(|c| c.text.clone()).chain(
        kept.into_iter()
            .flat_map(|q| std::iter::once(q.query).chain(q.positive_text)),
    );
    Ok(super::embed_table::unique_longest_first(texts))
}

/// What a job's generation shards produced, ready for [`prepare_shards`].
pub struct ShardQueries {
    /// Every chunk of the corpus.
    pub chunks: Vec<Chunk>,
    /// The queries of every shard, in shard order.
    pub queries: Vec<GeneratedQuery>,
    /// The generator as the first shard reported it (`"ollama qwen2.5:3b"`, `"ict"`).
    pub generator: String,
    /// The shards' mean LLM tokens per second.
    pub tokens_per_second: f64,
}

/// The prepare step of a cluster job (a worker's task, or the coordinator's fallback): runs
/// [`prepare`] with `embedder` over the shards' queries, handing each progress report to
/// `on_progress` in the caller's task (no task of its own to own or stop).
pub async fn prepare_shards(
    shards: ShardQueries,
    embedder: Arc<dyn Embedder>,
    out: &Path,
    config: &PipelineConfig,
    on_progress: impl FnMut(Progress),
    cancel: CancellationToken,
) -> Result<Manifest, PipelineError> {
    let input = PrepareInput {
        chunks: Arc::new(shards.chunks),
        generated: shards.queries,
        embedder,
        judge: None,
        generator: GeneratorSummary::from_label(&shards.generator, shards.tokens_per_second),
        steps: StepLog::new(),
        started: Instant::now(),
    };
    with_progress(on_progress, |tx| {
        prepare(input, out, config, Some(tx), cancel)
    })
    .await
}

/// Runs the future `work` makes from a progress sender, and hands every report it sends to
/// `on_progress`, in this task, until the work is done and its senders are gone.
pub async fn with_progress<F: Future>(
    mut on_progress: impl FnMut(Progress),
    work: impl FnOnce(ProgressSender) -> F,
) -> F::Output {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let work = work(tx);
    tokio::pin!(work);
    loop {
        tokio::select! {
            out = &mut work => {
                while let Ok(p) = rx.try_recv() {
                    on_progress(p);
                }
                return out;
            }
            Some(p) = rx.recv() => on_progress(p),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::embed::HashingEmbedder;
    use crate::data::llm::generate::QuerySource;
    use crate::data::mine::MineConfig;
    use crate::data::split::SplitConfig;

    fn chunk(doc: usize, text: &str) -> Chunk {
        Chunk {
            id: format!("d{doc}_chunk_0"),
            document_id: format!("d{doc}"),
            text: text.into(),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shards_become_training_data_with_progress_reported() {
        let texts = [
            "Checkpoints write every dirty buffer to disk at intervals set by a timeout.",
            "Autovacuum launches worker processes that remove dead row versions from tables.",
            "Git stores every version of a file as a blob object and commits point to trees.",
            "The planner estimates the cost of each plan from table statistics and picks one.",
        ];
        let questions = [
            "when are dirty buffers written to disk",
            "what removes dead row versions from tables",
            "how does git store versions of files",
            "how does the planner choose a query plan",
        ];
        let shards = ShardQueries {
            chunks: texts.iter().enumerate().map(|(i, t)| chunk(i, t)).collect(),
            queries: questions
                .iter()
                .enumerate()
                .map(|(i, q)| GeneratedQuery {
                    query: q.to_string(),
                    chunk_id: format!("d{i}_chunk_0"),
                    positive_text: None,
                    source: QuerySource::Llm,
                })
                .collect(),
            generator: "ollama qwen2.5:3b".into(),
            tokens_per_second: 10.0,
        };
        let config = PipelineConfig {
            round_trip_k: None,
            embed_batch: 2,
            mine: MineConfig {
                num_negatives: 1,
                relative_margin: None,
                ..Default::default()
            },
            split: SplitConfig {
                test_fraction: 0.25,
                seed: 3,
            },
            ..Default::default()
        };
        let tmp = tempfile::tempdir().unwrap();
        let mut reports = 0;
        let m = prepare_shards(
            shards,
            Arc::new(HashingEmbedder::new(128)),
            tmp.path(),
            &config,
            |_| reports += 1,
            CancellationToken::new(),
        )
        .await
        .unwrap();
        assert_eq!(
            (m.generator.as_str(), m.model.as_str()),
            ("ollama", "qwen2.5:3b")
        );
        assert_eq!(m.train_records + m.test_queries, 4, "{m:?}");
        assert!(m.test_queries >= 1, "{m:?}");
        assert!(reports > 0, "progress reports reach the caller");
        let steps: Vec<&str> = m.steps.iter().map(|(s, _)| s.as_str()).collect();
        assert_eq!(steps, ["filter", "split", "mine", "write"]);
        assert!(tmp.path().join("train.jsonl").is_file());
        assert!(tmp.path().join("test/queries.jsonl").is_file());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_table_of_the_texts_to_embed_gives_the_same_data_without_the_model() {
        use crate::data::embed_table::{EmbeddingTable, TableEmbedder};
        let texts = [
            "Checkpoints write every dirty buffer to disk. The interval is set by a timeout.",
            "Autovacuum launches workers. They remove dead row versions from tables.",
            "Git stores every version of a file as a blob. Commits point to trees.",
            "The planner estimates the cost of each plan. It picks the cheapest one.",
            "Replication streams the write-ahead log. Standbys replay it as it arrives.",
            "Indexes speed up lookups. They cost time on every write to the table.",
        ];
        let chunks: Vec<Chunk> = texts.iter().enumerate().map(|(i, t)| chunk(i, t)).collect();
        let mut queries = Vec::new();
        for (i, t) in texts.iter().enumerate() {
            let (first, rest) = t.split_once(". ").unwrap();
            queries.push(GeneratedQuery {
                query: first.to_string(),
                chunk_id: format!("d{i}_chunk_0"),
                positive_text: Some(rest.to_string()),
                source: QuerySource::Ict,
            });
            queries.push(GeneratedQuery {
                query: format!("what does the text {i} say about {}", &rest[..12]),
                chunk_id: format!("d{i}_chunk_0"),
                positive_text: None,
                source: QuerySource::Llm,
            });
        }
        let config = PipelineConfig {
            round_trip_k: Some(3),
            embed_batch: 4,
            mine: MineConfig {
                num_negatives: 2,
                relative_margin: None,
                ..Default::default()
            },
            split: SplitConfig {
                test_fraction: 0.3,
                seed: 5,
            },
            ..Default::default()
        };
        let model: Arc<dyn Embedder> = Arc::new(HashingEmbedder::new(64));
        let wanted = texts_to_embed(&chunks, &queries, &config).unwrap();
        let mut table = EmbeddingTable::new(64);
        for (t, v) in wanted.iter().zip(model.embed(&wanted).unwrap()) {
            table.insert(t, &v).unwrap();
        }
        let run = |embedder: Arc<dyn Embedder>| {
            let (chunks, queries, config) = (chunks.clone(), queries.clone(), config.clone());
            async move {
                let tmp = tempfile::tempdir().unwrap();
                let shards = ShardQueries {
                    chunks,
                    queries,
                    generator: "ict".into(),
                    tokens_per_second: 0.0,
                };
                let m = prepare_shards(
                    shards,
                    embedder,
                    tmp.path(),
                    &config,
                    |_| {},
                    CancellationToken::new(),
                )
                .await
                .unwrap();
                let train = std::fs::read_to_string(tmp.path().join("train.jsonl")).unwrap();
                (m.train_records, m.test_queries, train)
            }
        };
        let with_model = run(model.clone()).await;
        // No fallback: a text the table lacks would fail the run.
        let from_table = run(Arc::new(TableEmbedder::new(
            Arc::new(table),
            None,
            "m".into(),
        )))
        .await;
        assert_eq!(from_table, with_model);
        assert!(with_model.0 > 0 && with_model.2.contains("negatives"));
    }
}
