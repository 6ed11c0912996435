//! The engine settings that cross the wire: what a training, reranker-training or prepare task
//! runs with. Plain data (no Candle, no paths of either machine); the engine converts them to and
//! from its own configurations in one place (`ragd_engine::settings`).
//!
//! Counts are `u32`/`u64` whatever the sender's word size. Append fields and variants at the end
//! only (see the protocol module).

use serde::{Deserialize, Serialize};

/// AdamW settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWSettings {
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator epsilon.
    pub eps: f64,
    /// Decoupled weight decay (not applied to biases and layer norms).
    pub weight_decay: f64,
}

/// LoRA settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraSettings {
    /// Rank.
    pub r: u32,
    /// Scaling numerator (`scale = alpha / r`).
    pub alpha: f64,
    /// Dropout on the adapter input.
    pub dropout: f64,
    /// Module names to adapt.
    pub target_modules: Vec<String>,
}

/// The optimisation settings of a fine-tuning run (embedder or reranker). Where checkpoints go
/// and what to resume from are the worker's business and do not travel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainSettings {
    /// Passes over the data.
    pub epochs: u32,
    /// Examples per batch (per micro-batch when accumulating).
    pub batch_size: u32,
    /// Peak learning rate.
    pub lr: f64,
    /// Fraction of steps spent warming up.
    pub warmup_ratio: f64,
    /// AdamW settings.
    pub adamw: AdamWSettings,
    /// Global gradient-norm clip (0 disables).
    pub max_grad_norm: f64,
    /// Batches accumulated per optimiser step.
    pub grad_accum: u32,
    /// MNRL similarity scale.
    pub scale: f64,
    /// Seed of batch order, dropout and adapter initialisation.
    pub seed: u64,
    /// Maximum tokens per text (the model's setting when `None`).
    pub max_seq_len: Option<u32>,
    /// Matryoshka dimensions (`Some(vec![])`: the defaults cut to the width; `None`: off).
    pub matryoshka_dims: Option<Vec<u32>>,
    /// Matryoshka weights (all 1 when `None`).
    pub matryoshka_weights: Option<Vec<f64>>,
    /// GradCache mini-batch size; `None`: plain MNRL.
    pub cached_mini_batch: Option<u32>,
    /// Apply the model's dropout while training.
    pub dropout: bool,
    /// Stop after this many optimiser steps.
    pub max_steps: Option<u64>,
    /// Write a checkpoint every N optimiser steps.
    pub checkpoint_every: Option<u64>,
    /// Train LoRA adapters instead of all weights.
    pub lora: Option<LoraSettings>,
}

/// A cross-encoder loss.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RerankLossSettings {
    /// BCE on every pair, positives weighted by `pos_weight` (`None`: negatives per positive).
    Bce {
        /// Weight of the positive class.
        pos_weight: Option<f64>,
    },
    /// Cross-entropy over the positive, hard negatives and in-batch passages.
    Mnrl {
        /// Multiplier of the activated scores.
        scale: f64,
        /// Other queries' passages scored per query.
        in_batch_negatives: u32,
    },
    /// LambdaLoss with NDCG-Loss2++ weights.
    Lambda {
        /// Only pairs touching the top `k` predicted ranks count (`None`: all).
        k: Option<u32>,
        /// Steepness of the pairwise logistic.
        sigma: f64,
        /// Weight of the NDCG-Loss2 term.
        mu: f64,
    },
}

/// The settings of a reranker fine-tuning run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RerankTrainSettings {
    /// The optimisation settings (its MNRL scale, Matryoshka and GradCache fields are unused).
    pub train: TrainSettings,
    /// The loss.
    pub loss: RerankLossSettings,
    /// Hard negatives used per query (`None`: all of them).
    pub negatives: Option<u32>,
    /// Learning-rate multiplier of a newly initialised head.
    pub new_head_lr_scale: f64,
}

/// Chunk sizes, in tokens of the base model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkSettings {
    /// Target chunk size.
    pub size: u32,
    /// Overlap between neighbouring chunks.
    pub overlap: u32,
    /// Smallest chunk kept.
    pub min: u32,
}

/// The text filters applied to generated questions.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct FilterSettings {
    /// Fewest words.
    pub min_words: u32,
    /// Most words.
    pub max_words: u32,
    /// Fewest characters.
    pub min_chars: u32,
    /// Most characters.
    pub max_chars: u32,
    /// Word-set Jaccard at or above which two questions of one chunk are near-duplicates.
    pub near_duplicate_jaccard: f64,
    /// Consecutive words shared with the positive that make a copy (0 disables).
    pub copy_span_words: u32,
}

/// How mined negatives are picked from the candidates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SamplingSettings {
    /// The best candidates.
    Top,
    /// A seeded random sample of the candidates.
    Random,
}

/// Hard-negative mining (sentence-transformers' `mine_hard_negatives` semantics).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MineSettings {
    /// Negatives per query.
    pub num_negatives: u32,
    /// Best candidates skipped.
    pub range_min: u32,
    /// Candidates considered; `None` for sentence-transformers' default.
    pub range_max: Option<u32>,
    /// Candidates scoring within this of the positive are dropped.
    pub absolute_margin: Option<f32>,
    /// Candidates scoring above `positive - |positive| * relative_margin` are dropped.
    pub relative_margin: Option<f32>,
    /// Candidates above this score are dropped.
    pub max_score: Option<f32>,
    /// Candidates below this score are dropped.
    pub min_score: Option<f32>,
    /// How negatives are picked.
    pub sampling: SamplingSettings,
    /// Seed of random sampling.
    pub seed: u64,
    /// Query rows per block of the exact search.
    pub query_block: u32,
    /// Corpus rows per block of the exact search.
    pub corpus_block: u32,
}

/// The held-out split.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SplitSettings {
    /// Share of chunks held out.
    pub test_fraction: f64,
    /// Seed of the split.
    pub seed: u64,
}

/// The settings of the data pipeline's prepare step (and of chunking, recorded in its manifest).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PrepareSettings {
    /// Chunk sizes.
    pub chunk: ChunkSettings,
    /// Text filters.
    pub filter: FilterSettings,
    /// Round-trip top-k (`None` disables).
    pub round_trip_k: Option<u32>,
    /// Judge concurrency when a judge is given.
    pub judge_concurrency: u32,
    /// Mining.
    pub mine: MineSettings,
    /// Split.
    pub split: SplitSettings,
    /// Embedding batch size.
    pub embed_batch: u32,
    /// Run seed.
    pub seed: u64,
}
