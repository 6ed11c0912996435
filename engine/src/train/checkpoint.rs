//! Training checkpoints: trainable weights, AdamW moments, step, dropout RNG and loss history,
//! from which a run resumes to the same result as an uninterrupted run.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use super::optim::{AdamW, OptimError};
use crate::embed::model::{save_safetensors, ModelError};
use crate::rng::Rng;

/// Errors raised while saving or loading a checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// `state.json` is malformed.
    #[error("{path}: malformed checkpoint state: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The parse error.
        source: serde_json::Error,
    },
    /// Tensors cannot be read or written.
    #[error("{path}: {message}")]
    Tensors {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The checkpoint was made with other settings.
    #[error(
        "{path}: checkpoint was written with different training settings ({field}: \
             checkpoint {saved}, now {now}); resume with the settings of the original run"
    )]
    Settings {
        /// The checkpoint.
        path: PathBuf,
        /// The differing setting.
        field: String,
        /// Its value in the checkpoint.
        saved: String,
        /// Its value now.
        now: String,
    },
    /// The optimiser state does not fit.
    #[error(transparent)]
    Optim(#[from] OptimError),
}

/// Everything but the tensors: written as `state.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointState {
    /// Optimiser steps completed.
    pub step: usize,
    /// Dropout RNG after that step.
    pub rng: Rng,
    /// Loss of every completed step.
    pub losses: Vec<f32>,
    /// Settings that must match on resume (name -> JSON value).
    pub settings: serde_json::Map<String, serde_json::Value>,
}

/// Writes `dir/checkpoint-STEP/` and returns its path.
pub fn save(
    dir: &Path,
    vars: &[(String, Var)],
    opt: &AdamW,
    state: &CheckpointState,
) -> Result<PathBuf, CheckpointError> {
    let path = dir.join(format!("checkpoint-{}", state.step));
    std::fs::create_dir_all(&path).map_err(|source| CheckpointError::Io {
        path: path.clone(),
        source,
    })?;
    let tensors_err = |p: PathBuf| {
        move |e: ModelError| CheckpointError::Tensors {
            path: p,
            message: e.to_string(),
        }
    };
    let weights: Vec<(String, Tensor)> = vars
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect();
    let wpath = path.join("weights.safetensors");
    save_safetensors(&wpath, &weights).map_err(tensors_err(wpath.clone()))?;
    let (moments, _) = opt.state();
    let opath = path.join("optimizer.safetensors");
    save_safetensors(&opath, &moments).map_err(tensors_err(opath.clone()))?;
    let spath = path.join("state.json");
    let text = serde_json::to_string_pretty(state).map_err(|source| CheckpointError::Json {
        path: spath.clone(),
        source,
    })?;
    std::fs::write(&spath, text).map_err(|source| CheckpointError::Io {
        path: spath,
        source,
    })?;
    tracing::info!(path = %path.display(), step = state.step, "saved checkpoint");
    Ok(path)
}

fn load_tensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>, CheckpointError> {
    candle_core::safetensors::load(path, device).map_err(|e| CheckpointError::Tensors {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Loads a checkpoint directory into `vars` and `opt`, checking that `settings` match.
pub fn load(
    path: &Path,
    vars: &[(String, Var)],
    opt: &mut AdamW,
    settings: &serde_json::Map<String, serde_json::Value>,
) -> Result<CheckpointState, CheckpointError> {
    let spath = path.join("state.json");
    let text = std::fs::read_to_string(&spath).map_err(|source| CheckpointError::Io {
        path: spath.clone(),
        source,
    })?;
    let state: CheckpointState =
        serde_json::from_str(&text).map_err(|source| CheckpointError::Json {
            path: spath.clone(),
            source,
        })?;
    for (k, now) in settings {
        let saved = state
            .settings
            .get(k)
            .cloned()
            .unwrap_or(serde_json::Value::Null);
        if &saved != now {
            return Err(CheckpointError::Settings {
                path: path.to_path_buf(),
                field: k.clone(),
                saved: saved.to_string(),
                now: now.to_string(),
            });
        }
    }
    let device = vars
        .first()
        .map(|(_, v)| v.device().clone())
        .unwrap_or(Device::Cpu);
    let wpath = path.join("weights.safetensors");
    let weights = load_tensors(&wpath, &device)?;
    for (n, v) in vars {
        let t = weights.get(n).ok_or_else(|| CheckpointError::Tensors {
            path: wpath.clone(),
            message: format!("tensor {n:?} is missing"),
        })?;
        v.set(t).map_err(|e| CheckpointError::Tensors {
            path: wpath.clone(),
            message: format!("{n}: {e}"),
        })?;
    }
    let moments = load_tensors(&path.join("optimizer.safetensors"), &device)?;
    opt.load_state(&moments, state.step)?;
    tracing::info!(path = %path.display(), step = state.step, "resumed from checkpoint");
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::optim::AdamWConfig;

    #[test]
    fn roundtrip_and_settings_check() {
        let dev = Device::Cpu;
        let dir = tempfile::tempdir().unwrap();
        let vars = vec![("a.weight".to_string(), Var::new(&[1f32, 2.], &dev).unwrap())];
        let mut opt = AdamW::new(&vars, AdamWConfig::default()).unwrap();
        let g = Tensor::new(&[0.1f32, 0.2], &dev).unwrap();
        opt.step(&vars, &[Some(g)], 0.01).unwrap();
        let mut settings = serde_json::Map::new();
        settings.insert("batch_size".into(), 8.into());
        let state = CheckpointState {
            step: 1,
            rng: Rng::new(3),
            losses: vec![0.5],
            settings: settings.clone(),
        };
        let p = save(dir.path(), &vars, &opt, &state).unwrap();
        let saved_w = vars[0].1.as_tensor().to_vec1::<f32>().unwrap();
        let vars2 = vec![("a.weight".to_string(), Var::new(&[0f32, 0.], &dev).unwrap())];
        let mut opt2 = AdamW::new(&vars2, AdamWConfig::default()).unwrap();
        let st = load(&p, &vars2, &mut opt2, &settings).unwrap();
        assert_eq!(st.step, 1);
        assert_eq!(st.rng, Rng::new(3));
        assert_eq!(vars2[0].1.as_tensor().to_vec1::<f32>().unwrap(), saved_w);
        settings.insert("batch_size".into(), 16.into());
        let err = load(&p, &vars2, &mut opt2, &settings)
            .unwrap_err()
            .to_string();
        assert!(err.contains("batch_size") && err.contains("16"), "{err}");
    }
}
