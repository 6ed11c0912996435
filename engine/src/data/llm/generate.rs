//! Question generation for a shard of chunks through any [`LlmBackend`], or without an LLM.
//!
//! For each chunk the prompt asks for N questions in JSON; the answer goes through the tolerant
//! parser; an answer with no usable question (malformed, truncated, empty) is asked again with
//! another seed, up to `max_attempts`, then the chunk counts as failed. Chunks run with bounded
//! concurrency; output order follows chunk order, and per-chunk seeds derive from the run seed and
//! the chunk id, so a shard's output does not depend on how the corpus was sharded.
use std::sync::Arc;

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::parse::parse_questions;
use super::{BackendInfo, ChatRequest, LlmBackend, LlmError, ThroughputStats};
use crate::data::chunk::Chunk;
use crate::data::{Progress, ProgressSender};

/// Errors that stop generation.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    /// The backend is unusable (server down, model missing).
    #[error("LLM backend not usable: {source}")]
    Backend {
        /// The backend's error.
        #[from]
        source: LlmError,
    },
    /// Too many chunks in a row failed: the backend is likely broken.
    #[error(
        "{count} chunks in a row failed; last error: {last}. Check the LLM server and its logs"
    )]
    TooManyFailures {
        /// Consecutive failures.
        count: usize,
        /// The last failure.
        last: String,
    },
    /// The prompt template is unusable.
    #[error(transparent)]
    InvalidPrompt(#[from] InvalidPrompt),
    /// The run was cancelled.
    #[error("generation cancelled")]
    Cancelled,
}

/// Generated queries and their source (the wire types, one on both sides of a job).
pub use ragd_shared::protocol::jobs::{GeneratedQuery, QuerySource};

pub use super::prompt::{questions_asked, questions_schema, InvalidPrompt, PromptTemplate};

/// Generation settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerateConfig {
    /// Questions asked per chunk.
    pub queries_per_chunk: usize,
    /// Requests per chunk before it counts as failed.
    pub max_attempts: u32,
    /// Sampling temperature.
    pub temperature: f32,
    /// Most tokens per answer.
    pub max_tokens: u32,
    /// Run seed.
    pub seed: u64,
    /// Chunks in flight at once.
    pub concurrency: usize,
    /// Consecutive failed chunks that stop the run.
    pub max_consecutive_failures: usize,
}

impl Default for GenerateConfig {
    fn default() -> Self {
        Self {
            queries_per_chunk: 2,
            max_attempts: 3,
            temperature: 0.7,
            max_tokens: 256,
            seed: 42,
            concurrency: 4,
            max_consecutive_failures: 25,
        }
    }
}

/// Counts of a generation run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenerationCounts {
    /// Chunks given.
    pub chunks: usize,
    /// Chunks that got at least one query.
    pub chunks_with_queries: usize,
    /// Chunks that got none after all attempts.
    pub chunks_failed: usize,
    /// Queries produced.
    pub queries: usize,
    /// Answers without a usable question (malformed, truncated, empty), each retried.
    pub unusable_answers: usize,
    /// Requests that failed at the backend after its own retries.
    pub backend_errors: usize,
    /// Candidate lines dropped as non-questions.
    pub non_questions_dropped: usize,
}

/// The result of generating for a shard.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Generation {
    /// Queries in chunk order.
    pub queries: Vec<GeneratedQuery>,
    /// Counts.
    pub counts: GenerationCounts,
    /// Backend throughput (zero for ICT).
    pub throughput: ThroughputStats,
    /// Wall time of the run.
    pub wall_seconds: f64,
}

impl Generation {
    /// Adds another run's queries, counts and throughput to this one (`chunks` and
    /// `wall_seconds` are the caller's to set).
    pub fn absorb(&mut self, part: Generation) {
        let (c, p) = (&mut self.counts, part.counts);
        c.chunks_with_queries += p.chunks_with_queries;
        c.chunks_failed += p.chunks_failed;
        c.queries += p.queries;
        c.unusable_answers += p.unusable_answers;
        c.backend_errors += p.backend_errors;
        c.non_questions_dropped += p.non_questions_dropped;
        self.queries.extend(part.queries);
        let (t, q) = (&mut self.throughput, part.throughput);
        t.requests += q.requests;
        t.failed_attempts += q.failed_attempts;
        t.completion_tokens += q.completion_tokens;
        t.prompt_tokens += q.prompt_tokens;
        t.generation_seconds += q.generation_seconds;
        if t.generation_seconds > 0.0 {
            t.tokens_per_second = t.completion_tokens as f64 / t.generation_seconds;
        }
    }
}

/// What generated the queries, for the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GeneratorInfo {
    /// The backend.
    pub backend: BackendInfo,
    /// Hash of the prompt (none for ICT).
    pub prompt_hash: Option<String>,
}

/// Turns chunks into queries.
#[async_trait::async_trait]
pub trait QueryGenerator: Send + Sync {
    /// What generates.
    fn info(&self) -> GeneratorInfo;
    /// Checks the generator is usable before a run.
    async fn check(&self) -> Result<(), GenerateError>;
    /// Generates queries for a shard.
    async fn generate(
        &self,
        chunks: &[Chunk],
        progress: Option<&ProgressSender>,
        cancel: &CancellationToken,
    ) -> Result<Generation, GenerateError>;
    /// Like [`generate`](Self::generate), under a time budget: no chunk is started (and no
    /// malformed answer retried) after `deadline`; chunks not started are left out of the
    /// result, neither counted nor failed. Generators quick by nature (ICT) take them all.
    async fn generate_until(
        &self,
        chunks: &[Chunk],
        _deadline: Instant,
        progress: Option<&ProgressSender>,
        cancel: &CancellationToken,
    ) -> Result<Generation, GenerateError> {
        self.generate(chunks, progress, cancel).await
    }
}

/// A per-chunk seed derived from the run seed and the chunk id.
pub fn chunk_seed(seed: u64, chunk_id: &str) -> u64 {
    let mut h = blake3::Hasher::new();
    h.update(&seed.to_le_bytes());
    h.update(chunk_id.as_bytes());
    let bytes = h.finalize();
    u64::from_le_bytes(bytes.as_bytes()[..8].try_into().unwrap_or([0; 8]))
}

/// Generates questions with an LLM backend.
pub struct LlmGenerator {
    backend: Arc<dyn LlmBackend>,
    template: PromptTemplate,
    config: GenerateConfig,
}

/// What one chunk gave: questions, or the last failure; `unusable` answers and `dropped`
/// non-questions either way.
enum ChunkOutcome {
    Ok {
        questions: Vec<String>,
        unusable: usize,
        dropped: usize,
    },
    Failed {
        last: String,
        unusable: usize,
        dropped: usize,
        backend_error: bool,
    },
    /// Not started: the time budget was spent.
    Skipped,
}

impl LlmGenerator {
    /// A generator; fails on a template without `{passage}`.
    pub fn new(
        backend: Arc<dyn LlmBackend>,
        template: PromptTemplate,
        config: GenerateConfig,
    ) -> Result<Self, GenerateError> {
        template.validate()?;
        Ok(Self {
            backend,
            template,
            config,
        })
    }

    /// Generates for `chunks`, starting none after `deadline`; as many chunks in flight as
    /// the configuration and the backend allow (more than the backend serves would only
    /// queue, and queued chunks would start after the deadline).
    async fn run(
        &self,
        chunks: &[Chunk],
        deadline: Option<Instant>,
        progress: Option<&ProgressSender>,
        cancel: &CancellationToken,
    ) -> Result<Generation, GenerateError> {
        let start = Instant::now();
        let mut out = Generation::default();
        let mut consecutive = 0;
        let in_flight = self
            .config
            .concurrency
            .min(self.backend.parallelism().unwrap_or(usize::MAX))
            .max(1);
        let mut results = futures::stream::iter(0..chunks.len())
            .map(|i| async move { (i, self.one_chunk(&chunks[i], deadline).await) })
            .buffered(in_flight);
        let mut done = 0u64;
        loop {
            let next = tokio::select! {
                _ = cancel.cancelled() => return Err(GenerateError::Cancelled),
                n = results.next() => n,
            };
            let Some((i, outcome)) = next else { break };
            let chunk = &chunks[i];
            match outcome {
                ChunkOutcome::Skipped => continue,
                ChunkOutcome::Ok {
                    questions: qs,
                    unusable,
                    dropped,
                } => {
                    consecutive = 0;
                    out.counts.chunks_with_queries += 1;
                    out.counts.unusable_answers += unusable;
                    out.counts.non_questions_dropped += dropped;
                    out.queries.extend(qs.into_iter().map(|q| GeneratedQuery {
                        query: q,
                        chunk_id: chunk.id.clone(),
                        positive_text: None,
                        source: QuerySource::Llm,
                    }));
                }
                ChunkOutcome::Failed {
                    last,
                    unusable,
                    dropped,
                    backend_error,
                } => {
                    if backend_error {
                        out.counts.backend_errors += 1;
                    }
                    out.counts.unusable_answers += unusable;
                    out.counts.non_questions_dropped += dropped;
                    out.counts.chunks_failed += 1;
                    consecutive += 1;
                    tracing::warn!(chunk = %chunk.id, error = %last, "no question for chunk");
                    if consecutive >= self.config.max_consecutive_failures.max(1) {
                        return Err(GenerateError::TooManyFailures {
                            count: consecutive,
                            last,
                        });
                    }
                }
            }
            done += 1;
            out.counts.chunks += 1;
            if let Some(tx) = progress {
                let _ = tx.send(Progress::new("generate", done, chunks.len() as u64));
            }
        }
        out.counts.queries = out.queries.len();
        out.throughput = self.backend.stats();
        out.wall_seconds = start.elapsed().as_secs_f64();
        Ok(out)
    }

    async fn one_chunk(&self, chunk: &Chunk, deadline: Option<Instant>) -> ChunkOutcome {
        let spent = || deadline.is_some_and(|d| Instant::now() >= d);
        if spent() {
            return ChunkOutcome::Skipped;
        }
        let n = self.config.queries_per_chunk;
        let base_seed = chunk_seed(self.config.seed, &chunk.id);
        let mut unusable = 0;
        let mut dropped = 0;
        let mut last = String::from("no attempt made");
        for attempt in 0..self.config.max_attempts.max(1) {
            if attempt > 0 && spent() {
                last = format!("time budget spent after {attempt} unusable answers; {last}");
                break;
            }
            let req = ChatRequest {
                system: Some(self.template.system.clone()),
                user: self.template.render(n, &chunk.text),
                schema: Some(questions_schema(n)),
                temperature: self.config.temperature,
                seed: Some(base_seed.wrapping_add(attempt as u64) & 0x7fff_ffff),
                max_tokens: self.config.max_tokens,
            };
            match self.backend.chat(&req).await {
                Ok(reply) => {
                    let parsed = parse_questions(&reply.text);
                    dropped += parsed.dropped;
                    if parsed.questions.is_empty() {
                        unusable += 1;
                        last = format!(
                            "answer had no usable question{}: {:.80}",
                            if reply.hit_token_limit {
                                " (hit the token limit)"
                            } else {
                                ""
                            },
                            reply.text
                        );
                        tracing::debug!(chunk = %chunk.id, attempt, "unusable answer, retrying");
                        continue;
                    }
                    let mut questions = parsed.questions;
                    questions.truncate(n);
                    return ChunkOutcome::Ok {
                        questions,
                        unusable,
                        dropped,
                    };
                }
                // The backend has already retried transient errors: give up on this chunk.
                Err(e) => {
                    return ChunkOutcome::Failed {
                        last: e.to_string(),
                        unusable,
                        dropped,
                        backend_error: true,
                    }
                }
            }
        }
        ChunkOutcome::Failed {
            last,
            unusable,
            dropped,
            backend_error: false,
        }
    }
}

#[async_trait::async_trait]
impl QueryGenerator for LlmGenerator {
    fn info(&self) -> GeneratorInfo {
        GeneratorInfo {
            backend: self.backend.info(),
            prompt_hash: Some(self.template.hash()),
        }
    }

    async fn check(&self) -> Result<(), GenerateError> {
        Ok(self.backend.check().await?)
    }

    async fn generate(
        &self,
        chunks: &[Chunk],
        progress: Option<&ProgressSender>,
        cancel: &CancellationToken,
    ) -> Result<Generation, GenerateError> {
        self.run(chunks, None, progress, cancel).await
    }

    async fn generate_until(
        &self,
        chunks: &[Chunk],
        deadline: Instant,
        progress: Option<&ProgressSender>,
        cancel: &CancellationToken,
    ) -> Result<Generation, GenerateError> {
        self.run(chunks, Some(deadline), progress, cancel).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::llm::{ChatReply, ThroughputMeter};
    use std::sync::Mutex;

    /// A backend that answers from a script and records the requests it got; each answer
    /// takes `delay`, and it serves `parallelism` requests at once where that is set.
    struct Scripted {
        answers: Mutex<Vec<String>>,
        seen: Mutex<Vec<ChatRequest>>,
        meter: ThroughputMeter,
        delay: std::time::Duration,
        parallelism: Option<usize>,
    }

    impl Scripted {
        fn new(answers: &[&str]) -> Self {
            Self {
                answers: Mutex::new(answers.iter().rev().map(|s| s.to_string()).collect()),
                seen: Mutex::new(Vec::new()),
                meter: ThroughputMeter::default(),
                delay: std::time::Duration::ZERO,
                parallelism: None,
            }
        }
    }

    #[async_trait::async_trait]
    impl LlmBackend for Scripted {
        fn info(&self) -> BackendInfo {
            BackendInfo {
                kind: "scripted".into(),
                model: "script".into(),
                endpoint: None,
            }
        }
        async fn check(&self) -> Result<(), LlmError> {
            Ok(())
        }
        async fn chat(&self, request: &ChatRequest) -> Result<ChatReply, LlmError> {
            self.seen.lock().unwrap().push(request.clone());
            tokio::time::sleep(self.delay).await;
            let text = self
                .answers
                .lock()
                .unwrap()
                .pop()
                .ok_or(LlmError::Builtin {
                    message: "script exhausted".into(),
                })?;
            let reply = ChatReply {
                text,
                completion_tokens: Some(4),
                ..Default::default()
            };
            self.meter.record(&reply);
            Ok(reply)
        }
        fn stats(&self) -> ThroughputStats {
            self.meter.snapshot()
        }
        fn parallelism(&self) -> Option<usize> {
            self.parallelism
        }
    }

    fn chunk(i: usize) -> Chunk {
        Chunk {
            id: format!("d_chunk_{i}"),
            document_id: "d".into(),
            text: format!("passage {i}"),
        }
    }

    #[tokio::test]
    async fn retries_with_new_seeds_truncates_and_counts() {
        let backend = Arc::new(Scripted::new(&[
            "not a question at all",
            r#"{"questions": ["What is passage zero about?", "Why does passage zero matter?", "Who wrote passage zero?"]}"#,
            "1. How long is passage one?",
        ]));
        let config = GenerateConfig {
            concurrency: 1,
            ..Default::default()
        };
        let g = LlmGenerator::new(backend.clone(), PromptTemplate::default(), config).unwrap();
        let out = g
            .generate(&[chunk(0), chunk(1)], None, &CancellationToken::new())
            .await
            .unwrap();
        let qs: Vec<_> = out
            .queries
            .iter()
            .map(|q| (q.chunk_id.as_str(), q.query.as_str()))
            .collect();
        assert_eq!(
            qs,
            [
                ("d_chunk_0", "What is passage zero about?"),
                ("d_chunk_0", "Why does passage zero matter?"),
                ("d_chunk_1", "How long is passage one?"),
            ]
        );
        assert_eq!(out.counts.unusable_answers, 1);
        assert_eq!(out.counts.non_questions_dropped, 1);
        {
            let seen = backend.seen.lock().unwrap();
            assert_eq!(seen.len(), 3);
            assert_ne!(seen[0].seed, seen[1].seed, "a retry uses another seed");
            assert!(seen[0].user.contains("passage 0") && seen[0].user.contains("Write 2"));
        }
        // A script that runs dry is a backend error for the last chunk.
        let out = g
            .generate(&[chunk(2)], None, &CancellationToken::new())
            .await
            .unwrap();
        assert_eq!(
            (out.counts.chunks_failed, out.counts.backend_errors),
            (1, 1)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn no_chunk_starts_after_the_deadline() {
        let chunks: Vec<Chunk> = (0..20).map(chunk).collect();
        // (backend's own limit, chunks started by 25 s at 10 s a request, 4 configured)
        for (parallelism, started) in [(Some(1), 3), (None, 12)] {
            let answer = r#"{"questions": ["What is in this passage?"]}"#;
            let backend = Arc::new(Scripted {
                delay: std::time::Duration::from_secs(10),
                parallelism,
                ..Scripted::new(&[answer; 20])
            });
            let g = LlmGenerator::new(
                backend.clone(),
                PromptTemplate::default(),
                GenerateConfig::default(),
            )
            .unwrap();
            let begin = Instant::now();
            let deadline = begin + std::time::Duration::from_secs(25);
            let out = g
                .generate_until(&chunks, deadline, None, &CancellationToken::new())
                .await
                .unwrap();
            let served = backend.seen.lock().unwrap().len();
            assert_eq!((served, out.counts.chunks), (started, started));
            assert_eq!(out.counts.chunks_with_queries, started);
            assert_eq!(
                out.counts.chunks_failed, 0,
                "chunks not started are not failures"
            );
            // The last chunk started before the deadline ends at most one request after it.
            assert_eq!(begin.elapsed(), std::time::Duration::from_secs(30));
        }
    }

    #[test]
    fn chunk_seeds_depend_on_seed_and_chunk() {
        assert_ne!(chunk_seed(1, "a"), chunk_seed(2, "a"));
        assert_ne!(chunk_seed(1, "a"), chunk_seed(1, "b"));
    }
}
