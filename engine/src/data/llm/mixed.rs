//! ICT and an LLM together (`--llm builtin+ict`, `ollama:MODEL+ict`, ...): the LLM writes
//! questions for as many chunks as its budget allows (a number of chunks, or minutes), taken in
//! a seeded order that spreads them over the corpus; ICT covers every other chunk, and every
//! chunk the LLM gave nothing for. A small LLM on a CPU covers a fraction of a corpus per hour
//! while ICT covers all of it at once: together, every chunk has a query and as many as the
//! budget allows read like a user's.

use std::sync::Arc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::generate::{chunk_seed, GenerateError, Generation, GeneratorInfo, QueryGenerator};
use super::ict::IctGenerator;
use crate::data::chunk::Chunk;
use crate::data::ProgressSender;

pub use ragd_shared::protocol::job_spec::LlmBudget;

/// The order in which the LLM takes chunks: a seeded hash of each id (spread over the corpus,
/// independent of input order); shared by `generate-data` and the coordinator's jobs.
pub fn llm_order(chunks: &[Chunk], seed: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..chunks.len()).collect();
    order.sort_by_key(|&i| (chunk_seed(seed ^ 0x11_3a11, &chunks[i].id), i));
    order
}

/// An LLM generator within a budget, ICT for the rest.
pub struct MixedGenerator {
    llm: Arc<dyn QueryGenerator>,
    ict: IctGenerator,
    budget: LlmBudget,
    seed: u64,
}

impl MixedGenerator {
    /// Combines `llm` (within `budget`) and `ict`; `seed` orders the chunks the LLM takes.
    pub fn new(
        llm: Arc<dyn QueryGenerator>,
        ict: IctGenerator,
        budget: LlmBudget,
        seed: u64,
    ) -> Self {
        Self {
            llm,
            ict,
            budget,
            seed,
        }
    }
}

#[async_trait::async_trait]
impl QueryGenerator for MixedGenerator {
    fn info(&self) -> GeneratorInfo {
        let mut info = self.llm.info();
        info.backend.kind = format!("{}+ict", info.backend.kind);
        info
    }

    async fn check(&self) -> Result<(), GenerateError> {
        self.llm.check().await
    }

    async fn generate(
        &self,
        chunks: &[Chunk],
        progress: Option<&ProgressSender>,
        cancel: &CancellationToken,
    ) -> Result<Generation, GenerateError> {
        let start = Instant::now();
        let order = llm_order(chunks, self.seed);
        let take = match self.budget {
            LlmBudget::Chunks(n) => n.min(order.len()),
            LlmBudget::Time(_) => order.len(),
        };
        let ordered: Vec<Chunk> = order[..take].iter().map(|&i| chunks[i].clone()).collect();
        let mut total = match self.budget {
            LlmBudget::Chunks(_) => self.llm.generate(&ordered, progress, cancel).await?,
            LlmBudget::Time(d) => {
                self.llm
                    .generate_until(&ordered, start + d, progress, cancel)
                    .await?
            }
        };
        let taken = total.counts.chunks;
        let covered: std::collections::HashSet<&str> =
            total.queries.iter().map(|q| q.chunk_id.as_str()).collect();
        let rest: Vec<Chunk> = chunks
            .iter()
            .filter(|c| !covered.contains(c.id.as_str()))
            .cloned()
            .collect();
        let llm_queries = total.queries.len();
        // Chunks the LLM failed on are counted once, by what ICT makes of them.
        total.counts.chunks_failed = 0;
        total.absorb(self.ict.generate(&rest, progress, cancel).await?);
        tracing::info!(
            llm_chunks = taken,
            llm_queries,
            ict_chunks = rest.len(),
            "questions written by the LLM within its budget, ICT for the rest"
        );
        let position: std::collections::HashMap<&str, usize> = chunks
            .iter()
            .enumerate()
            .map(|(i, c)| (c.id.as_str(), i))
            .collect();
        total.queries.sort_by_key(|q| {
            position
                .get(q.chunk_id.as_str())
                .copied()
                .unwrap_or(usize::MAX)
        });
        total.counts.chunks = chunks.len();
        total.wall_seconds = start.elapsed().as_secs_f64();
        Ok(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::llm::generate::{GeneratedQuery, QuerySource};
    use crate::data::llm::ict::IctConfig;
    use crate::data::llm::BackendInfo;
    use std::sync::Mutex;
    use std::time::Duration;

    /// An LLM stand-in: one question per chunk, none for chunks whose id ends in 7.
    #[derive(Default)]
    struct Scripted {
        seen: Mutex<Vec<String>>,
    }

    #[async_trait::async_trait]
    impl QueryGenerator for Scripted {
        fn info(&self) -> GeneratorInfo {
            GeneratorInfo {
                backend: BackendInfo {
                    kind: "builtin".into(),
                    model: "scripted".into(),
                    endpoint: None,
                },
                prompt_hash: Some("h".into()),
            }
        }
        async fn check(&self) -> Result<(), GenerateError> {
            Ok(())
        }
        async fn generate(
            &self,
            chunks: &[Chunk],
            _: Option<&ProgressSender>,
            _: &CancellationToken,
        ) -> Result<Generation, GenerateError> {
            let mut g = Generation::default();
            g.counts.chunks = chunks.len();
            for c in chunks {
                self.seen.lock().unwrap().push(c.id.clone());
                if c.id.ends_with('7') {
                    g.counts.chunks_failed += 1;
                    continue;
                }
                g.counts.chunks_with_queries += 1;
                g.counts.queries += 1;
                g.queries.push(GeneratedQuery {
                    query: format!("what is in {}?", c.id),
                    chunk_id: c.id.clone(),
                    positive_text: None,
                    source: QuerySource::Llm,
                });
            }
            Ok(g)
        }
        async fn generate_until(
            &self,
            chunks: &[Chunk],
            deadline: Instant,
            progress: Option<&ProgressSender>,
            cancel: &CancellationToken,
        ) -> Result<Generation, GenerateError> {
            if Instant::now() >= deadline {
                return Ok(Generation::default());
            }
            self.generate(chunks, progress, cancel).await
        }
    }

    fn chunks() -> Vec<Chunk> {
        (0..20)
            .map(|i| Chunk {
                id: format!("d{}_chunk_{i}", i % 4),
                document_id: format!("d{}", i % 4),
                text: format!("Sentence one of chunk {i} is here. Sentence two of chunk {i} follows it. A third one ends chunk {i}."),
            })
            .collect()
    }

    async fn run(budget: LlmBudget) -> (Generation, Vec<String>, GeneratorInfo) {
        let llm = Arc::new(Scripted::default());
        let ict = IctGenerator::new(IctConfig {
            queries_per_chunk: 1,
            ..Default::default()
        });
        let mixed = MixedGenerator::new(llm.clone(), ict, budget, 5);
        let g = mixed
            .generate(&chunks(), None, &CancellationToken::new())
            .await
            .unwrap();
        let seen = llm.seen.lock().unwrap().clone();
        (g, seen, mixed.info())
    }

    #[tokio::test]
    async fn the_llm_takes_its_budget_and_ict_covers_the_rest() {
        let (g, seen, info) = run(LlmBudget::Chunks(12)).await;
        assert_eq!(info.backend.kind, "builtin+ict");
        assert_eq!(seen.len(), 12);
        let docs: std::collections::HashSet<&str> = seen.iter().map(|s| &s[..2]).collect();
        assert!(docs.len() > 1, "spread over the corpus: {seen:?}");
        let llm: Vec<&GeneratedQuery> = g
            .queries
            .iter()
            .filter(|q| q.source == QuerySource::Llm)
            .collect();
        let failed = seen.iter().filter(|s| s.ends_with('7')).count();
        assert_eq!(llm.len(), 12 - failed);
        // Every chunk has a query: the LLM's, or ICT's (its failures included).
        let covered: std::collections::HashSet<&str> =
            g.queries.iter().map(|q| q.chunk_id.as_str()).collect();
        assert_eq!(covered.len(), 20);
        assert_eq!(g.counts.chunks, 20);
        assert_eq!(g.counts.queries, g.queries.len());
        assert_eq!(g.counts.chunks_with_queries, 20);
        // In chunk order, and the same run twice.
        let order: Vec<&str> = g.queries.iter().map(|q| q.chunk_id.as_str()).collect();
        let ids: Vec<String> = chunks().iter().map(|c| c.id.clone()).collect();
        let want: Vec<&str> = ids.iter().map(String::as_str).collect();
        assert_eq!(order, want);
        assert_eq!(run(LlmBudget::Chunks(12)).await.1, seen);
    }

    #[tokio::test]
    async fn no_time_means_ict_only_and_budgets_parse() {
        let (g, seen, _) = run(LlmBudget::Time(Duration::ZERO)).await;
        assert!(seen.is_empty());
        assert!(g.queries.iter().all(|q| q.source == QuerySource::Ict));
        assert_eq!(g.queries.len(), 20);
        let (_, all, _) = run(LlmBudget::Time(Duration::from_secs(60))).await;
        assert_eq!(all.len(), 20);
        assert_eq!("500".parse::<LlmBudget>(), Ok(LlmBudget::Chunks(500)));
        assert_eq!(
            "0.5m".parse::<LlmBudget>(),
            Ok(LlmBudget::Time(Duration::from_secs(30)))
        );
        for bad in ["", "m", "-1m", "ten", "5s"] {
            assert!(
                bad.parse::<LlmBudget>().unwrap_err().contains("30m"),
                "{bad}"
            );
        }
    }
}
