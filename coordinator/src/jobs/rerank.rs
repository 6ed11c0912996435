//! The reranker in a job: its training settings and cost inputs, where its model goes, and the
//! reranking evaluation the coordinator runs on the held-out queries.

use super::drive::JobCtx;
use super::local::{self, PrepareOutput};
use super::train::{RunSettings, TrainInputs};
use super::JobError;
use super::JobSpec;
use ragd_engine::eval::{self, beir};
use ragd_engine::rerank::eval::{evaluate_pipelines, RerankMetrics};
use ragd_engine::rerank::loss::RerankLoss;
use ragd_engine::rerank::train::RerankTrainConfig;
use ragd_engine::rerank::{CrossEncoder, HeadOrigin};
use ragd_engine::train::TrainConfig;
use ragd_shared::protocol::jobs::BlobId;
use std::path::{Path, PathBuf};

/// Where the reranker of a job whose embedder goes to `dest` is written: `DEST-reranker`.
pub fn reranker_dest(dest: &Path) -> PathBuf {
    let name = dest
        .file_name()
        .map_or_else(|| "model".into(), |n| n.to_string_lossy().into_owned());
    dest.with_file_name(format!("{name}-reranker"))
}

/// The worker's reranker settings for a job.
pub fn reranker_config(spec: &JobSpec) -> RerankTrainConfig {
    let defaults = RerankTrainConfig::default();
    RerankTrainConfig {
        train: TrainConfig {
            epochs: spec.reranker_epochs,
            batch_size: spec.reranker_batch_size,
            lr: spec.reranker_lr,
            seed: spec.seed,
            max_seq_len: spec.reranker_max_seq_len,
            max_steps: spec.reranker_max_steps,
            checkpoint_every: Some(spec.checkpoint_every.max(1)),
            ..defaults.train
        },
        loss: RerankLoss::from_name(&spec.reranker_loss).unwrap_or(defaults.loss),
        negatives: spec.reranker_negatives,
        new_head_lr_scale: spec.reranker_head_lr_scale,
    }
}

/// Inputs of the `train_reranker` stage: the reranker base (as a bundle), the mined training
/// rows, the settings, and for the cost model the scored pairs and a memory estimate.
pub fn reranker_inputs(
    ctx: &JobCtx,
    spec: &JobSpec,
    prepared: &PrepareOutput,
) -> Result<TrainInputs, JobError> {
    let base = spec.reranker_base();
    let base_model = ctx.blobs.put_dir(base)?;
    let cfg = reranker_config(spec);
    let negatives = spec
        .reranker_negatives
        .unwrap_or(prepared.negatives)
        .min(prepared.negatives);
    let per_query = 1 + negatives + cfg.loss.in_batch_negatives();
    let rows = prepared.train_records * spec.reranker_epochs;
    let steps = rows.div_ceil(spec.reranker_batch_size.max(1));
    let pairs_to_train = (spec.reranker_max_steps.map_or(steps, |m| m.min(steps))
        * spec.reranker_batch_size
        * per_query) as f64;
    let bert: Option<ragd_engine::embed::config::BertConfig> =
        std::fs::read_to_string(base.join("config.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok());
    let memory_needed = bert.map_or(0, |b| {
        let seq = spec
            .reranker_max_seq_len
            .unwrap_or(b.max_position_embeddings.min(512));
        let texts = spec.reranker_batch_size * per_query;
        ragd_engine::device::estimate_training_memory(&b, texts, seq, 0).total
    });
    Ok(TrainInputs {
        settings: RunSettings::Reranker((&cfg).into()),
        pairs_to_train,
        base_model,
        data: BlobId::from_hex(&prepared.train_blob)
            .ok_or_else(|| JobError::stage("prepare", "bad training blob id"))?,
        pairs: prepared.train_records,
        negatives,
        memory_needed,
        base_model_name: base.display().to_string(),
    })
}

/// Reranks the held-out queries' top `rerank_depth` candidates of `embedder_dir` with the
/// fine-tuned reranker (and the base reranker when it is already a cross-encoder); returns the
/// embedder-alone row first.
pub async fn evaluate_reranking(
    ctx: &JobCtx,
    job: &str,
    spec: &JobSpec,
    embedder_dir: &Path,
    reranker_dir: &Path,
    test_bundle: &BlobId,
) -> Result<Vec<RerankMetrics>, JobError> {
    let test_dir = local::job_dir(ctx, job).join("test-rerank");
    let _ = std::fs::remove_dir_all(&test_dir);
    ctx.blobs.materialize(test_bundle, &test_dir)?;
    let (embedder, tuned, base) = (
        embedder_dir.to_path_buf(),
        reranker_dir.to_path_buf(),
        spec.reranker_base().to_path_buf(),
    );
    let depth = spec.rerank_depth;
    tokio::task::spawn_blocking(move || {
        let err = |e: &dyn std::fmt::Display| JobError::stage("evaluate", e.to_string());
        let dev = candle_core::Device::Cpu;
        let data = beir::load(&test_dir, false).map_err(|e| err(&e))?;
        let e =
            ragd_engine::embed::SentenceEncoder::load_dir(&embedder, &dev).map_err(|e| err(&e))?;
        let candidates = eval::retrieve(&e, &data, depth, 32).map_err(|e| err(&e))?;
        let tuned = CrossEncoder::load_dir(&tuned, &dev, 0).map_err(|e| err(&e))?;
        let base = CrossEncoder::load_dir(&base, &dev, 0).map_err(|e| err(&e))?;
        let mut rerankers: Vec<(&str, &CrossEncoder)> = Vec::new();
        if base.head().origin() == HeadOrigin::Loaded {
            rerankers.push(("base reranker", &base));
        }
        rerankers.push(("fine-tuned reranker", &tuned));
        evaluate_pipelines(&data, &candidates, &rerankers, 32).map_err(|e| err(&e))
    })
    .await
    .map_err(|e| JobError::stage("evaluate", e))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reranker_goes_beside_the_embedder() {
        assert_eq!(
            reranker_dest(Path::new("/s/models/job-1")),
            Path::new("/s/models/job-1-reranker")
        );
    }
}
