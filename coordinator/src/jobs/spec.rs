//! What a user submits: the corpus, the base model and the settings of every stage.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// A fine-tuning job as submitted (`ragd-coord submit`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct JobSpec {
    /// The corpus directory (on the coordinator's machine).
    pub corpus: PathBuf,
    /// The base model: a sentence-transformers directory on the coordinator's machine.
    pub base_model: PathBuf,
    /// Question generator: `auto` (an Ollama model the workers have, else ICT), `ollama:MODEL`,
    /// `openai:MODEL` or `ict`.
    pub llm: String,
    /// Where the fine-tuned model goes (default: the state directory's `models/JOB`).
    pub out: Option<PathBuf>,
    /// Train on this worker.
    pub on: Option<String>,
    /// `gpu` or `cpu`: only consider such workers for training when any is available.
    pub prefer: Option<String>,
    /// Questions per chunk.
    pub queries_per_chunk: u32,
    /// Chunks per generation shard.
    pub shard_size: usize,
    /// Chunk size in tokens.
    pub chunk_size: usize,
    /// Chunk overlap in tokens.
    pub chunk_overlap: usize,
    /// Smallest chunk in tokens.
    pub chunk_min: usize,
    /// Hard negatives per query.
    pub negatives: usize,
    /// Share of chunks held out for evaluation.
    pub test_fraction: f64,
    /// Round-trip filter top-k (0 disables).
    pub round_trip_k: usize,
    /// Seed of every stage.
    pub seed: u64,
    /// Passes over the training data.
    pub epochs: usize,
    /// Pairs per batch.
    pub batch_size: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Tokens per text during training (the model's own when unset).
    pub max_seq_len: Option<usize>,
    /// Stop training after this many steps.
    pub max_steps: Option<usize>,
    /// Checkpoint (and send it home) every N steps.
    pub checkpoint_every: usize,
    /// MatryoshkaLoss with the default dimensions.
    pub matryoshka: bool,
    /// Attempts per task before it is set aside.
    pub max_attempts: u32,
    /// LLM request timeout in seconds.
    pub llm_timeout_secs: u64,
    /// LLM requests in flight per worker.
    pub llm_concurrency: u32,
}

impl Default for JobSpec {
    fn default() -> Self {
        Self {
            corpus: PathBuf::new(),
            base_model: PathBuf::new(),
            llm: "auto".into(),
            out: None,
            on: None,
            prefer: None,
            queries_per_chunk: 2,
            shard_size: 8,
            chunk_size: 512,
            chunk_overlap: 50,
            chunk_min: 100,
            negatives: 3,
            test_fraction: 0.1,
            round_trip_k: 5,
            seed: 42,
            epochs: 1,
            batch_size: 16,
            lr: 2e-5,
            max_seq_len: None,
            max_steps: None,
            checkpoint_every: 20,
            matryoshka: true,
            max_attempts: 3,
            llm_timeout_secs: 120,
            llm_concurrency: 2,
        }
    }
}

impl JobSpec {
    /// Checks the spec before a job is created; the message says what to fix.
    pub fn validate(&self) -> Result<(), String> {
        if !self.corpus.is_dir() {
            return Err(format!(
                "corpus {} is not a directory on the coordinator's machine",
                self.corpus.display()
            ));
        }
        for f in ["config.json", "tokenizer.json", "model.safetensors"] {
            if !self.base_model.join(f).is_file() {
                return Err(format!(
                    "base model {} has no {f}: give a sentence-transformers directory (scripts/fetch-models.sh minilm fetches all-MiniLM-L6-v2)",
                    self.base_model.display()
                ));
            }
        }
        let (kind, model) = self.llm.split_once(':').unwrap_or((self.llm.as_str(), ""));
        match kind {
            "auto" | "ict" => {}
            "ollama" | "openai" if !model.is_empty() => {}
            _ => {
                return Err(format!(
                    "--llm {:?}: use auto, ict, ollama:MODEL or openai:MODEL",
                    self.llm
                ))
            }
        }
        if let Some(p) = &self.prefer {
            if p != "gpu" && p != "cpu" {
                return Err(format!("--prefer {p:?}: use gpu or cpu"));
            }
        }
        if self.batch_size < 2 {
            return Err("--batch-size must be at least 2 (in-batch negatives)".into());
        }
        if self.shard_size == 0 || self.queries_per_chunk == 0 || self.epochs == 0 {
            return Err("--shard-size, --queries-per-chunk and --epochs must be positive".into());
        }
        if !(0.0..1.0).contains(&self.test_fraction) || self.test_fraction == 0.0 {
            return Err("--test-fraction must be between 0 and 1".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_the_problem() {
        let tmp = tempfile::tempdir().unwrap();
        let mut spec = JobSpec {
            corpus: tmp.path().join("missing"),
            base_model: tmp.path().to_path_buf(),
            ..Default::default()
        };
        assert!(spec.validate().unwrap_err().contains("not a directory"));
        spec.corpus = tmp.path().to_path_buf();
        assert!(spec.validate().unwrap_err().contains("config.json"));
        for f in ["config.json", "tokenizer.json", "model.safetensors"] {
            std::fs::write(tmp.path().join(f), b"{}").unwrap();
        }
        spec.validate().unwrap();
        spec.llm = "gpt".into();
        assert!(spec.validate().unwrap_err().contains("--llm"));
        spec.llm = "ollama:qwen2.5".into();
        spec.prefer = Some("tpu".into());
        assert!(spec.validate().unwrap_err().contains("--prefer"));
    }
}
