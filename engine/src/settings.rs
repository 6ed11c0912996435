//! The one place where the engine's configurations meet their wire form
//! (`ragd_shared::protocol::settings`): the coordinator turns the configurations it builds into
//! settings for a task, the worker turns a task's settings back into configurations.
//!
//! Paths (checkpoint directory, resume point) are local to the machine that trains and never
//! travel: converted settings leave them unset.

use ragd_shared::protocol::settings::{
    AdamWSettings, ChunkSettings, FilterSettings, LoraSettings, MineSettings, PrepareSettings,
    RerankLossSettings, RerankTrainSettings, SamplingSettings, SplitSettings, TrainSettings,
};

use crate::data::chunk::ChunkConfig;
use crate::data::filter::FilterConfig;
use crate::data::mine::{MineConfig, Sampling};
use crate::data::pipeline::PipelineConfig;
use crate::data::search::SearchBlocks;
use crate::data::split::SplitConfig;
use crate::rerank::loss::RerankLoss;
use crate::rerank::train::RerankTrainConfig;
use crate::train::lora::LoraConfig;
use crate::train::optim::AdamWConfig;
use crate::train::TrainConfig;

/// A count for the wire (counts beyond `u32::MAX` do not occur in these settings; they saturate).
fn n32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn us(n: u32) -> usize {
    n as usize
}

impl From<&TrainConfig> for TrainSettings {
    fn from(c: &TrainConfig) -> Self {
        Self {
            epochs: n32(c.epochs),
            batch_size: n32(c.batch_size),
            lr: c.lr,
            warmup_ratio: c.warmup_ratio,
            adamw: AdamWSettings {
                beta1: c.adamw.beta1,
                beta2: c.adamw.beta2,
                eps: c.adamw.eps,
                weight_decay: c.adamw.weight_decay,
            },
            max_grad_norm: c.max_grad_norm,
            grad_accum: n32(c.grad_accum),
            scale: c.scale,
            seed: c.seed,
            max_seq_len: c.max_seq_len.map(n32),
            matryoshka_dims: c
                .matryoshka_dims
                .as_ref()
                .map(|d| d.iter().copied().map(n32).collect()),
            matryoshka_weights: c.matryoshka_weights.clone(),
            cached_mini_batch: c.cached_mini_batch.map(n32),
            dropout: c.dropout,
            max_steps: c.max_steps.map(|n| n as u64),
            checkpoint_every: c.checkpoint_every.map(|n| n as u64),
            lora: c.lora.as_ref().map(|l| LoraSettings {
                r: n32(l.r),
                alpha: l.alpha,
                dropout: l.dropout,
                target_modules: l.target_modules.clone(),
            }),
        }
    }
}

impl From<&TrainSettings> for TrainConfig {
    fn from(s: &TrainSettings) -> Self {
        Self {
            epochs: us(s.epochs),
            batch_size: us(s.batch_size),
            lr: s.lr,
            warmup_ratio: s.warmup_ratio,
            adamw: AdamWConfig {
                beta1: s.adamw.beta1,
                beta2: s.adamw.beta2,
                eps: s.adamw.eps,
                weight_decay: s.adamw.weight_decay,
            },
            max_grad_norm: s.max_grad_norm,
            grad_accum: us(s.grad_accum),
            scale: s.scale,
            seed: s.seed,
            max_seq_len: s.max_seq_len.map(us),
            matryoshka_dims: s
                .matryoshka_dims
                .as_ref()
                .map(|d| d.iter().copied().map(us).collect()),
            matryoshka_weights: s.matryoshka_weights.clone(),
            cached_mini_batch: s.cached_mini_batch.map(us),
            dropout: s.dropout,
            max_steps: s.max_steps.map(|n| n as usize),
            checkpoint_every: s.checkpoint_every.map(|n| n as usize),
            checkpoint_dir: None,
            resume_from: None,
            lora: s.lora.as_ref().map(|l| LoraConfig {
                r: us(l.r),
                alpha: l.alpha,
                dropout: l.dropout,
                target_modules: l.target_modules.clone(),
            }),
            guide_margin: None,
            symmetric_loss: false,
        }
    }
}

impl From<&RerankLoss> for RerankLossSettings {
    fn from(l: &RerankLoss) -> Self {
        match *l {
            RerankLoss::Bce { pos_weight } => Self::Bce { pos_weight },
            RerankLoss::Mnrl {
                scale,
                in_batch_negatives,
            } => Self::Mnrl {
                scale,
                in_batch_negatives: n32(in_batch_negatives),
            },
            RerankLoss::Lambda { k, sigma, mu } => Self::Lambda {
                k: k.map(n32),
                sigma,
                mu,
            },
        }
    }
}

impl From<&RerankLossSettings> for RerankLoss {
    fn from(l: &RerankLossSettings) -> Self {
        match *l {
            RerankLossSettings::Bce { pos_weight } => Self::Bce { pos_weight },
            RerankLossSettings::Mnrl {
                scale,
                in_batch_negatives,
            } => Self::Mnrl {
                scale,
                in_batch_negatives: us(in_batch_negatives),
            },
            RerankLossSettings::Lambda { k, sigma, mu } => Self::Lambda {
                k: k.map(us),
                sigma,
                mu,
            },
        }
    }
}

impl From<&RerankTrainConfig> for RerankTrainSettings {
    fn from(c: &RerankTrainConfig) -> Self {
        Self {
            train: (&c.train).into(),
            loss: (&c.loss).into(),
            negatives: c.negatives.map(n32),
            new_head_lr_scale: c.new_head_lr_scale,
        }
    }
}

impl From<&RerankTrainSettings> for RerankTrainConfig {
    fn from(s: &RerankTrainSettings) -> Self {
        Self {
            train: (&s.train).into(),
            loss: (&s.loss).into(),
            negatives: s.negatives.map(us),
            new_head_lr_scale: s.new_head_lr_scale,
        }
    }
}

impl From<&MineConfig> for MineSettings {
    fn from(c: &MineConfig) -> Self {
        Self {
            num_negatives: n32(c.num_negatives),
            range_min: n32(c.range_min),
            range_max: c.range_max.map(n32),
            absolute_margin: c.absolute_margin,
            relative_margin: c.relative_margin,
            max_score: c.max_score,
            min_score: c.min_score,
            sampling: match c.sampling {
                Sampling::Top => SamplingSettings::Top,
                Sampling::Random => SamplingSettings::Random,
            },
            seed: c.seed,
            query_block: n32(c.blocks.query_block),
            corpus_block: n32(c.blocks.corpus_block),
        }
    }
}

impl From<&MineSettings> for MineConfig {
    fn from(s: &MineSettings) -> Self {
        Self {
            num_negatives: us(s.num_negatives),
            range_min: us(s.range_min),
            range_max: s.range_max.map(us),
            absolute_margin: s.absolute_margin,
            relative_margin: s.relative_margin,
            max_score: s.max_score,
            min_score: s.min_score,
            sampling: match s.sampling {
                SamplingSettings::Top => Sampling::Top,
                SamplingSettings::Random => Sampling::Random,
            },
            seed: s.seed,
            blocks: SearchBlocks {
                query_block: us(s.query_block),
                corpus_block: us(s.corpus_block),
            },
        }
    }
}

impl From<&PipelineConfig> for PrepareSettings {
    fn from(c: &PipelineConfig) -> Self {
        Self {
            chunk: ChunkSettings {
                size: n32(c.chunk.size),
                overlap: n32(c.chunk.overlap),
                min: n32(c.chunk.min),
            },
            filter: FilterSettings {
                min_words: n32(c.filter.min_words),
                max_words: n32(c.filter.max_words),
                min_chars: n32(c.filter.min_chars),
                max_chars: n32(c.filter.max_chars),
                near_duplicate_jaccard: c.filter.near_duplicate_jaccard,
                copy_span_words: n32(c.filter.copy_span_words),
            },
            round_trip_k: c.round_trip_k.map(n32),
            judge_concurrency: n32(c.judge_concurrency),
            mine: (&c.mine).into(),
            split: SplitSettings {
                test_fraction: c.split.test_fraction,
                seed: c.split.seed,
            },
            embed_batch: n32(c.embed_batch),
            seed: c.seed,
        }
    }
}

/// The pipeline configuration of a prepare task (ingestion options are local: defaults).
impl From<&PrepareSettings> for PipelineConfig {
    fn from(s: &PrepareSettings) -> Self {
        Self {
            chunk: ChunkConfig {
                size: us(s.chunk.size),
                overlap: us(s.chunk.overlap),
                min: us(s.chunk.min),
            },
            filter: FilterConfig {
                min_words: us(s.filter.min_words),
                max_words: us(s.filter.max_words),
                min_chars: us(s.filter.min_chars),
                max_chars: us(s.filter.max_chars),
                near_duplicate_jaccard: s.filter.near_duplicate_jaccard,
                copy_span_words: us(s.filter.copy_span_words),
            },
            round_trip_k: s.round_trip_k.map(us),
            judge_concurrency: us(s.judge_concurrency),
            mine: (&s.mine).into(),
            split: SplitConfig {
                test_fraction: s.split.test_fraction,
                seed: s.split.seed,
            },
            embed_batch: us(s.embed_batch),
            seed: s.seed,
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn training_settings_survive_the_wire() {
        let cfg = TrainConfig {
            epochs: 3,
            batch_size: 48,
            lr: 3e-5,
            max_seq_len: Some(128),
            matryoshka_dims: Some(vec![384, 64]),
            matryoshka_weights: Some(vec![1.0, 0.5]),
            cached_mini_batch: Some(8),
            dropout: false,
            max_steps: Some(77),
            checkpoint_every: Some(5),
            checkpoint_dir: Some("/tmp/not-sent".into()),
            lora: Some(LoraConfig {
                r: 4,
                ..Default::default()
            }),
            ..Default::default()
        };
        let wire = TrainSettings::from(&cfg);
        let frame = ragd_shared::codec::encode_frame(&wire).unwrap();
        let (wire, _): (TrainSettings, usize) = ragd_shared::codec::decode_frame(&frame).unwrap();
        let back = TrainConfig::from(&wire);
        assert_eq!(back.checkpoint_dir, None, "local paths never travel");
        let sent = TrainConfig {
            checkpoint_dir: None,
            ..cfg
        };
        assert_eq!(
            serde_json::to_value(&back).unwrap(),
            serde_json::to_value(&sent).unwrap()
        );
    }

    #[test]
    fn reranker_and_prepare_settings_survive_the_wire() {
        for loss in ["bce", "mnrl", "lambda"] {
            let cfg = RerankTrainConfig {
                loss: RerankLoss::from_name(loss).unwrap(),
                negatives: Some(2),
                ..Default::default()
            };
            let back = RerankTrainConfig::from(&RerankTrainSettings::from(&cfg));
            assert_eq!(
                serde_json::to_value(&back).unwrap(),
                serde_json::to_value(&cfg).unwrap()
            );
        }
        let mut cfg = PipelineConfig {
            round_trip_k: Some(7),
            ..Default::default()
        };
        cfg.mine.sampling = Sampling::Random;
        cfg.mine.range_max = Some(30);
        cfg.split.test_fraction = 0.25;
        let back = PipelineConfig::from(&PrepareSettings::from(&cfg));
        assert_eq!(
            serde_json::to_value(&back).unwrap(),
            serde_json::to_value(&cfg).unwrap()
        );
    }
}
