//! What a user submits (`ragd-coord submit`, over the admin socket): the corpus, the base model
//! and the settings of every stage. Append fields at the end only (see the protocol module); the
//! coordinator also keeps each job's spec in its database (as JSON, read with defaults).

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
    /// `openai:MODEL` or `ict`; `ollama:MODEL+ict` (or `openai:MODEL+ict`) has the LLM write for
    /// the chunks [`JobSpec::llm_budget`] allows and ICT cover the rest.
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
    /// MatryoshkaLoss with the default dimensions (off by default, as in `ragd-worker train`).
    pub matryoshka: bool,
    /// Attempts per task before it is set aside.
    pub max_attempts: u32,
    /// LLM request timeout in seconds.
    pub llm_timeout_secs: u64,
    /// LLM requests in flight per worker.
    pub llm_concurrency: u32,
    /// Which models to fine-tune: `embedder`, `reranker` or both.
    pub train: Vec<ModelKind>,
    /// The reranker's starting point: a cross-encoder directory, or an encoder that gets a new
    /// head (default: the base model).
    pub reranker_base: Option<PathBuf>,
    /// Reranker loss: `bce`, `mnrl` or `lambda`.
    pub reranker_loss: String,
    /// Hard negatives per query for the reranker (default: all that were mined).
    pub reranker_negatives: Option<usize>,
    /// Reranker passes over the data.
    pub reranker_epochs: usize,
    /// Reranker queries per batch.
    pub reranker_batch_size: usize,
    /// Reranker peak learning rate (the encoder's; a new head gets `reranker_head_lr_scale` times it).
    pub reranker_lr: f64,
    /// Learning-rate multiplier of a new reranker head.
    pub reranker_head_lr_scale: f64,
    /// Tokens per (query, passage) pair while training the reranker.
    pub reranker_max_seq_len: Option<usize>,
    /// Stop reranker training after this many steps.
    pub reranker_max_steps: Option<usize>,
    /// Candidates per test query the reranker reorders in the evaluation.
    pub rerank_depth: usize,
    /// Replace a previous ragd export at `out` (never files ragd did not write).
    pub force: bool,
    /// The user's own questions (on the coordinator's machine): a BEIR directory, or JSONL lines
    /// `{"query", "relevant": [chunk ids or passages]}`. When given, they are the evaluation's
    /// headline and decide the verdict that `models promote` goes by.
    pub eval_queries: Option<PathBuf>,
    /// With `llm = X+ict`: how much the LLM writes, in chunks (`500`) or minutes (`30m`, counted
    /// from when generation starts); `None` means 30 minutes.
    pub llm_budget: Option<String>,
}

/// How much of the corpus the LLM writes for when ICT covers the rest (`--llm X+ict`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LlmBudget {
    /// At most this many chunks.
    Chunks(usize),
    /// Until this much time has passed (whole slices of chunks are finished).
    Time(std::time::Duration),
}

impl std::str::FromStr for LlmBudget {
    type Err = String;

    /// `N` chunks, or `Nm` minutes (`90m`, `0.5m`).
    fn from_str(s: &str) -> Result<Self, String> {
        let bad =
            || format!("bad LLM budget {s:?}: give a number of chunks (500) or of minutes (30m)");
        match s.trim().strip_suffix('m') {
            Some(m) => {
                let minutes: f64 = m.trim().parse().map_err(|_| bad())?;
                if !minutes.is_finite() || minutes < 0.0 {
                    return Err(bad());
                }
                Ok(Self::Time(std::time::Duration::from_secs_f64(
                    minutes * 60.0,
                )))
            }
            None => s.trim().parse().map(Self::Chunks).map_err(|_| bad()),
        }
    }
}

/// A kind of model a job fine-tunes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    /// A sentence-embedding model (first-stage retrieval).
    Embedder,
    /// A cross-encoder reranker (second stage).
    Reranker,
}

impl ModelKind {
    /// Parses `embedder,reranker` (either or both).
    pub fn parse_list(s: &str) -> Result<Vec<Self>, String> {
        let mut out = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let k = match part {
                "embedder" => Self::Embedder,
                "reranker" => Self::Reranker,
                other => {
                    return Err(format!(
                        "--train {other:?}: use embedder, reranker or embedder,reranker"
                    ))
                }
            };
            if !out.contains(&k) {
                out.push(k);
            }
        }
        if out.is_empty() {
            return Err("--train needs embedder, reranker or both".into());
        }
        Ok(out)
    }
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
            matryoshka: false,
            max_attempts: 3,
            llm_timeout_secs: 120,
            llm_concurrency: 2,
            train: vec![ModelKind::Embedder],
            reranker_base: None,
            reranker_loss: "bce".into(),
            reranker_negatives: None,
            reranker_epochs: 1,
            reranker_batch_size: 16,
            reranker_lr: 1e-4,
            reranker_head_lr_scale: 10.0,
            reranker_max_seq_len: None,
            reranker_max_steps: None,
            rerank_depth: 100,
            force: false,
            eval_queries: None,
            llm_budget: None,
        }
    }
}

impl JobSpec {
    /// Whether the job fine-tunes `kind`.
    pub fn trains(&self, kind: ModelKind) -> bool {
        self.train.contains(&kind)
    }

    /// The stages of this job, in order.
    pub fn stages(&self) -> Vec<&'static str> {
        let mut v = vec!["ingest", "generate", "prepare"];
        if self.trains(ModelKind::Embedder) {
            v.push("train");
        }
        if self.trains(ModelKind::Reranker) {
            v.push("train_reranker");
        }
        v.extend(["evaluate", "export"]);
        v
    }

    /// The reranker's base model directory.
    pub fn reranker_base(&self) -> &std::path::Path {
        self.reranker_base.as_deref().unwrap_or(&self.base_model)
    }

    /// The LLM part of [`JobSpec::llm`] and whether ICT covers what it does not write (`+ict`).
    pub fn llm_with_ict(&self) -> (&str, bool) {
        match self.llm.strip_suffix("+ict") {
            Some(llm) => (llm, true),
            None => (self.llm.as_str(), false),
        }
    }

    /// The LLM's budget under `X+ict` (30 minutes unless given).
    pub fn budget(&self) -> LlmBudget {
        self.llm_budget
            .as_deref()
            .and_then(|b| b.parse().ok())
            .unwrap_or(LlmBudget::Time(std::time::Duration::from_secs(30 * 60)))
    }

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
        let (llm, mixed) = self.llm_with_ict();
        let (kind, model) = llm.split_once(':').unwrap_or((llm, ""));
        match kind {
            "auto" | "ict" if !mixed => {}
            "ollama" | "openai" if !model.is_empty() => {}
            _ => {
                return Err(format!(
                    "--llm {:?}: use auto, ict, ollama:MODEL or openai:MODEL, or \
                     ollama:MODEL+ict / openai:MODEL+ict for the LLM within --llm-budget and ICT \
                     for the rest",
                    self.llm
                ))
            }
        }
        match (&self.llm_budget, mixed) {
            (Some(b), true) => {
                b.parse::<LlmBudget>()?;
            }
            (Some(_), false) => {
                return Err(
                    "--llm-budget applies to --llm X+ict only (the LLM writes within \
                            the budget and ICT covers the rest)"
                        .into(),
                )
            }
            (None, _) => {}
        }
        if let Some(p) = &self.prefer {
            if p != "gpu" && p != "cpu" {
                return Err(format!("--prefer {p:?}: use gpu or cpu"));
            }
        }
        if self.batch_size < 2 {
            return Err("--batch-size must be at least 2 (in-batch negatives)".into());
        }
        if self.shard_size == 0
            || self.queries_per_chunk == 0
            || self.epochs == 0
            || self.max_attempts == 0
        {
            return Err(
                "--shard-size, --queries-per-chunk, --epochs and --max-attempts must be positive"
                    .into(),
            );
        }
        if !(0.0..1.0).contains(&self.test_fraction) || self.test_fraction == 0.0 {
            return Err("--test-fraction must be between 0 and 1".into());
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(format!(
                "--lr {}: give a positive learning rate such as 2e-5",
                self.lr
            ));
        }
        if self.train.is_empty() {
            return Err("--train needs embedder, reranker or both".into());
        }
        if self.trains(ModelKind::Reranker) {
            if let Some(dir) = &self.reranker_base {
                for f in ["config.json", "tokenizer.json", "model.safetensors"] {
                    if !dir.join(f).is_file() {
                        return Err(format!(
                            "reranker base {} has no {f}: give a cross-encoder or encoder directory",
                            dir.display()
                        ));
                    }
                }
            }
            if !(self.reranker_lr.is_finite() && self.reranker_lr > 0.0) {
                return Err(format!(
                    "--reranker-lr {}: give a positive learning rate such as 2e-5",
                    self.reranker_lr
                ));
            }
            if !(self.reranker_head_lr_scale.is_finite() && self.reranker_head_lr_scale > 0.0) {
                return Err(format!(
                    "--reranker-head-lr-scale {}: give a positive factor",
                    self.reranker_head_lr_scale
                ));
            }
            if !matches!(self.reranker_loss.as_str(), "bce" | "mnrl" | "lambda") {
                return Err(format!(
                    "--reranker-loss {:?}: use bce, mnrl or lambda",
                    self.reranker_loss
                ));
            }
            if self.reranker_batch_size == 0 || self.reranker_epochs == 0 || self.rerank_depth == 0
            {
                return Err(
                    "--reranker-batch-size, --reranker-epochs and --rerank-depth must be positive"
                        .into(),
                );
            }
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
        // LLM + ICT: a named LLM only, and a budget only with it.
        for bad in ["ict+ict", "auto+ict", "ollama:+ict"] {
            spec.llm = bad.into();
            assert!(spec.validate().unwrap_err().contains("+ict"), "{bad}");
        }
        spec.llm = "ollama:qwen2.5+ict".into();
        assert_eq!(spec.llm_with_ict(), ("ollama:qwen2.5", true));
        assert_eq!(
            spec.budget(),
            LlmBudget::Time(std::time::Duration::from_secs(1800))
        );
        spec.llm_budget = Some("40".into());
        spec.validate().unwrap();
        assert_eq!(spec.budget(), LlmBudget::Chunks(40));
        spec.llm_budget = Some("forty".into());
        assert!(spec.validate().unwrap_err().contains("30m"));
        spec.llm = "ollama:qwen2.5".into();
        spec.llm_budget = Some("40".into());
        assert!(spec.validate().unwrap_err().contains("X+ict only"));
        spec.llm_budget = None;
        spec.prefer = Some("tpu".into());
        assert!(spec.validate().unwrap_err().contains("--prefer"));
        spec.prefer = None;
        spec.train = ModelKind::parse_list("reranker,embedder").unwrap();
        spec.reranker_loss = "hinge".into();
        assert!(spec.validate().unwrap_err().contains("--reranker-loss"));
        spec.reranker_loss = "mnrl".into();
        spec.validate().unwrap();
        // Learning rates that are not positive numbers (NaN came through the admin socket in
        // fuzzing, and `--lr NaN` parses as an f64) would train NaN weights: refused.
        for bad in [f64::NAN, f64::INFINITY, 0.0, -1e-5] {
            spec.lr = bad;
            assert!(spec.validate().unwrap_err().contains("--lr"), "{bad}");
            spec.lr = 2e-5;
            spec.reranker_lr = bad;
            assert!(
                spec.validate().unwrap_err().contains("--reranker-lr"),
                "{bad}"
            );
            spec.reranker_lr = 2e-5;
            spec.reranker_head_lr_scale = bad;
            assert!(
                spec.validate()
                    .unwrap_err()
                    .contains("--reranker-head-lr-scale"),
                "{bad}"
            );
            spec.reranker_head_lr_scale = 10.0;
        }
        assert!(ModelKind::parse_list("ranker")
            .unwrap_err()
            .contains("--train"));
        assert_eq!(
            spec.stages(),
            [
                "ingest",
                "generate",
                "prepare",
                "train",
                "train_reranker",
                "evaluate",
                "export"
            ]
        );
    }
}
