//! Export of a (fine-tuned) encoder as a sentence-transformers model directory that
//! sentence-transformers, transformers and this engine load unchanged, plus
//! `training_metadata.json` describing how it was made.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::embed::config::{ConfigError, SentenceConfig};
use crate::embed::model::{save_safetensors, ModelError};
use crate::embed::SentenceEncoder;
use crate::train::TrainOutcome;

/// Errors raised while exporting.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Writing configuration files failed.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Writing weights failed.
    #[error(transparent)]
    Model(#[from] ModelError),
}

/// What `training_metadata.json` records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingMetadata {
    /// Base model (directory or hub id) as given.
    pub base_model: String,
    /// BLAKE3 of the training data file.
    pub data_hash: String,
    /// Number of training pairs.
    pub pairs: usize,
    /// Hyperparameters (the training configuration).
    pub hyperparameters: serde_json::Value,
    /// Metrics (final loss, steps, throughput, evaluation when run).
    pub metrics: serde_json::Value,
    /// Start time (RFC 3339).
    pub started: String,
    /// End time (RFC 3339).
    pub finished: String,
    /// Training wall time in seconds.
    pub duration_secs: f64,
    /// Device used (`cpu`, `cuda:0`, `metal:0`).
    pub device: String,
    /// Engine that produced the model.
    pub engine: String,
}

/// Where a training run's metadata comes from, besides its outcome.
#[derive(Debug, Clone)]
pub struct RunRecord {
    /// Base model as given.
    pub base_model: String,
    /// BLAKE3 of the training data.
    pub data_hash: String,
    /// When the run started.
    pub started: std::time::SystemTime,
    /// Device description.
    pub device: String,
}

impl TrainingMetadata {
    /// The metadata of a run that ended now: its outcome's figures (steps, first and final loss,
    /// pairs/s, cancelled) under `metrics`, the wall time since `run.started`.
    pub fn of_run(
        run: &RunRecord,
        pairs: usize,
        hyperparameters: serde_json::Value,
        outcome: &TrainOutcome,
    ) -> Self {
        let now = std::time::SystemTime::now();
        Self {
            base_model: run.base_model.clone(),
            data_hash: run.data_hash.clone(),
            pairs,
            hyperparameters,
            metrics: serde_json::json!({
                "steps": outcome.steps,
                "final_loss": outcome.losses.last(),
                "first_loss": outcome.losses.first(),
                "pairs_per_sec": outcome.pairs_per_sec,
                "cancelled": outcome.cancelled,
            }),
            started: humantime::format_rfc3339_seconds(run.started).to_string(),
            finished: humantime::format_rfc3339_seconds(now).to_string(),
            duration_secs: now
                .duration_since(run.started)
                .unwrap_or_default()
                .as_secs_f64(),
            device: run.device.clone(),
            engine: format!("ragd-worker {}", env!("CARGO_PKG_VERSION")),
        }
    }
}

/// Tokenizer files copied from the source model when present.
pub(crate) const TOKENIZER_FILES: [&str; 4] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
];

pub(crate) fn copy(src: &Path, dst: &Path) -> Result<(), ExportError> {
    std::fs::copy(src, dst)
        .map(|_| ())
        .map_err(|source| ExportError::Io {
            path: src.to_path_buf(),
            source,
        })
}

/// Writes `encoder` (LoRA adapters merged) to `out` as a sentence-transformers directory:
/// config.json, model.safetensors, tokenizer files, modules.json, 1_Pooling/config.json,
/// sentence_bert_config.json, config_sentence_transformers.json and, if given,
/// training_metadata.json.
pub fn export_model(
    encoder: &SentenceEncoder,
    out: &Path,
    metadata: Option<&TrainingMetadata>,
) -> Result<(), ExportError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ExportError::Io { path, source }
    };
    std::fs::create_dir_all(out).map_err(io(out))?;
    let src = encoder.dir();
    let cfg_src = src.join("config.json");
    let cfg_json = match std::fs::read_to_string(&cfg_src)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
    {
        Some(v) if v.is_object() => v,
        _ => encoder.bert().config().to_hf_json(),
    };
    write_json(&out.join("config.json"), &cfg_json)?;
    save_safetensors(
        &out.join("model.safetensors"),
        &encoder.bert().export_tensors()?,
    )?;
    for f in TOKENIZER_FILES {
        let p = src.join(f);
        if p.exists() && src != out {
            copy(&p, &out.join(f))?;
        }
    }
    let s: &SentenceConfig = encoder.sentence_config();
    s.write_to(out, encoder.dim())?;
    write_json(
        &out.join("config_sentence_transformers.json"),
        &serde_json::json!({
            "__version__": {"ragd_worker": env!("CARGO_PKG_VERSION")},
            "prompts": {},
            "default_prompt_name": null,
            "similarity_fn_name": "cosine",
        }),
    )?;
    if let Some(m) = metadata {
        let v = serde_json::to_value(m).expect("metadata serialises");
        write_json(&out.join("training_metadata.json"), &v)?;
    }
    tracing::info!(out = %out.display(), "exported sentence-transformers model");
    Ok(())
}

pub(crate) fn write_json(path: &Path, v: &serde_json::Value) -> Result<(), ExportError> {
    let text = serde_json::to_string_pretty(v).expect("JSON values always serialise");
    std::fs::write(path, text).map_err(|source| ExportError::Io {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::tests::{tiny_encoder, toy_pairs};
    use crate::train::{train, TrainConfig};
    use candle_core::Device;
    use std::sync::atomic::AtomicBool;

    #[test]
    fn exported_model_reloads_with_identical_embeddings() {
        let (_d, mut enc) = tiny_encoder();
        let cfg = TrainConfig {
            epochs: 1,
            batch_size: 16,
            lr: 1e-3,
            lora: Some(Default::default()),
            ..TrainConfig::default()
        };
        train(&mut enc, &toy_pairs(), &cfg, &AtomicBool::new(false), None).unwrap();
        let out = tempfile::tempdir().unwrap();
        let meta = TrainingMetadata {
            base_model: "tiny".into(),
            data_hash: "abc".into(),
            pairs: 32,
            hyperparameters: serde_json::to_value(&cfg).unwrap(),
            metrics: serde_json::json!({"final_loss": 1.0}),
            started: "2026-01-01T00:00:00Z".into(),
            finished: "2026-01-01T00:01:00Z".into(),
            duration_secs: 60.0,
            device: "cpu".into(),
            engine: "ragd-worker".into(),
        };
        export_model(&enc, out.path(), Some(&meta)).unwrap();
        let back = SentenceEncoder::load_dir(out.path(), &Device::Cpu).unwrap();
        let texts = [
            "the owl eats mice near the lake",
            "where does the fox find berries?",
        ];
        let a = enc.encode(&texts, 8).unwrap();
        let b = back.encode(&texts, 8).unwrap();
        let d = a
            .iter()
            .flatten()
            .zip(b.iter().flatten())
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(d < 1e-5, "max abs diff {d}");
        assert_eq!(back.sentence_config(), enc.sentence_config());
        let m: TrainingMetadata = serde_json::from_str(
            &std::fs::read_to_string(out.path().join("training_metadata.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(m, meta);
        let st = safetensors::SafeTensors::read_metadata(
            &std::fs::read(out.path().join("model.safetensors")).unwrap(),
        )
        .unwrap();
        assert_eq!(st.1.metadata().as_ref().unwrap()["format"], "pt");
    }
}
