//! Job work the coordinator hands to workers: tasks, their progress and results, and the
//! content-addressed blobs (datasets, models, checkpoints) they read and write.
//!
//! A task is started with [`TaskStart`], then polled ([`TaskStatus`]) until it is done, failed or
//! cancelled; each successful poll renews the coordinator's lease on it. A worker keeps a finished
//! task's result until the coordinator collects it, so a restarted coordinator re-attaches to work
//! that was running when it died. Large inputs and outputs never travel in these messages: they
//! are blobs named by their BLAKE3 hash (see `blobs`), pushed or fetched on unidirectional streams.
//!
//! Append variants and fields at the end only (see the protocol module).

use super::settings::{PrepareSettings, RerankTrainSettings, TrainSettings};
use serde::{Deserialize, Serialize};
use std::fmt;

/// A BLAKE3 content address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BlobId(pub [u8; 32]);

impl BlobId {
    /// The hash of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self(*blake3::hash(bytes).as_bytes())
    }

    /// Lower-case hex, as used for file names in blob stores.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parses 64 hex digits.
    pub fn from_hex(s: &str) -> Option<Self> {
        if s.len() != 64 || !s.is_ascii() {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(Self(out))
    }
}

impl fmt::Debug for BlobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlobId({})", &self.to_hex()[..12])
    }
}

impl fmt::Display for BlobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// Identifies one attempt of one task; results are committed idempotently by this pair.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TaskRef {
    /// The task's id (unique in the coordinator's database).
    pub task_id: String,
    /// Which attempt this is (1, 2, ...).
    pub attempt: u32,
}

/// The longest task id accepted.
pub const MAX_TASK_ID_LEN: usize = 128;

impl TaskRef {
    /// Checks that the task id is safe to use in a file name: 1 to [`MAX_TASK_ID_LEN`] ASCII
    /// letters, digits, `-`, `_` or `.`, not starting with `.` (so never `..` or a path).
    /// Returns what is wrong otherwise.
    pub fn check_id(&self) -> Result<(), String> {
        let id = &self.task_id;
        let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
        if id.is_empty() || id.len() > MAX_TASK_ID_LEN {
            return Err(format!(
                "task id of {} bytes: it must have 1 to {MAX_TASK_ID_LEN}",
                id.len()
            ));
        }
        if id.starts_with('.') || !id.chars().all(ok_char) {
            return Err(format!(
                "task id {id:?} may only hold ASCII letters, digits, '-', '_' and '.', and must not start with '.'"
            ));
        }
        Ok(())
    }
}

impl fmt::Display for TaskRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{}", self.task_id, self.attempt)
    }
}

/// Coordinator -> worker: start this task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskStart {
    /// Which task and attempt.
    pub task: TaskRef,
    /// The job it belongs to (for logs).
    pub job_id: String,
    /// What to do.
    pub spec: TaskSpec,
}

/// Coordinator -> worker (protocol v3): forget these committed results, start this task and
/// answer with its state once it ends or after the long-poll wait, whichever comes first. One
/// round trip does what `ForgetTask`, `StartTask` and the first `PollTask` did in three.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskRun {
    /// Results the coordinator has committed since its last request to this worker.
    pub forget: Vec<TaskRef>,
    /// The task to start.
    pub start: TaskStart,
}

/// The work of a task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum TaskSpec {
    /// Write questions for a shard of chunks with the worker's own LLM.
    Generate(GenerateSpec),
    /// Fine-tune an embedding model.
    Train(TrainSpec),
    /// Measure training throughput for a model on this worker (cached by the coordinator).
    Calibrate(CalibrateSpec),
    /// Filter the generated questions, split them and mine hard negatives with the base model.
    Prepare(PrepareSpec),
    /// Fine-tune a cross-encoder reranker (the base model is a cross-encoder or an encoder that
    /// gets a new head).
    TrainReranker(TrainRerankerSpec),
    /// Embed a shard of texts with the base model (protocol v4).
    Embed(EmbedSpec),
    /// The prepare step with the texts' embeddings already made by embedding shards
    /// (protocol v4): only texts missing from them are embedded here.
    PrepareEmbedded(PrepareEmbeddedSpec),
    /// A generation shard under the job's time budget (protocol v5).
    GenerateWithin(GenerateWithinSpec),
}

impl TaskSpec {
    /// A short name for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            TaskSpec::Generate(_) => "generate",
            TaskSpec::Train(_) => "train",
            TaskSpec::Calibrate(_) => "calibrate",
            TaskSpec::Prepare(_) => "prepare",
            TaskSpec::TrainReranker(_) => "train_reranker",
            TaskSpec::Embed(_) => "embed",
            TaskSpec::PrepareEmbedded(_) => "prepare",
            TaskSpec::GenerateWithin(_) => "generate",
        }
    }
}

/// One chunk of a document: the unit questions are generated for (the data pipeline's own
/// type, and what a shard or a prepare task carries).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunk {
    /// `{document_id}_chunk_{i}`, or the id from a chunk export.
    pub id: String,
    /// The source document's id.
    pub document_id: String,
    /// The chunk text.
    pub text: String,
}

/// Generation of questions for a shard of chunks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerateSpec {
    /// The chunks of the shard.
    pub chunks: Vec<Chunk>,
    /// Which generator: `ollama:MODEL`, `openai:MODEL`, `ict`.
    pub llm: String,
    /// Questions asked per chunk.
    pub queries_per_chunk: u32,
    /// Run seed (each chunk derives its own).
    pub seed: u64,
    /// Sampling temperature.
    pub temperature: f32,
    /// Most tokens per answer.
    pub max_tokens: u32,
    /// LLM requests in flight at once on the worker.
    pub concurrency: u32,
    /// Timeout of one LLM request, in milliseconds.
    pub request_timeout_ms: u64,
}

/// A generation shard that must end within what is left of the job's LLM time budget: the
/// worker starts no chunk (and retries no unusable answer) once `within_ms` have passed since
/// it started the shard, and leaves the chunks it did not start out of its output (the
/// coordinator's ICT covers them). The budget travels as a duration, not a time of day, so the
/// two machines' clocks need not agree.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerateWithinSpec {
    /// The shard.
    pub generate: GenerateSpec,
    /// Milliseconds from the start of the shard after which no chunk is started.
    pub within_ms: u64,
}

/// A fine-tuning run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainSpec {
    /// The base model (a bundle of a sentence-transformers directory).
    pub base_model: BlobId,
    /// The training pairs (JSONL blob).
    pub data: BlobId,
    /// The training settings.
    pub settings: TrainSettings,
    /// A checkpoint (bundle) to resume from.
    pub resume: Option<BlobId>,
    /// Device preference: `auto`, `cpu`, `cuda[:N]`, `metal[:N]`.
    pub device: String,
    /// Name of the base model for the exported metadata.
    pub base_model_name: String,
}

/// A reranker fine-tuning run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainRerankerSpec {
    /// The base model (a bundle of a cross-encoder or encoder directory).
    pub base_model: BlobId,
    /// The training rows (JSONL blob, with mined negatives).
    pub data: BlobId,
    /// The reranker training settings.
    pub settings: RerankTrainSettings,
    /// A checkpoint (bundle) to resume from.
    pub resume: Option<BlobId>,
    /// Device preference: `auto`, `cpu`, `cuda[:N]`, `metal[:N]`.
    pub device: String,
    /// Name of the base model for the exported metadata.
    pub base_model_name: String,
}

/// A short training-throughput measurement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CalibrateSpec {
    /// The model (bundle).
    pub model: BlobId,
    /// Pairs per batch.
    pub batch_size: u32,
    /// Tokens per text.
    pub seq_len: u32,
    /// Optimiser steps measured (after one warm-up step).
    pub steps: u32,
    /// Device preference.
    pub device: String,
}

/// The embedding-heavy data step of a job: round-trip filter, split, hard-negative mining.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrepareSpec {
    /// The chunks (JSONL of [`Chunk`]).
    pub chunks: BlobId,
    /// The generated questions (JSON array of [`GeneratedQuery`]).
    pub questions: BlobId,
    /// The base model (bundle), the embedder.
    pub base_model: BlobId,
    /// Filter, split and mining settings.
    pub settings: PrepareSettings,
    /// Generator kind and model, for the manifest (`"ollama qwen2.5:3b"`).
    pub generator: String,
    /// LLM tokens per second during generation.
    pub tokens_per_second: f64,
    /// Device preference.
    pub device: String,
}

/// The most texts one embedding shard carries (its answer, at 1,024 dimensions, is 4 MiB).
pub const MAX_EMBED_SHARD_TEXTS: usize = 1024;

/// The most text bytes one embedding shard carries (well under the frame limit).
pub const MAX_EMBED_SHARD_BYTES: usize = 4 << 20;

/// A shard of texts to embed with the base model (corpus chunks, questions, ICT positives).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EmbedSpec {
    /// The base model (bundle), the embedder.
    pub base_model: BlobId,
    /// The texts, at most [`MAX_EMBED_SHARD_TEXTS`] of them and [`MAX_EMBED_SHARD_BYTES`] bytes.
    pub texts: Vec<String>,
    /// Texts per forward pass.
    pub batch_size: u32,
    /// Device preference.
    pub device: String,
}

/// A prepare task with the embeddings of its texts (an embedding table blob, see
/// `ragd_engine::data::embed_table`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrepareEmbeddedSpec {
    /// The prepare task itself.
    pub prepare: PrepareSpec,
    /// The embedding table (blob).
    pub embeddings: BlobId,
}

/// What a running task reports.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TaskProgress {
    /// Units done (chunks, steps).
    pub done: u64,
    /// Units in all.
    pub total: u64,
    /// Latest training loss.
    pub loss: Option<f32>,
    /// Training pairs (or chunks) per second.
    pub rate: f64,
    /// Estimated seconds left.
    pub eta_secs: Option<u64>,
    /// Latest checkpoint: (step, bundle) in the worker's blob store.
    pub checkpoint: Option<(u64, BlobId)>,
    /// Training losses since the last poll: (step, loss).
    pub losses: Vec<(u64, f32)>,
    /// Device the task runs on.
    pub device: String,
}

/// Where a generated query came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuerySource {
    /// Written by an LLM.
    Llm,
    /// An Inverse Cloze Task sentence.
    Ict,
}

/// One query generated for a chunk (the data pipeline's own type, and what a generation shard
/// returns).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GeneratedQuery {
    /// The query text.
    pub query: String,
    /// The chunk it was generated from (its positive).
    pub chunk_id: String,
    /// The positive's text when it is not the chunk's (ICT: the chunk without the query sentence).
    pub positive_text: Option<String>,
    /// Where it came from.
    pub source: QuerySource,
}

/// The outcome of a finished task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum TaskOutput {
    /// Questions of a generation shard.
    Generated {
        /// The questions, in chunk order.
        questions: Vec<GeneratedQuery>,
        /// Chunks for which no usable answer came back.
        chunks_failed: u64,
        /// Generator description (backend, model).
        generator: String,
        /// LLM tokens per second.
        tokens_per_second: f64,
    },
    /// A trained model.
    Trained {
        /// Bundle of the sentence-transformers directory, in the worker's blob store.
        model: BlobId,
        /// Optimiser steps done.
        steps: u64,
        /// Pairs per second.
        pairs_per_sec: f64,
        /// Device description.
        device: String,
        /// Training metadata as JSON.
        metadata_json: String,
        /// (step, loss) of every step this attempt ran (the last ones may postdate the last poll).
        losses: Vec<(u64, f32)>,
    },
    /// A throughput measurement.
    Calibrated {
        /// Pairs per second.
        pairs_per_sec: f64,
        /// Device description.
        device: String,
        /// Peak resident memory seen, in bytes.
        peak_bytes: Option<u64>,
    },
    /// Training data made from the questions.
    Prepared {
        /// `train.jsonl` blob.
        train: BlobId,
        /// The BEIR test set (bundle).
        test: BlobId,
        /// The data manifest (JSON), with counts per step and filter reason.
        manifest_json: String,
    },
    /// The vectors of an embedding shard, as the model returned them.
    Embedded {
        /// Width of each vector.
        dim: u32,
        /// One vector per text, in the shard's order, row-major.
        vectors: Vec<f32>,
        /// Device description.
        device: String,
        /// Texts per second.
        texts_per_sec: f64,
    },
}

/// The state of a task on a worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum TaskState {
    /// The worker does not know this task attempt (it restarted, or never got it).
    Unknown,
    /// Running.
    Running(TaskProgress),
    /// Finished.
    Done(TaskOutput),
    /// Failed; `retryable` says whether another attempt may succeed.
    Failed {
        /// What went wrong.
        message: String,
        /// Whether to try again (elsewhere or later).
        retryable: bool,
    },
    /// Stopped by a cancel request or the worker's shutdown.
    Cancelled,
}

/// Answer to a poll.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskStatus {
    /// Which task.
    pub task: TaskRef,
    /// Its state.
    pub state: TaskState,
}

/// Which of these blobs does the receiver hold, and how much of each partial one?
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobQuery {
    /// The blobs asked about.
    pub blobs: Vec<BlobId>,
}

/// Answer to a [`BlobQuery`], in the same order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobHoldings {
    /// Per blob: `None` = held completely; `Some(n)` = missing, `n` verified-prefix bytes held
    /// from an interrupted transfer (a resumed push starts there).
    pub missing: Vec<Option<u64>>,
}

/// Coordinator -> worker: send me this blob from `offset` on a unidirectional stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobFetch {
    /// The blob.
    pub blob: BlobId,
    /// First byte wanted (the coordinator's partial length).
    pub offset: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec;
    use crate::protocol::messages::{Request, Response};

    #[test]
    fn task_ids_that_could_escape_a_directory_are_refused() {
        let r = |id: &str| TaskRef {
            task_id: id.into(),
            attempt: 1,
        };
        for ok in ["j1-generate-0", "calibrate-00ff-gpu-1", "a.b_c"] {
            r(ok).check_id().unwrap();
        }
        for bad in [
            "",
            "..",
            ".hidden",
            "../../etc",
            "a/b",
            "a\\b",
            "ü",
            &"x".repeat(129),
        ] {
            assert!(r(bad).check_id().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn task_messages_round_trip_through_the_codec() {
        let task = TaskRef {
            task_id: "job-1-generate-3".into(),
            attempt: 2,
        };
        let generate = GenerateSpec {
            chunks: vec![Chunk {
                id: "d_chunk_0".into(),
                document_id: "d".into(),
                text: "text".into(),
            }],
            llm: "ollama:m".into(),
            queries_per_chunk: 2,
            seed: 7,
            temperature: 0.7,
            max_tokens: 256,
            concurrency: 2,
            request_timeout_ms: 1000,
        };
        let requests = [
            Request::StartTask(Box::new(TaskStart {
                task: task.clone(),
                job_id: "job-1".into(),
                spec: TaskSpec::Train(TrainSpec {
                    base_model: BlobId::of(b"model"),
                    data: BlobId::of(b"data"),
                    settings: TrainSettings {
                        epochs: 1,
                        batch_size: 16,
                        lr: 2e-5,
                        warmup_ratio: 0.1,
                        adamw: crate::protocol::settings::AdamWSettings {
                            beta1: 0.9,
                            beta2: 0.999,
                            eps: 1e-8,
                            weight_decay: 0.01,
                        },
                        max_grad_norm: 1.0,
                        grad_accum: 1,
                        scale: 20.0,
                        seed: 42,
                        max_seq_len: Some(128),
                        matryoshka_dims: Some(vec![]),
                        matryoshka_weights: None,
                        cached_mini_batch: None,
                        dropout: true,
                        max_steps: None,
                        checkpoint_every: Some(20),
                        lora: None,
                    },
                    resume: Some(BlobId::of(b"ckpt")),
                    device: "auto".into(),
                    base_model_name: "m".into(),
                }),
            })),
            Request::PollTask(task.clone()),
            Request::RunTask(Box::new(TaskRun {
                forget: vec![task.clone()],
                start: TaskStart {
                    task: task.clone(),
                    job_id: "job-1".into(),
                    spec: TaskSpec::Generate(generate.clone()),
                },
            })),
            Request::StartTask(Box::new(TaskStart {
                task: task.clone(),
                job_id: "job-1".into(),
                spec: TaskSpec::GenerateWithin(GenerateWithinSpec {
                    generate,
                    within_ms: 90_000,
                }),
            })),
            Request::FetchBlob(BlobFetch {
                blob: BlobId::of(b"x"),
                offset: 7,
            }),
        ];
        for r in requests {
            let frame = codec::encode_frame(&r).unwrap();
            let (back, _): (Request, usize) = codec::decode_frame(&frame).unwrap();
            assert_eq!(back, r);
        }
        let resp = Response::TaskStatus(TaskStatus {
            task,
            state: TaskState::Running(TaskProgress {
                done: 3,
                total: 10,
                loss: Some(0.5),
                checkpoint: Some((2, BlobId::of(b"c"))),
                losses: vec![(3, 0.5)],
                ..Default::default()
            }),
        });
        let frame = codec::encode_frame(&resp).unwrap();
        let (back, _): (Response, usize) = codec::decode_frame(&frame).unwrap();
        assert_eq!(back, resp);
    }

    #[test]
    fn blob_ids_round_trip_through_hex() {
        let id = BlobId::of(b"hello");
        let hex = id.to_hex();
        assert_eq!(hex.len(), 64);
        assert_eq!(BlobId::from_hex(&hex), Some(id));
        assert_eq!(BlobId::from_hex("zz"), None);
        assert_eq!(BlobId::from_hex(&"g".repeat(64)), None);
        assert_eq!(id.to_string(), hex);
    }
}
