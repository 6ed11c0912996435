//! Fine-tuning sentence-embedding models: MultipleNegativesRankingLoss (optionally inside
//! MatryoshkaLoss, optionally cached as in GradCache), AdamW with linear warmup and decay,
//! gradient clipping and accumulation, a no-duplicates sampler, checkpoints and resume.
//!
//! [`train`] is synchronous and long: run it on a blocking thread ([`spawn_training`] does).
//! It checks a cancellation flag before every step and reports [`TrainEvent`]s on a channel.

pub mod checkpoint;
pub mod data;
pub mod driver;
pub mod guide;
pub mod lora;
pub mod loss;
pub mod memory;
pub mod optim;
pub mod sampler;

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc::UnboundedSender;

use crate::embed::model::Dropout;
use crate::embed::{EmbedError, SentenceEncoder};
use crate::rng::Rng;
use data::TrainPair;
use loss::{LossError, LossSpec};
use optim::{AdamWConfig, OptimError};

/// Errors raised by a training run.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The settings are unusable.
    #[error("invalid training settings: {message}")]
    Settings {
        /// What is wrong and what to do.
        message: String,
    },
    /// Model or tokenizer failure.
    #[error(transparent)]
    Embed(#[from] EmbedError),
    /// Loss failure (including bad Matryoshka dims).
    #[error(transparent)]
    Loss(#[from] LossError),
    /// Optimiser failure.
    #[error(transparent)]
    Optim(#[from] OptimError),
    /// Checkpoint failure.
    #[error(transparent)]
    Checkpoint(#[from] checkpoint::CheckpointError),
    /// LoRA failure.
    #[error(transparent)]
    Lora(#[from] lora::LoraError),
    /// A tensor computation failed.
    #[error("training computation failed: {0}")]
    Candle(#[from] candle_core::Error),
    /// The cross-encoder failed (loading, tokenising or its forward pass).
    #[error("reranker: {message}")]
    Reranker {
        /// The reranker's error.
        message: String,
    },
    /// The training thread panicked or was lost.
    #[error("training thread failed: {message}")]
    Thread {
        /// The panic or join message.
        message: String,
    },
}

/// Training hyperparameters (defaults follow sentence-transformers' trainer).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Passes over the data.
    pub epochs: usize,
    /// Pairs per batch (per micro-batch when accumulating).
    pub batch_size: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Fraction of steps spent warming up.
    pub warmup_ratio: f64,
    /// AdamW settings.
    pub adamw: AdamWConfig,
    /// Global gradient-norm clip (0 disables).
    pub max_grad_norm: f64,
    /// Batches accumulated per optimiser step.
    pub grad_accum: usize,
    /// MNRL similarity scale.
    pub scale: f64,
    /// Seed of batch order, dropout and adapter initialisation.
    pub seed: u64,
    /// Maximum tokens per text (the model's setting when `None`).
    pub max_seq_len: Option<usize>,
    /// Matryoshka dimensions (`Some(vec![])` for the defaults cut to the width; `None` = off).
    pub matryoshka_dims: Option<Vec<usize>>,
    /// Matryoshka weights (all 1 when `None`).
    pub matryoshka_weights: Option<Vec<f64>>,
    /// GradCache mini-batch size (CachedMultipleNegativesRankingLoss); `None` = plain MNRL.
    pub cached_mini_batch: Option<usize>,
    /// Apply the model's dropout while training.
    pub dropout: bool,
    /// Stop after this many optimiser steps.
    pub max_steps: Option<usize>,
    /// Write a checkpoint every N optimiser steps.
    pub checkpoint_every: Option<usize>,
    /// Where checkpoints go.
    pub checkpoint_dir: Option<PathBuf>,
    /// Resume from this checkpoint directory.
    pub resume_from: Option<PathBuf>,
    /// Train LoRA adapters instead of all weights.
    pub lora: Option<lora::LoraConfig>,
    /// False-negative control: the base model masks candidates it scores above the positive
    /// less this margin ([`guide`], GISTEmbedLoss semantics); `None` = plain MNRL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guide_margin: Option<f64>,
    /// MNRL both ways: each anchor picks its positive among the candidates and each positive
    /// its anchor among the anchors, averaged (sentence-transformers'
    /// MultipleNegativesSymmetricRankingLoss).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub symmetric_loss: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            epochs: 1,
            batch_size: 16,
            lr: 2e-5,
            warmup_ratio: 0.1,
            adamw: AdamWConfig::default(),
            max_grad_norm: 1.0,
            grad_accum: 1,
            scale: 20.0,
            seed: 42,
            max_seq_len: None,
            matryoshka_dims: None,
            matryoshka_weights: None,
            cached_mini_batch: None,
            dropout: true,
            max_steps: None,
            checkpoint_every: None,
            checkpoint_dir: None,
            resume_from: None,
            lora: None,
            guide_margin: None,
            symmetric_loss: false,
        }
    }
}

impl TrainConfig {
    /// Settings a resumed run must share with the run that wrote the checkpoint.
    pub(crate) fn resume_settings(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut v = serde_json::to_value(self).expect("config serialises");
        let map = v.as_object_mut().expect("config is an object");
        for k in [
            "checkpoint_every",
            "checkpoint_dir",
            "resume_from",
            "max_steps",
        ] {
            map.remove(k);
        }
        map.clone()
    }
}

/// Progress of one optimiser step.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepProgress {
    /// Steps completed.
    pub step: usize,
    /// Steps in the run.
    pub total_steps: usize,
    /// Current epoch (0-based).
    pub epoch: usize,
    /// Loss of this step.
    pub loss: f32,
    /// Learning rate used.
    pub lr: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Training pairs per second since the run (or resume) started.
    pub pairs_per_sec: f64,
    /// Estimated time left.
    pub eta: Duration,
}

/// Events reported by a training run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum TrainEvent {
    /// The run starts (after a resume, at `start_step`).
    Started {
        /// Steps in the run.
        total_steps: usize,
        /// First step to run.
        start_step: usize,
        /// Number of training pairs.
        pairs: usize,
    },
    /// One optimiser step finished.
    Step(StepProgress),
    /// A checkpoint was written.
    Checkpoint {
        /// Steps completed.
        step: usize,
        /// Its directory.
        path: PathBuf,
    },
}

/// Result of a training run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrainOutcome {
    /// Optimiser steps completed (including those before a resume).
    pub steps: usize,
    /// Loss of every completed step.
    pub losses: Vec<f32>,
    /// Whether the run stopped because of the cancellation flag.
    pub cancelled: bool,
    /// Wall time of this run (since the resume, if any).
    pub elapsed: Duration,
    /// Training pairs per second over this run.
    pub pairs_per_sec: f64,
}

/// Fine-tunes `encoder` in place on `pairs`. Every pair must have the same number of negatives
/// (see [`data::uniform_negatives`], which fills short pairs). Checks `cancel` before every step.
///
/// `cfg.max_seq_len` is a speed setting: the encoder reads that many tokens while training and
/// its own length again afterwards, so the exported model reads what the base model read (one
/// read with 128 tokens where the base read 256 would lose what the truncation cut, and would
/// be compared with the base at different lengths).
pub fn train(
    encoder: &mut SentenceEncoder,
    pairs: &[TrainPair],
    cfg: &TrainConfig,
    cancel: &AtomicBool,
    progress: Option<&UnboundedSender<TrainEvent>>,
) -> Result<TrainOutcome, TrainError> {
    let settings_err = |message: String| TrainError::Settings { message };
    if cfg.batch_size < 2 {
        return Err(settings_err(
            "batch size must be at least 2 for in-batch negatives".into(),
        ));
    }
    if cfg.epochs == 0 || pairs.is_empty() {
        return Err(settings_err(
            "nothing to train: no epochs or no pairs".into(),
        ));
    }
    let n_neg = pairs[0].negatives.len();
    if let Some(i) = pairs.iter().position(|p| p.negatives.len() != n_neg) {
        return Err(settings_err(format!(
            "pair {i} has {} negatives but pair 0 has {n_neg}; every pair needs the same number",
            pairs[i].negatives.len()
        )));
    }
    let read_len = encoder.sentence_config().max_seq_length;
    if let Some(n) = cfg.max_seq_len {
        encoder.set_max_seq_length(n)?;
    }
    let outcome = train_at_length(encoder, pairs, cfg, n_neg, cancel, progress);
    encoder.set_max_seq_length(read_len)?;
    outcome
}

/// [`train`] once the encoder reads the training length.
fn train_at_length(
    encoder: &mut SentenceEncoder,
    pairs: &[TrainPair],
    cfg: &TrainConfig,
    n_neg: usize,
    cancel: &AtomicBool,
    progress: Option<&UnboundedSender<TrainEvent>>,
) -> Result<TrainOutcome, TrainError> {
    let guide = match cfg.guide_margin {
        Some(margin) => Some(guide_embeddings(encoder, pairs, margin)?),
        None => None,
    };
    if let Some(l) = &cfg.lora {
        lora::attach(encoder.bert_mut(), l, &mut Rng::new(cfg.seed ^ 0x10_AA))?;
    }
    let loss_spec = match &cfg.matryoshka_dims {
        None => LossSpec {
            scale: cfg.scale,
            matryoshka: Vec::new(),
            symmetric: false,
        },
        Some(d) => {
            let req = if d.is_empty() {
                None
            } else {
                Some(d.as_slice())
            };
            let dims = loss::matryoshka_dims(req, encoder.dim())?;
            LossSpec::matryoshka(cfg.scale, &dims, cfg.matryoshka_weights.as_deref())?
        }
    };
    let loss_spec = LossSpec {
        symmetric: cfg.symmetric_loss,
        ..loss_spec
    };
    let vars = encoder.bert().trainable_vars();
    let plan = driver::plan_steps(pairs, cfg);
    let run = driver::StepRun {
        vars: &vars,
        lr_scales: None,
        plan: &plan,
        cfg,
        settings: cfg.resume_settings(),
        examples: pairs.len(),
        pairs_per_example: 1,
    };
    let cached = cfg
        .cached_mini_batch
        .or_else(|| bounded_mini_batch(encoder, cfg, n_neg));
    let mut masked = guide::MaskCounts::default();
    let outcome = driver::run_steps(run, cancel, progress, |mb, rng| {
        let mask = match &guide {
            Some(g) => Some(g.mask(mb, encoder.device(), &mut masked)?),
            None => None,
        };
        let batch = Batch {
            pairs,
            mb,
            mask: mask.as_ref(),
        };
        batch_grads(encoder, &vars, &batch, &loss_spec, cached, rng)
    })?;
    if guide.is_some() {
        tracing::info!(
            masked = masked.masked,
            candidates = masked.candidates,
            share = masked.masked as f64 / masked.candidates.max(1) as f64,
            "the guide model masked candidates it scored above their positive"
        );
    }
    Ok(outcome)
}

/// The guide's embeddings of every text of `pairs`, taken with `encoder` before it is trained.
fn guide_embeddings(
    encoder: &SentenceEncoder,
    pairs: &[TrainPair],
    margin: f64,
) -> Result<guide::Guide, TrainError> {
    let t = std::time::Instant::now();
    let g = guide::Guide::embed(encoder, pairs, margin as f32, 64)?;
    tracing::info!(
        pairs = pairs.len(),
        margin,
        seconds = t.elapsed().as_secs_f64(),
        "guide model (the base embedder) scored the training texts"
    );
    Ok(g)
}

/// One micro-batch: the pairs it indexes and the guide's mask of its scores.
struct Batch<'a> {
    pairs: &'a [TrainPair],
    mb: &'a [usize],
    mask: Option<&'a Tensor>,
}

/// GradCache's mini-batch when a whole batch would keep more activations than half the
/// memory available (see [`memory`]), on the CPU; `None` when it fits or the memory is unknown.
fn bounded_mini_batch(enc: &SentenceEncoder, cfg: &TrainConfig, n_neg: usize) -> Option<usize> {
    if !enc.device().is_cpu() {
        return None; // GPU memory is the placement's business (device::estimate_training_memory)
    }
    let available = Some(crate::device::system_memory().1).filter(|&a| a > 0)?;
    let len = enc.sentence_config().max_seq_length;
    let per_text = memory::activation_bytes_per_text(enc.bert().config(), len);
    let texts = cfg.batch_size * (2 + n_neg);
    let mini = memory::mini_batch_within(texts, per_text, available / 2)?;
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    tracing::info!(
        texts,
        max_seq_len = len,
        batch_gib = gib(texts as u64 * per_text),
        available_gib = gib(available),
        mini_batch = mini,
        "a batch would keep more activations than half the available memory: GradCache \
         (the same gradients, one mini-batch of texts at a time)"
    );
    Some(mini)
}

/// Texts of a micro-batch by column: queries, positives, then each column of negatives.
fn columns<'a>(pairs: &'a [TrainPair], mb: &[usize]) -> Vec<Vec<&'a str>> {
    let n_neg = pairs[mb[0]].negatives.len();
    let mut cols = vec![
        mb.iter().map(|&i| pairs[i].query.as_str()).collect(),
        mb.iter().map(|&i| pairs[i].positive.as_str()).collect(),
    ];
    for j in 0..n_neg {
        cols.push(mb.iter().map(|&i| pairs[i].negatives[j].as_str()).collect());
    }
    cols
}

/// Loss and per-variable gradients of one micro-batch.
fn batch_grads(
    enc: &SentenceEncoder,
    vars: &[(String, Var)],
    batch: &Batch<'_>,
    spec: &LossSpec,
    cached: Option<usize>,
    mut rng: Option<&mut Rng>,
) -> Result<(f32, Vec<Option<Tensor>>), TrainError> {
    let cols = columns(batch.pairs, batch.mb);
    if let Some(mini) = cached {
        return cached_grads(enc, vars, &cols, spec, batch.mask, mini.max(1), rng);
    }
    let mut embs = Vec::with_capacity(cols.len());
    for col in &cols {
        let batch = enc.tokenize(col)?;
        embs.push(enc.embed(&batch, &mut Dropout(rng.as_deref_mut()))?);
    }
    let cands = Tensor::cat(&embs[1..], 0)?;
    let loss = spec.compute(&embs[0], &cands, batch.mask)?;
    let value = loss.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()?;
    let grads = loss.backward()?;
    Ok((
        value,
        vars.iter()
            .map(|(_, v)| grads.get(v.as_tensor()).cloned())
            .collect(),
    ))
}

/// GradCache (CachedMultipleNegativesRankingLoss): embed every column in mini-batches without
/// keeping graphs, take the loss gradient with respect to the embeddings, then re-embed each
/// mini-batch with the same dropout masks and back-propagate `sum(emb * grad)`. Peak memory is
/// bounded by one mini-batch's graph; the result equals the uncached gradient.
fn cached_grads(
    enc: &SentenceEncoder,
    vars: &[(String, Var)],
    cols: &[Vec<&str>],
    spec: &LossSpec,
    mask: Option<&Tensor>,
    mini: usize,
    mut rng: Option<&mut Rng>,
) -> Result<(f32, Vec<Option<Tensor>>), TrainError> {
    let mut reps = Vec::with_capacity(cols.len());
    let mut saved: Vec<Vec<Option<Rng>>> = Vec::with_capacity(cols.len());
    for col in cols {
        let mut parts = Vec::new();
        let mut states = Vec::new();
        for chunk in col.chunks(mini) {
            states.push(rng.as_deref().cloned());
            let batch = enc.tokenize(chunk)?;
            parts.push(
                enc.embed(&batch, &mut Dropout(rng.as_deref_mut()))?
                    .detach(),
            );
        }
        reps.push(Var::from_tensor(&Tensor::cat(&parts, 0)?)?);
        saved.push(states);
    }
    let cand_list: Vec<&Tensor> = reps[1..].iter().map(|v| v.as_tensor()).collect();
    let cands = Tensor::cat(&cand_list, 0)?;
    let loss = spec.compute(reps[0].as_tensor(), &cands, mask)?;
    let value = loss.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()?;
    let rep_grads = loss.backward()?;
    let mut acc: Vec<Option<Tensor>> = vec![None; vars.len()];
    for ((col, rep), states) in cols.iter().zip(&reps).zip(&saved) {
        let Some(g) = rep_grads.get(rep.as_tensor()) else {
            continue;
        };
        for (k, (chunk, state)) in col.chunks(mini).zip(states).enumerate() {
            let mut replay = state.clone();
            let batch = enc.tokenize(chunk)?;
            let e = enc.embed(&batch, &mut Dropout(replay.as_mut()))?;
            let gk = g.narrow(0, k * mini, chunk.len())?.detach();
            let surrogate = (e * gk)?.sum_all()?;
            let grads = surrogate.backward()?;
            for (slot, (_, v)) in acc.iter_mut().zip(vars) {
                if let Some(gv) = grads.get(v.as_tensor()) {
                    *slot = Some(match slot.take() {
                        Some(s) => (s + gv)?,
                        None => gv.clone(),
                    });
                }
            }
        }
    }
    Ok((value, acc))
}

/// A training run on a blocking thread.
pub struct TrainHandle {
    /// Set to stop the run before its next step.
    pub cancel: Arc<AtomicBool>,
    /// Progress events.
    pub events: tokio::sync::mpsc::UnboundedReceiver<TrainEvent>,
    /// The run's result, with the trained encoder.
    pub join: tokio::task::JoinHandle<Result<(SentenceEncoder, TrainOutcome), TrainError>>,
}

/// Starts [`train`] on tokio's blocking pool (call from within a tokio runtime).
pub fn spawn_training(
    mut encoder: SentenceEncoder,
    pairs: Vec<TrainPair>,
    cfg: TrainConfig,
) -> TrainHandle {
    let cancel = Arc::new(AtomicBool::new(false));
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let flag = cancel.clone();
    let join = tokio::task::spawn_blocking(move || {
        let out = train(&mut encoder, &pairs, &cfg, &flag, Some(&tx))?;
        Ok((encoder, out))
    });
    TrainHandle {
        cancel,
        events: rx,
        join,
    }
}

#[cfg(test)]
pub(crate) mod tests;
