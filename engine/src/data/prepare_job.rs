//! The prepare step as a cluster job runs it: the generation shards' queries in
//! ([`ShardQueries`], [`prepare_shards`]), the texts to embed ahead of the step as embedding
//! shards ([`texts_to_embed`]), and progress handed to the caller's task ([`with_progress`]).

use std::collections::HashMap;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use tokio_util::sync::CancellationToken;

use super::chunk::Chunk;
use super::embed::Embedder;
use super::filter::text_filters;
use super::llm::generate::GeneratedQuery;
use super::output::Manifest;
use super::prepare::{prepare, PrepareInput};
use super::step::{GeneratorSummary, PipelineConfig, PipelineError, StepLog};
use super::{Progress, ProgressSender};

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
