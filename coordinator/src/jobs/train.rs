//! The training stages (the embedder's `train`, the reranker's `train_reranker`): calibrate and
//! place (see [`super::placement`]), send the base model and the dataset, drive the run while
//! bringing every checkpoint home, and when the training node is lost, resume from the last
//! checkpoint on the next best node.

use super::drive::{drive, DriveError, JobCtx};
use super::local::PrepareOutput;
use super::placement::{self, CandidateFacts};
use super::remote;
use super::JobError;
use super::JobSpec;
use crate::report::PlacementRow;
use ragd_shared::protocol::jobs::{
    BlobId, CalibrateSpec, TaskOutput, TaskProgress, TaskRef, TaskSpec, TaskStart,
    TrainRerankerSpec, TrainSpec,
};
use ragd_shared::protocol::settings::{RerankTrainSettings, TrainSettings};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// What the training stage produced.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainOutput {
    /// The model bundle (hex), in the coordinator's store.
    pub model: String,
    /// Steps done.
    pub steps: u64,
    /// Pairs per second.
    pub pairs_per_sec: f64,
    /// Device.
    pub device: String,
    /// Worker that finished the run.
    pub worker: String,
    /// The placement of the last attempt.
    pub placement: Vec<PlacementRow>,
    /// Training metadata (JSON).
    pub metadata_json: String,
}

/// Which model a training stage fine-tunes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrainKind {
    /// The sentence-embedding model (stage `train`).
    Embedder,
    /// The cross-encoder reranker (stage `train_reranker`).
    Reranker,
}

impl TrainKind {
    /// The stage name.
    pub fn stage(self) -> &'static str {
        match self {
            Self::Embedder => "train",
            Self::Reranker => "train_reranker",
        }
    }

    /// The key of this run's losses and checkpoints in `jobs.db` (the job id for the embedder,
    /// `JOB/reranker` for the reranker).
    pub fn series(self, job: &str) -> String {
        match self {
            Self::Embedder => job.to_string(),
            Self::Reranker => format!("{job}/reranker"),
        }
    }
}

/// A training stage's settings, by model kind (what the task carries).
#[derive(Debug, Clone, PartialEq)]
pub enum RunSettings {
    /// The embedder's.
    Embedder(TrainSettings),
    /// The reranker's.
    Reranker(RerankTrainSettings),
}

impl RunSettings {
    /// The kind of model these settings train.
    pub fn kind(&self) -> TrainKind {
        match self {
            Self::Embedder(_) => TrainKind::Embedder,
            Self::Reranker(_) => TrainKind::Reranker,
        }
    }

    /// The task of one attempt: train from `inputs`, resuming from `resume` if given.
    fn task(&self, inputs: &TrainInputs, resume: Option<BlobId>) -> TaskSpec {
        let (base_model, data, device) = (inputs.base_model, inputs.data, "auto".to_string());
        let base_model_name = inputs.base_model_name.clone();
        match self {
            Self::Embedder(settings) => TaskSpec::Train(TrainSpec {
                base_model,
                data,
                settings: settings.clone(),
                resume,
                device,
                base_model_name,
            }),
            Self::Reranker(settings) => TaskSpec::TrainReranker(TrainRerankerSpec {
                base_model,
                data,
                settings: settings.clone(),
                resume,
                device,
                base_model_name,
            }),
        }
    }
}

/// Inputs of the stage.
pub struct TrainInputs {
    /// What the run trains, how.
    pub settings: RunSettings,
    /// Pairs the run will train on (all epochs), for the cost model.
    pub pairs_to_train: f64,
    /// Base model bundle.
    pub base_model: BlobId,
    /// Training pairs blob.
    pub data: BlobId,
    /// Number of pairs.
    pub pairs: usize,
    /// Negatives per pair.
    pub negatives: usize,
    /// Estimated peak memory of the run (bytes).
    pub memory_needed: u64,
    /// Base model name for metadata.
    pub base_model_name: String,
}

/// Inputs of the embedder's `train` stage: the base model (as a bundle), the mined training
/// pairs, the settings, and for the cost model the pairs to train and a memory estimate.
pub fn embedder_inputs(
    ctx: &JobCtx,
    spec: &JobSpec,
    prepared: &PrepareOutput,
) -> Result<TrainInputs, JobError> {
    let base_model = ctx.blobs.put_dir(&spec.base_model)?;
    let cfg = ragd_engine::train::TrainConfig {
        epochs: spec.epochs,
        batch_size: spec.batch_size,
        lr: spec.lr,
        seed: spec.seed,
        max_seq_len: spec.max_seq_len,
        max_steps: spec.max_steps,
        matryoshka_dims: spec.matryoshka.then(Vec::new),
        checkpoint_every: Some(spec.checkpoint_every.max(1)),
        ..Default::default()
    };
    let bert: Option<ragd_engine::embed::config::BertConfig> =
        std::fs::read_to_string(spec.base_model.join("config.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok());
    let memory_needed = bert.map_or(0, |b| {
        let seq = spec
            .max_seq_len
            .unwrap_or(b.max_position_embeddings.min(256));
        let texts = spec.batch_size * (2 + prepared.negatives);
        ragd_engine::device::estimate_training_memory(&b, texts, seq, 0).total
    });
    let all = (prepared.train_records * spec.epochs) as f64;
    Ok(TrainInputs {
        settings: RunSettings::Embedder((&cfg).into()),
        pairs_to_train: spec
            .max_steps
            .map_or(all, |s| all.min((s * spec.batch_size) as f64)),
        base_model,
        data: BlobId::from_hex(&prepared.train_blob)
            .ok_or_else(|| JobError::stage("prepare", "bad training blob id"))?,
        pairs: prepared.train_records,
        negatives: prepared.negatives,
        memory_needed,
        base_model_name: spec.base_model.display().to_string(),
    })
}

fn parse_id(hex: &str) -> Option<BlobId> {
    BlobId::from_hex(hex)
}

/// Gathers the facts of every ready candidate, calibrating where no measurement is cached.
async fn candidates(
    ctx: &JobCtx,
    job: &str,
    spec: &JobSpec,
    inputs: &TrainInputs,
    lost: &HashSet<String>,
    uncalibrated: &mut HashSet<String>,
    cancel: &CancellationToken,
) -> Result<Vec<CandidateFacts>, JobError> {
    let records = ctx.registry.snapshot();
    let any_gpu = records.iter().any(|w| {
        ctx.worker_ready(&w.id) && w.capabilities.as_ref().is_some_and(|c| !c.gpus.is_empty())
    });
    let mut out = Vec::new();
    for w in records {
        if !ctx.worker_ready(&w.id) {
            continue;
        }
        if let Some(on) = &spec.on {
            if *on != w.id {
                continue;
            }
        }
        let Some(caps) = w.capabilities.clone() else {
            continue;
        };
        let has_gpu = !caps.gpus.is_empty();
        match spec.prefer.as_deref() {
            Some("gpu") if any_gpu && !has_gpu => continue,
            Some("cpu") if has_gpu => continue,
            _ => {}
        }
        let Some(conn) = ctx.supervisor.connection(&w.id) else {
            continue;
        };
        let mut facts = CandidateFacts {
            worker: w.id.clone(),
            device: "?".into(),
            pairs_per_sec: None,
            bytes_missing: 0,
            busy: w.load.is_some_and(|l| l.busy_slots >= l.total_slots),
            memory_needed: inputs.memory_needed,
            memory_available: caps.available_memory_bytes,
            excluded: lost
                .contains(&w.id)
                .then(|| "lost earlier in this job".to_string()),
        };
        let model_key = inputs.base_model.to_hex();
        let cached = ctx.db.calibration(&w.id, &model_key)?;
        let measured = match cached {
            Some(c) => Some(c),
            None if facts.excluded.is_none() && !uncalibrated.contains(&w.id) => {
                let m = calibrate(ctx, job, spec, &w.id, &conn, &inputs.base_model, cancel).await?;
                if m.is_none() {
                    // Not retried in this job: the placement notes it and moves on.
                    uncalibrated.insert(w.id.clone());
                }
                m
            }
            None => None,
        };
        if let Some((device, pps)) = measured {
            if device.starts_with("cuda") || device.starts_with("metal") {
                facts.memory_available = caps.gpus.first().map_or(0, |g| g.memory_bytes);
            }
            facts.device = device;
            facts.pairs_per_sec = Some(pps);
        }
        let bundle = ctx.blobs.bundle(&inputs.base_model)?;
        let mut ids: Vec<BlobId> = bundle.files.iter().map(|f| f.blob).collect();
        let mut lens: Vec<u64> = bundle.files.iter().map(|f| f.len).collect();
        ids.push(inputs.data);
        lens.push(std::fs::metadata(ctx.blobs.path(&inputs.data)).map_or(0, |m| m.len()));
        if let Ok(ragd_shared::protocol::messages::Response::BlobHoldings(h)) =
            ragd_shared::transport::request(
                &conn,
                &ragd_shared::protocol::messages::Request::QueryBlobs(
                    ragd_shared::protocol::jobs::BlobQuery { blobs: ids.clone() },
                ),
                Duration::from_secs(10),
            )
            .await
        {
            facts.bytes_missing = h
                .missing
                .iter()
                .zip(&lens)
                .map(|(m, len)| m.map_or(0, |have| len.saturating_sub(have)))
                .sum();
        }
        out.push(facts);
    }
    Ok(out)
}

/// Runs (and caches) a calibration on one worker: (device, pairs/s).
pub(super) async fn calibrate(
    ctx: &JobCtx,
    job: &str,
    spec: &JobSpec,
    worker: &str,
    conn: &quinn::Connection,
    base_model: &BlobId,
    cancel: &CancellationToken,
) -> Result<Option<(String, f64)>, JobError> {
    if let Err(e) = remote::push_bundle(conn, &ctx.blobs, base_model).await {
        ctx.db.event(
            job,
            &format!("calibration: cannot send the base model to {worker}: {e}"),
        )?;
        return Ok(None);
    }
    let task_id = format!("calibrate-{}-{worker}", &base_model.to_hex()[..16]);
    let start = TaskStart {
        task: TaskRef {
            task_id,
            attempt: 1,
        },
        job_id: job.to_string(),
        spec: TaskSpec::Calibrate(CalibrateSpec {
            model: *base_model,
            // Pairs/s hardly depends on the batch size; a small batch keeps calibration short.
            batch_size: spec.batch_size.min(8) as u32,
            seq_len: spec.max_seq_len.unwrap_or(128) as u32,
            steps: 2,
            device: "auto".into(),
        }),
    };
    let tref = start.task.clone();
    // Calibration tasks are not in the task table: no lease to renew.
    let result = drive(ctx, worker, start, Vec::new(), false, cancel, |_| async {}).await;
    let _ = remote::forget(conn, &tref).await;
    match result {
        Ok(TaskOutput::Calibrated {
            pairs_per_sec,
            device,
            ..
        }) => {
            ctx.db
                .set_calibration(worker, &base_model.to_hex(), &device, pairs_per_sec)?;
            ctx.db.event(
                job,
                &format!("calibration: {worker} trains {pairs_per_sec:.1} pairs/s on {device}"),
            )?;
            Ok(Some((device, pairs_per_sec)))
        }
        Ok(other) => Err(JobError::stage(
            "train",
            format!("calibration answered {other:?}"),
        )),
        Err(DriveError::Cancelled) => Err(JobError::Cancelled),
        Err(e) => {
            ctx.db
                .event(job, &format!("calibration on {worker} failed: {e}"))?;
            Ok(None)
        }
    }
}

/// Runs the training stage to completion (or failure after every attempt).
pub async fn run_training(
    ctx: &JobCtx,
    job: &str,
    spec: &JobSpec,
    inputs: &TrainInputs,
    cancel: &CancellationToken,
) -> Result<TrainOutput, JobError> {
    let stage = inputs.settings.kind().stage();
    let series = inputs.settings.kind().series(job);
    ctx.db.ensure_tasks(job, stage, &[String::from("{}")])?;
    let mut lost: HashSet<String> = HashSet::new();
    let mut uncalibrated: HashSet<String> = HashSet::new();
    let pairs_to_train = inputs.pairs_to_train;
    let mut waiting_announced = false;
    loop {
        if cancel.is_cancelled() {
            return Err(JobError::Cancelled);
        }
        let facts = candidates(ctx, job, spec, inputs, &lost, &mut uncalibrated, cancel).await?;
        let (rows, best) = placement::choose(&facts, pairs_to_train);
        let Some(best) = best else {
            if !waiting_announced {
                let why = if rows.is_empty() {
                    "no ready worker".to_string()
                } else {
                    placement::explain(&rows)
                };
                ctx.db.event(
                    job,
                    &format!("{stage}: waiting for a usable worker ({why})"),
                )?;
                waiting_announced = true;
            }
            // A lost worker that came back is usable again.
            lost.retain(|w| !ctx.worker_ready(w));
            tokio::select! {
                _ = cancel.cancelled() => return Err(JobError::Cancelled),
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            continue;
        };
        waiting_announced = false;
        let worker = facts[best].worker.clone();
        let why = placement::explain(&rows);
        ctx.db.stage_placed(job, stage, &worker, &why)?;
        ctx.db
            .event(job, &format!("{stage}: placed on {worker}: {why}"))?;
        match attempt(ctx, job, spec, inputs, &worker, rows.clone(), cancel).await {
            Ok(out) => return Ok(out),
            Err(AttemptEnd::Lost(why)) => {
                let ckpt = ctx.db.checkpoint(&series)?;
                ctx.db.event(
                    job,
                    &format!(
                        "{stage}: {worker} lost ({why}); resuming on the next best node from {}",
                        ckpt.map_or("the start".to_string(), |(s, _)| format!(
                            "the checkpoint of step {s}"
                        ))
                    ),
                )?;
                lost.insert(worker);
            }
            Err(AttemptEnd::Retry(why)) => {
                ctx.db
                    .event(job, &format!("{stage}: attempt on {worker} failed: {why}"))?;
            }
            Err(AttemptEnd::Fatal(e)) => return Err(e),
        }
    }
}

enum AttemptEnd {
    Lost(String),
    Retry(String),
    Fatal(JobError),
}

impl From<JobError> for AttemptEnd {
    fn from(e: JobError) -> Self {
        AttemptEnd::Fatal(e)
    }
}

async fn attempt(
    ctx: &JobCtx,
    job: &str,
    spec: &JobSpec,
    inputs: &TrainInputs,
    worker: &str,
    placement: Vec<PlacementRow>,
    cancel: &CancellationToken,
) -> Result<TrainOutput, AttemptEnd> {
    let ttl = ctx.lease_ttl.as_millis() as u64;
    let stage = inputs.settings.kind().stage();
    let series = inputs.settings.kind().series(job);
    let conn = ctx
        .supervisor
        .connection(worker)
        .ok_or_else(|| AttemptEnd::Lost("not connected".into()))?;
    let resume = ctx
        .db
        .checkpoint(&series)
        .map_err(JobError::from)?
        .and_then(|(_, hex)| parse_id(&hex));
    remote::push_bundle(&conn, &ctx.blobs, &inputs.base_model)
        .await
        .map_err(|e| AttemptEnd::Lost(e.to_string()))?;
    remote::push_blobs(&conn, &ctx.blobs, &[inputs.data])
        .await
        .map_err(|e| AttemptEnd::Lost(e.to_string()))?;
    if let Some(ckpt) = &resume {
        remote::push_bundle(&conn, &ctx.blobs, ckpt)
            .await
            .map_err(|e| AttemptEnd::Lost(e.to_string()))?;
    }
    let Some(task) = ctx
        .db
        .lease_next(job, stage, worker, ttl)
        .await
        .map_err(JobError::from)?
    else {
        return Err(AttemptEnd::Fatal(JobError::stage(
            stage,
            "the training task has failed too often and was set aside; see `ragd-coord logs`",
        )));
    };
    let tref = task.task_ref();
    let start = TaskStart {
        task: tref.clone(),
        job_id: job.to_string(),
        spec: inputs.settings.task(inputs, resume),
    };
    let on_progress = |p: TaskProgress| {
        let (conn, ctx, job, worker, series) = (
            conn.clone(),
            ctx.clone(),
            job.to_string(),
            worker.to_string(),
            series.clone(),
        );
        async move {
            let (ctx, job, worker) = (&ctx, job.as_str(), worker.as_str());
            let newest_seen = ctx.db.checkpoint(&series).ok().flatten().map(|c| c.0);
            if !p.losses.is_empty() {
                let _ = ctx.db.add_losses(&series, &p.losses);
            }
            ctx.set_live(
                job,
                stage,
                format!(
                    "{stage} on {worker} ({}): step {}/{} loss {} {:.1} pairs/s ETA {}",
                    p.device,
                    p.done,
                    p.total,
                    p.loss.map_or("-".into(), |l| format!("{l:.4}")),
                    p.rate,
                    p.eta_secs
                        .map_or("-".into(), |s| placement::human_secs(s as f64))
                ),
            );
            if let Some((step, id)) = p.checkpoint {
                if newest_seen.is_none_or(|n| step > n) {
                    match remote::fetch_bundle(&conn, &ctx.blobs, &id).await {
                        Ok(()) => {
                            let _ = ctx.db.set_checkpoint(&series, step, &id.to_hex(), worker);
                            let _ = ctx.db.event(
                                job,
                                &format!(
                                    "{stage}: checkpoint of step {step} brought home from {worker}"
                                ),
                            );
                        }
                        Err(e) => tracing::warn!(error = %e, "checkpoint not fetched"),
                    }
                }
            }
        }
    };
    let result = drive(ctx, worker, start, Vec::new(), true, cancel, on_progress).await;
    let max = spec.max_attempts.max(1) + 2;
    match result {
        Ok(TaskOutput::Trained {
            model,
            steps,
            pairs_per_sec,
            device,
            metadata_json,
            losses,
        }) => {
            ctx.db
                .add_losses(&series, &losses)
                .map_err(JobError::from)?;
            remote::fetch_bundle(&conn, &ctx.blobs, &model)
                .await
                .map_err(|e| AttemptEnd::Lost(format!("fetching the model: {e}")))?;
            let out = TrainOutput {
                model: model.to_hex(),
                steps,
                pairs_per_sec,
                device,
                worker: worker.to_string(),
                placement,
                metadata_json,
            };
            let json = serde_json::to_string(&out).expect("train output serialises");
            ctx.db
                .commit_task(&task.id, task.attempts, worker, &json, 0.0)
                .await
                .map_err(JobError::from)?;
            let _ = remote::forget(&conn, &tref).await;
            Ok(out)
        }
        Ok(other) => Err(AttemptEnd::Fatal(JobError::stage(
            stage,
            format!("worker answered {other:?}"),
        ))),
        Err(DriveError::Cancelled) => {
            let _ = ctx
                .db
                .release(&task.id, task.attempts, "cancelled", u32::MAX)
                .await;
            Err(AttemptEnd::Fatal(JobError::Cancelled))
        }
        Err(DriveError::Lost(why)) => {
            let _ = ctx.db.release(&task.id, task.attempts, &why, max).await;
            Err(AttemptEnd::Lost(why))
        }
        Err(DriveError::LeaseLost) => Err(AttemptEnd::Retry("lease lost".into())),
        Err(DriveError::Failed { message, retryable }) => {
            let _ = ctx
                .db
                .release(
                    &task.id,
                    task.attempts,
                    &message,
                    if retryable { max } else { 0 },
                )
                .await;
            if retryable {
                Err(AttemptEnd::Retry(message))
            } else {
                Err(AttemptEnd::Fatal(JobError::stage(stage, message)))
            }
        }
    }
}
