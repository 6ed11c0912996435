//! Fine-tuning a cross-encoder on (query, positive, hard negatives) rows with one of
//! sentence-transformers' cross-encoder losses, through the embedding trainer's loop
//! ([`crate::train::driver`]): same optimiser, schedule, checkpoints, LoRA, progress and
//! cancellation.

use std::sync::atomic::AtomicBool;

use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc::UnboundedSender;

use super::loss::{RerankLoss, RerankLossError};
use super::{CrossEncoder, HeadOrigin, RerankError};
use crate::embed::model::Dropout;
use crate::rng::Rng;
use crate::train::data::TrainPair;
use crate::train::{driver, lora, TrainConfig, TrainError, TrainEvent, TrainOutcome};

/// Reranker training settings: the shared optimisation settings plus the loss.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RerankTrainConfig {
    /// Epochs, batch size (queries per batch), learning rate, schedule, clipping, accumulation,
    /// seed, maximum pair length, dropout, checkpoints, resume and LoRA. Its MNRL scale,
    /// Matryoshka and GradCache fields are the embedder's and are not used here.
    pub train: TrainConfig,
    /// The loss.
    pub loss: RerankLoss,
    /// Hard negatives used per query (the first N of each row; `None`: all of them).
    pub negatives: Option<usize>,
    /// Learning-rate multiplier for a newly initialised head (a pretrained encoder moves at
    /// `lr`; a random head at `lr` learns too slowly on a few thousand pairs). With the defaults
    /// (encoder 1e-4, head 1e-3) BCE on 454 Debian Reference rows fell from 0.69 to 0.40 in 58
    /// steps; at 2e-5 / 2e-3 it stayed at 0.69 for 18 steps (engine/TRAINING.md).
    pub new_head_lr_scale: f64,
}

impl Default for RerankTrainConfig {
    fn default() -> Self {
        Self {
            train: TrainConfig {
                batch_size: 16,
                lr: 1e-4,
                ..TrainConfig::default()
            },
            loss: RerankLoss::Bce { pos_weight: None },
            negatives: None,
            new_head_lr_scale: 10.0,
        }
    }
}

impl RerankTrainConfig {
    fn resume_settings(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut m = self.train.resume_settings();
        m.insert(
            "loss".into(),
            serde_json::to_value(&self.loss).expect("loss"),
        );
        m.insert("negatives".into(), serde_json::json!(self.negatives));
        m.insert(
            "new_head_lr_scale".into(),
            serde_json::json!(self.new_head_lr_scale),
        );
        m
    }
}

impl From<RerankLossError> for TrainError {
    fn from(e: RerankLossError) -> Self {
        TrainError::Settings {
            message: e.to_string(),
        }
    }
}

impl From<RerankError> for TrainError {
    fn from(e: RerankError) -> Self {
        TrainError::Reranker {
            message: e.to_string(),
        }
    }
}

/// The rows trained on: every row with exactly `n` hard negatives, where `n` is
/// `cfg.negatives` or else the most any row has; longer rows are cut (hardest kept) and shorter
/// ones filled with random passages of the file, as the embedder's training does
/// ([`crate::train::data::fill_negatives`]), so one short row never costs the others their
/// negatives. Fails when the loss needs negatives and there are none.
pub(crate) fn rows(
    pairs: &[TrainPair],
    cfg: &RerankTrainConfig,
) -> Result<Vec<TrainPair>, TrainError> {
    let settings = |message: String| TrainError::Settings { message };
    let n = cfg
        .negatives
        .unwrap_or_else(|| pairs.iter().map(|p| p.negatives.len()).max().unwrap_or(0));
    let needs_negatives = !matches!(cfg.loss, RerankLoss::Mnrl { .. });
    if n == 0 && needs_negatives {
        return Err(settings(
            "the bce and lambda losses need hard negatives and the rows have none; mine \
             negatives (generate-data does) or use --loss mnrl"
                .into(),
        ));
    }
    let mut kept = pairs.to_vec();
    let fill = crate::train::data::fill_negatives(&mut kept, n, cfg.train.seed);
    if fill.filled_pairs > 0 {
        tracing::info!(
            negatives = fill.per_pair,
            filled_rows = fill.filled_pairs,
            added = fill.added,
            "rows short of hard negatives were filled with random passages"
        );
    }
    if fill.per_pair == 0 && n > 0 && needs_negatives {
        return Err(settings(format!(
            "the file has too few distinct passages to give every row {n} negatives; lower --negatives"
        )));
    }
    Ok(kept)
}

/// Fine-tunes `model` in place. Checks `cancel` before every step; reports progress events
/// (`pairs_per_sec` counts scored (query, passage) pairs).
pub fn train_reranker(
    model: &mut CrossEncoder,
    pairs: &[TrainPair],
    cfg: &RerankTrainConfig,
    cancel: &AtomicBool,
    progress: Option<&UnboundedSender<TrainEvent>>,
) -> Result<TrainOutcome, TrainError> {
    let t = &cfg.train;
    if t.epochs == 0 || pairs.is_empty() || t.batch_size == 0 {
        return Err(TrainError::Settings {
            message: "nothing to train: no epochs, no pairs or a batch size of 0".into(),
        });
    }
    let rows = rows(pairs, cfg)?;
    // As for the embedder (`train::train`): a shorter training length is a speed setting, and
    // the trained model reads its own length again afterwards.
    let read_len = model.max_len();
    if let Some(n) = t.max_seq_len {
        model.set_max_len(n)?;
    }
    if let Some(l) = &t.lora {
        lora::attach(model.bert_mut(), l, &mut Rng::new(t.seed ^ 0x10_AA))?;
    }
    let vars = model.trainable_vars();
    let origin = model.head().origin();
    let scales: Vec<f64> = vars
        .iter()
        .map(|(name, _)| {
            let new = match origin {
                HeadOrigin::Loaded => false,
                HeadOrigin::NewClassifier => name.starts_with("classifier."),
                HeadOrigin::NewPoolerAndClassifier => {
                    name.starts_with("classifier.") || name.starts_with("pooler.")
                }
            };
            if new {
                cfg.new_head_lr_scale
            } else {
                1.0
            }
        })
        .collect();
    let plan = driver::plan_steps(&rows, t);
    let in_batch = cfg.loss.in_batch_negatives();
    let per_row = 1 + rows[0].negatives.len();
    let run = driver::StepRun {
        vars: &vars,
        lr_scales: Some(scales),
        plan: &plan,
        cfg: t,
        settings: cfg.resume_settings(),
        examples: rows.len(),
        pairs_per_example: per_row + in_batch,
    };
    let outcome = {
        let model = &*model;
        driver::run_steps(run, cancel, progress, |mb, rng| {
            micro_batch_grads(model, &vars, &rows, mb, &cfg.loss, t.seed, rng)
        })
    };
    model.set_max_len(read_len)?;
    outcome
}

/// Loss and gradients of one micro-batch: every (query, candidate) pair scored in one forward
/// pass, laid out per query as positive, hard negatives, then in-batch negatives (MNRL).
pub(crate) fn micro_batch_grads(
    model: &CrossEncoder,
    vars: &[(String, Var)],
    rows: &[TrainPair],
    mb: &[usize],
    loss: &RerankLoss,
    seed: u64,
    rng: Option<&mut Rng>,
) -> Result<(f32, Vec<Option<Tensor>>), TrainError> {
    let in_batch = in_batch_candidates(rows, mb, loss.in_batch_negatives(), seed);
    let mut pairs: Vec<(&str, &str)> = Vec::new();
    for (k, &i) in mb.iter().enumerate() {
        let r = &rows[i];
        pairs.push((&r.query, &r.positive));
        pairs.extend(r.negatives.iter().map(|n| (r.query.as_str(), n.as_str())));
        pairs.extend(in_batch[k].iter().map(|&d| (r.query.as_str(), d)));
    }
    let width = pairs.len() / mb.len();
    let batch = model.tokenize(&pairs)?;
    let logits = model
        .logits(&batch, &mut Dropout(rng))?
        .reshape((mb.len(), width))?;
    let l = loss.compute(&logits)?;
    let value = l.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()?;
    let grads = l.backward()?;
    Ok((
        value,
        vars.iter()
            .map(|(_, v)| grads.get(v.as_tensor()).cloned())
            .collect(),
    ))
}

/// For each query of the micro-batch, `k` passages (positives or hard negatives) of the other
/// queries, drawn without replacement (all of them when there are at most `k`). Seeded by the
/// batch so that a resumed run draws the same ones.
fn in_batch_candidates<'a>(
    rows: &'a [TrainPair],
    mb: &[usize],
    k: usize,
    seed: u64,
) -> Vec<Vec<&'a str>> {
    if k == 0 {
        return vec![Vec::new(); mb.len()];
    }
    let key = mb
        .iter()
        .fold(seed ^ 0x1B_A7C4, |h, &i| h.rotate_left(7) ^ (i as u64));
    let mut rng = Rng::new(key);
    mb.iter()
        .enumerate()
        .map(|(a, _)| {
            let mut pool: Vec<&str> = mb
                .iter()
                .enumerate()
                .filter(|&(b, _)| b != a)
                .flat_map(|(_, &j)| {
                    std::iter::once(rows[j].positive.as_str())
                        .chain(rows[j].negatives.iter().map(String::as_str))
                })
                .collect();
            if pool.len() > k {
                for i in 0..k {
                    let j = i + (rng.next_u64() % (pool.len() - i) as u64) as usize;
                    pool.swap(i, j);
                }
                pool.truncate(k);
            }
            pool
        })
        .collect()
}
