//! What every step of the data pipeline shares: its settings, its error, the step log that
//! goes into the manifest, and how a CPU-heavy step runs on a blocking thread.

use std::collections::BTreeMap;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::chunk::{ChunkConfig, ChunkError};
use super::embed::EmbedError;
use super::filter::{FilterConfig, FilterError};
use super::ingest::{IngestError, IngestOptions};
use super::llm::generate::GenerateError;
use super::mine::{MineConfig, MineError};
use super::output::{OutputError, StepRecord};
use super::split::{SplitConfig, SplitError};

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

pub(crate) async fn blocking<T: Send + 'static, E>(
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

pub(crate) fn counts<I: IntoIterator<Item = (K, usize)>, K: ToString>(
    it: I,
) -> BTreeMap<String, u64> {
    it.into_iter()
        .map(|(k, v)| (k.to_string(), v as u64))
        .collect()
}

/// The serde (snake_case) name of a unit enum variant.
pub(crate) fn snake<T: Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        _ => "unknown".into(),
    }
}

/// Steps done so far, with their duration and counts, for the manifest.
pub type StepLog = Vec<(String, StepRecord)>;

pub(crate) fn record(
    steps: &mut StepLog,
    name: &str,
    start: Instant,
    counts: BTreeMap<String, u64>,
) {
    steps.push((
        name.to_string(),
        StepRecord {
            seconds: start.elapsed().as_secs_f64(),
            counts,
        },
    ));
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

impl GeneratorSummary {
    /// The summary of generation done elsewhere (a job's shards): `label` is the generator as
    /// a shard reports it (`"ollama qwen2.5:3b"`, `"ict"`), `tokens_per_second` its throughput.
    pub fn from_label(label: &str, tokens_per_second: f64) -> Self {
        let (kind, model) = label.split_once(' ').unwrap_or((label, ""));
        Self {
            kind: kind.to_string(),
            model: model.to_string(),
            endpoint: None,
            prompt_hash: None,
            tokens_per_second,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::filter::DropReason;

    #[test]
    fn reason_names_are_snake_case() {
        assert_eq!(snake(&DropReason::NearDuplicate), "near_duplicate");
    }

    #[test]
    fn generator_labels_split_into_kind_and_model() {
        let s = GeneratorSummary::from_label("ollama qwen2.5:3b", 12.5);
        assert_eq!(
            (s.kind.as_str(), s.model.as_str()),
            ("ollama", "qwen2.5:3b")
        );
        assert_eq!(s.tokens_per_second, 12.5);
        let s = GeneratorSummary::from_label("ict", 0.0);
        assert_eq!((s.kind.as_str(), s.model.as_str()), ("ict", ""));
    }
}
