//! Training and calibration tasks: fine-tune a model from blobs, publish checkpoints and the
//! result as bundles; measure training throughput.

use super::{ProgressCell, TaskEnv, TaskError};
use ragd_engine::device;
use ragd_engine::embed::SentenceEncoder;
use ragd_engine::export::{export_model, RunRecord, TrainingMetadata};
use ragd_engine::rerank::export::export_reranker;
use ragd_engine::rerank::train::{train_reranker, RerankTrainConfig};
use ragd_engine::rerank::CrossEncoder;
use ragd_engine::train::data::TrainPair;
use ragd_engine::train::{self, data, TrainConfig, TrainEvent, TrainOutcome};
use ragd_shared::blobs::BlobStore;
use ragd_shared::protocol::jobs::{
    BlobId, CalibrateSpec, TaskOutput, TaskRef, TrainRerankerSpec, TrainSpec,
};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime};
use tokio_util::sync::CancellationToken;

/// Writes bundle `id` to `work/bundles/<hex>` once (a `.complete` marker records success).
pub(super) fn materialize(
    store: &BlobStore,
    work: &Path,
    id: &BlobId,
) -> Result<PathBuf, TaskError> {
    let dir = work.join("bundles").join(id.to_hex());
    if dir.join(".complete").is_file() {
        return Ok(dir);
    }
    let _ = std::fs::remove_dir_all(&dir);
    store.materialize(id, &dir).map_err(|e| {
        TaskError::invalid(format!(
            "bundle {id} cannot be laid out (was it transferred?): {e}"
        ))
    })?;
    std::fs::write(dir.join(".complete"), b"").map_err(TaskError::failed)?;
    Ok(dir)
}

/// The configuration of a training run, by model kind (converted from the task's settings).
pub enum RunConfig {
    /// A sentence-embedding model.
    Embedder(TrainConfig),
    /// A cross-encoder reranker.
    Reranker(RerankTrainConfig),
}

/// A training task as this worker runs it: the inputs both kinds share and the configuration.
pub struct TrainRun {
    /// The base model bundle.
    pub base_model: BlobId,
    /// The training data blob.
    pub data: BlobId,
    /// A checkpoint bundle to resume from.
    pub resume: Option<BlobId>,
    /// Device preference.
    pub device: String,
    /// The base model's name for the exported metadata.
    pub base_model_name: String,
    /// What to train, how.
    pub config: RunConfig,
}

impl TrainRun {
    /// An embedder run from its task.
    pub fn embedder(spec: TrainSpec) -> Self {
        Self {
            config: RunConfig::Embedder(TrainConfig::from(&spec.settings)),
            base_model: spec.base_model,
            data: spec.data,
            resume: spec.resume,
            device: spec.device,
            base_model_name: spec.base_model_name,
        }
    }

    /// A reranker run from its task.
    pub fn reranker(spec: TrainRerankerSpec) -> Self {
        Self {
            config: RunConfig::Reranker(RerankTrainConfig::from(&spec.settings)),
            base_model: spec.base_model,
            data: spec.data,
            resume: spec.resume,
            device: spec.device,
            base_model_name: spec.base_model_name,
        }
    }
}

/// Everything a blocking training run needs besides the configuration.
struct RunInputs {
    model_dir: PathBuf,
    data_path: PathBuf,
    checkpoint_dir: PathBuf,
    resume_from: Option<PathBuf>,
    out_dir: PathBuf,
    device: candle_core::Device,
    record: RunRecord,
}

/// The next event of a blocking run, setting its `flag` when `cancel` fires meanwhile (the
/// run stops before its next step and drops its sender: `None` then).
async fn next_event(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<TrainEvent>,
    cancel: &CancellationToken,
    flag: &AtomicBool,
) -> Option<TrainEvent> {
    loop {
        tokio::select! {
            ev = rx.recv() => return ev,
            _ = cancel.cancelled(), if !flag.load(Ordering::SeqCst) => {
                flag.store(true, Ordering::SeqCst);
            }
        }
    }
}

/// The blocking part of a training task: load, train, and (unless cancelled) export into
/// `out_dir` with its metadata. Returns the outcome and the metadata written.
fn train_blocking(
    config: RunConfig,
    run: RunInputs,
    flag: &AtomicBool,
    tx: &tokio::sync::mpsc::UnboundedSender<TrainEvent>,
) -> Result<(TrainOutcome, TrainingMetadata), TaskError> {
    let invalid = |e: &dyn std::fmt::Display| TaskError::invalid(e.to_string());
    let failed = |e: &dyn std::fmt::Display| TaskError::failed(e.to_string());
    // Settings a run refuses would be refused again on any worker: not retryable.
    let train_err = |e: train::TrainError| match e {
        train::TrainError::Settings { .. } => TaskError::invalid(e.to_string()),
        other => TaskError::failed(other.to_string()),
    };
    let mut pairs = data::read_pairs(&run.data_path).map_err(|e| invalid(&e))?;
    let record = run.record;
    let meta = |out: &TrainOutcome, hyper: serde_json::Value, pairs: usize| {
        TrainingMetadata::of_run(&record, pairs, hyper, out)
    };
    match config {
        RunConfig::Embedder(mut cfg) => {
            cfg.checkpoint_dir = Some(run.checkpoint_dir);
            cfg.checkpoint_every.get_or_insert(50);
            cfg.resume_from = run.resume_from;
            let mut encoder =
                SentenceEncoder::load_dir(&run.model_dir, &run.device).map_err(|e| invalid(&e))?;
            let fill = data::uniform_negatives(&mut pairs, cfg.seed);
            tracing::info!(
                negatives = fill.per_pair,
                filled_pairs = fill.filled_pairs,
                added = fill.added,
                "negatives per pair (short pairs filled with random passages)"
            );
            // Both trainers restore the base model's length after training at a shorter one.
            let out =
                train::train(&mut encoder, &pairs, &cfg, flag, Some(tx)).map_err(train_err)?;
            let meta = meta(
                &out,
                serde_json::to_value(&cfg).unwrap_or_default(),
                pairs.len(),
            );
            if out.cancelled {
                return Ok((out, meta));
            }
            export_model(&encoder, &run.out_dir, Some(&meta)).map_err(|e| failed(&e))?;
            Ok((out, meta))
        }
        RunConfig::Reranker(mut cfg) => {
            cfg.train.checkpoint_dir = Some(run.checkpoint_dir);
            cfg.train.checkpoint_every.get_or_insert(50);
            cfg.train.resume_from = run.resume_from;
            let mut model = CrossEncoder::load_dir(&run.model_dir, &run.device, cfg.train.seed)
                .map_err(|e| invalid(&e))?;
            let out =
                train_reranker(&mut model, &pairs, &cfg, flag, Some(tx)).map_err(train_err)?;
            let meta = meta(
                &out,
                serde_json::to_value(&cfg).unwrap_or_default(),
                pairs.len(),
            );
            if out.cancelled {
                return Ok((out, meta));
            }
            export_reranker(&model, &run.out_dir, Some(&meta)).map_err(|e| failed(&e))?;
            Ok((out, meta))
        }
    }
}

/// Runs a training task: lays out the base model (and checkpoint), trains with periodic
/// checkpoints published as bundles, exports the model and publishes it.
pub(super) async fn run_training(
    env: &TaskEnv,
    task: &TaskRef,
    spec: TrainRun,
    progress: ProgressCell,
    cancel: CancellationToken,
) -> Result<TaskOutput, TaskError> {
    let store = env.blobs.clone();
    let work = env.work_dir.clone();
    let run_dir = work
        .join("runs")
        .join(format!("{}-{}", task.task_id, task.attempt));
    let (store2, work2) = (store.clone(), work.clone());
    let (base_model, resume) = (spec.base_model, spec.resume);
    let (model_dir, resume_dir) = tokio::task::spawn_blocking(move || {
        let model = materialize(&store2, &work2, &base_model)?;
        let resume = match &resume {
            Some(id) => {
                let dir = materialize(&store2, &work2, id)?;
                Some(dir)
            }
            None => None,
        };
        Ok::<_, TaskError>((model, resume))
    })
    .await
    .map_err(TaskError::failed)??;
    let data_path = store.path(&spec.data);
    if !data_path.is_file() {
        return Err(TaskError::invalid(format!(
            "training data blob {} is not on this worker",
            spec.data
        )));
    }
    let (dev, device_name) = super::select_device(&spec.device)?;
    progress.update(|p| p.device = device_name.clone());
    let out_dir = run_dir.join("model");
    let run = RunInputs {
        model_dir,
        data_path,
        checkpoint_dir: run_dir.join("checkpoints"),
        resume_from: resume_dir,
        out_dir: out_dir.clone(),
        device: dev,
        record: RunRecord {
            base_model: spec.base_model_name.clone(),
            data_hash: spec.data.to_hex(),
            started: SystemTime::now(),
            device: device_name.clone(),
        },
    };
    let flag = Arc::new(AtomicBool::new(false));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let (run_flag, config) = (flag.clone(), spec.config);
    let job = tokio::task::spawn_blocking(move || train_blocking(config, run, &run_flag, &tx));
    while let Some(ev) = next_event(&mut rx, &cancel, &flag).await {
        match ev {
            TrainEvent::Started {
                total_steps,
                start_step,
                ..
            } => progress.update(|p| {
                p.total = total_steps as u64;
                p.done = start_step as u64;
            }),
            TrainEvent::Step(s) => progress.update(|p| {
                p.done = s.step as u64;
                p.total = s.total_steps as u64;
                p.loss = Some(s.loss);
                p.rate = s.pairs_per_sec;
                p.eta_secs = Some(s.eta.as_secs());
                p.losses.push((s.step as u64, s.loss));
            }),
            TrainEvent::Checkpoint { step, path } => {
                let store = store.clone();
                // Once the bundle holds its files the directory is a third copy (the store and
                // the coordinator's store hold the others): a resume reads the bundle back.
                let published = tokio::task::spawn_blocking(move || {
                    store.put_dir(&path).inspect(|_| {
                        let _ = std::fs::remove_dir_all(&path);
                    })
                })
                .await;
                match published {
                    Ok(Ok(id)) => {
                        tracing::info!(task = %task, step, bundle = %id, "checkpoint published");
                        progress.update(|p| p.checkpoint = Some((step as u64, id)));
                    }
                    Ok(Err(e)) => tracing::warn!(error = %e, "checkpoint not published"),
                    Err(e) => tracing::warn!(error = %e, "checkpoint not published"),
                }
            }
        }
    }
    let (outcome, meta) = job.await.map_err(TaskError::failed)??;
    if outcome.cancelled {
        return Err(TaskError::failed("training cancelled"));
    }
    let metadata_json = serde_json::to_string(&meta).unwrap_or_default();
    let model = tokio::task::spawn_blocking(move || store.put_dir(&out_dir))
        .await
        .map_err(TaskError::failed)?
        .map_err(TaskError::failed)?;
    let first_step = (outcome.steps + 1).saturating_sub(outcome.losses.len()) as u64;
    let losses = outcome
        .losses
        .iter()
        .enumerate()
        .map(|(i, l)| (first_step + i as u64, *l))
        .collect();
    Ok(TaskOutput::Trained {
        losses,
        model,
        steps: outcome.steps as u64,
        pairs_per_sec: outcome.pairs_per_sec,
        device: device_name,
        metadata_json,
    })
}

/// Synthetic pairs of about `seq_len` tokens each, for calibration.
fn calibration_pairs(n: usize, seq_len: usize) -> Vec<TrainPair> {
    const WORDS: [&str; 12] = [
        "index",
        "vacuum",
        "table",
        "query",
        "planner",
        "backup",
        "replica",
        "lock",
        "commit",
        "schema",
        "buffer",
        "checkpoint",
    ];
    let text = |i: usize, salt: usize| {
        (0..seq_len)
            .map(|k| WORDS[(i * 7 + k * 3 + salt) % WORDS.len()])
            .collect::<Vec<_>>()
            .join(" ")
    };
    (0..n)
        .map(|i| TrainPair {
            query: format!("{i} {}", text(i, 1)),
            positive: format!("{i} {}", text(i, 5)),
            negatives: Vec::new(),
        })
        .collect()
}

/// Measures training pairs/s for a model: a few optimiser steps on synthetic pairs of the
/// requested length, the first step (allocation, warm-up) excluded.
pub(super) async fn run_calibration(
    env: &TaskEnv,
    spec: CalibrateSpec,
    progress: ProgressCell,
    cancel: CancellationToken,
) -> Result<TaskOutput, TaskError> {
    let (store, work, model_id) = (env.blobs.clone(), env.work_dir.clone(), spec.model);
    let model_dir = tokio::task::spawn_blocking(move || materialize(&store, &work, &model_id))
        .await
        .map_err(TaskError::failed)??;
    let (dev, device_name) = super::select_device(&spec.device)?;
    let steps = spec.steps.max(1) as usize + 1;
    let batch = spec.batch_size.max(2) as usize;
    progress.update(|p| {
        p.total = steps as u64;
        p.device = device_name.clone();
    });
    let flag = Arc::new(AtomicBool::new(false));
    let seq_len = spec.seq_len.max(8) as usize;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let run_flag = flag.clone();
    let job = tokio::task::spawn_blocking(move || {
        let mut encoder = SentenceEncoder::load_dir(&model_dir, &dev)
            .map_err(|e| TaskError::invalid(e.to_string()))?;
        let pairs = calibration_pairs(batch * steps, seq_len);
        let cfg = TrainConfig {
            batch_size: batch,
            max_seq_len: Some(seq_len.min(encoder.bert().config().max_position_embeddings)),
            max_steps: Some(steps),
            lr: 1e-9,
            ..TrainConfig::default()
        };
        train::train(&mut encoder, &pairs, &cfg, &run_flag, Some(&tx))
            .map_err(|e| TaskError::failed(e.to_string()))
    });
    let mut first: Option<Instant> = None;
    let mut last = (Instant::now(), 0usize);
    while let Some(ev) = next_event(&mut rx, &cancel, &flag).await {
        if let TrainEvent::Step(s) = ev {
            let now = Instant::now();
            if s.step == 1 {
                first = Some(now);
            }
            last = (now, s.step);
            progress.update(|p| p.done = s.step as u64);
        }
    }
    let outcome = job.await.map_err(TaskError::failed)??;
    if outcome.cancelled {
        return Err(TaskError::failed("calibration cancelled"));
    }
    let pairs_per_sec = match first {
        Some(t1) if last.1 > 1 => {
            let secs = last.0.duration_since(t1).as_secs_f64().max(1e-6);
            ((last.1 - 1) * batch) as f64 / secs
        }
        _ => outcome.pairs_per_sec,
    };
    Ok(TaskOutput::Calibrated {
        pairs_per_sec,
        device: device_name,
        peak_bytes: device::peak_rss_bytes(),
    })
}
