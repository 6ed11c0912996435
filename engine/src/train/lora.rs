//! LoRA adapters (rank, alpha, dropout, target modules) on the encoder's linear layers, saved in
//! the PEFT layout (`adapter_config.json`, `adapter_model.safetensors` with
//! `base_model.model.<module>.lora_{A,B}.weight` names) and mergeable into full weights.

use std::path::{Path, PathBuf};

use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::embed::model::{save_safetensors, Bert, LoraLayer};
use crate::rng::Rng;

/// Errors raised while attaching, saving or loading adapters.
#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    /// No linear layer matches the target modules.
    #[error(
        "no linear layer matches LoRA target modules {targets:?} (BERT has query, key, value, \
             dense)"
    )]
    NoTarget {
        /// The targets given.
        targets: Vec<String>,
    },
    /// Rank zero.
    #[error("LoRA rank must be at least 1")]
    ZeroRank,
    /// A file operation failed.
    #[error("{path}: {message}")]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// A tensor computation failed.
    #[error("LoRA computation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

/// LoRA hyperparameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    /// Rank.
    pub r: usize,
    /// Scaling numerator (`scale = alpha / r`).
    pub alpha: f64,
    /// Dropout on the adapter input.
    pub dropout: f64,
    /// Module names to adapt (a linear matches when its path ends with one of them).
    pub target_modules: Vec<String>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            r: 8,
            alpha: 16.0,
            dropout: 0.1,
            target_modules: vec!["query".into(), "value".into()],
        }
    }
}

fn matches(module: &str, targets: &[String]) -> bool {
    targets
        .iter()
        .any(|t| module == t || module.ends_with(&format!(".{t}")))
}

/// Attaches fresh adapters to every matching linear (A: PEFT's Kaiming-uniform init, B: zeros,
/// so the model is unchanged until trained). Returns the number of adapted layers.
pub fn attach(bert: &mut Bert, cfg: &LoraConfig, rng: &mut Rng) -> Result<usize, LoraError> {
    if cfg.r == 0 {
        return Err(LoraError::ZeroRank);
    }
    let device = bert.device().clone();
    let mut n = 0;
    for lin in bert.linears_mut() {
        if !matches(&lin.module, &cfg.target_modules) {
            continue;
        }
        let (out, inp) = lin.weight.dims2()?;
        let bound = 1.0 / (inp as f64).sqrt();
        let a: Vec<f32> = (0..cfg.r * inp)
            .map(|_| ((rng.next_f64() * 2.0 - 1.0) * bound) as f32)
            .collect();
        lin.lora = Some(LoraLayer {
            a: Var::from_tensor(&Tensor::from_vec(a, (cfg.r, inp), &device)?)?,
            b: Var::zeros((out, cfg.r), candle_core::DType::F32, &device)?,
            scale: cfg.alpha / cfg.r as f64,
            dropout: cfg.dropout,
        });
        n += 1;
    }
    if n == 0 {
        return Err(LoraError::NoTarget {
            targets: cfg.target_modules.clone(),
        });
    }
    tracing::info!(layers = n, r = cfg.r, "attached LoRA adapters");
    Ok(n)
}

/// Merges adapters into their base weights (`W += scale * B A`) and removes them.
pub fn merge(bert: &mut Bert) -> Result<(), LoraError> {
    let mut updates = Vec::new();
    for lin in bert.linears_mut() {
        if let Some(l) = lin.lora.take() {
            let delta = (l.b.as_tensor().matmul(l.a.as_tensor())? * l.scale)?;
            updates.push((format!("{}.weight", lin.module), delta));
        }
    }
    for (name, delta) in updates {
        let var = &bert.base_vars()[&name];
        var.set(&(var.as_tensor() + delta)?)?;
    }
    Ok(())
}

/// Writes the adapters in the PEFT layout to `dir`.
pub fn save_adapter(
    bert: &Bert,
    cfg: &LoraConfig,
    base_model: &str,
    dir: &Path,
) -> Result<(), LoraError> {
    let file_err = |path: &Path, message: String| LoraError::File {
        path: path.to_path_buf(),
        message,
    };
    std::fs::create_dir_all(dir).map_err(|e| file_err(dir, e.to_string()))?;
    let tensors: Vec<(String, Tensor)> = bert
        .trainable_vars()
        .into_iter()
        .filter(|(n, _)| n.contains(".lora_"))
        .map(|(n, v)| (format!("base_model.model.{n}"), v.as_tensor().clone()))
        .collect();
    let wpath = dir.join("adapter_model.safetensors");
    save_safetensors(&wpath, &tensors).map_err(|e| file_err(&wpath, e.to_string()))?;
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "FEATURE_EXTRACTION",
        "base_model_name_or_path": base_model,
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": cfg.target_modules,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "modules_to_save": null,
        "init_lora_weights": true,
    });
    let cpath = dir.join("adapter_config.json");
    let text = serde_json::to_string_pretty(&config).expect("JSON values always serialise");
    std::fs::write(&cpath, text).map_err(|e| file_err(&cpath, e.to_string()))
}

/// Loads a PEFT adapter directory onto `bert` (attaching adapters first); returns its config.
pub fn load_adapter(bert: &mut Bert, dir: &Path) -> Result<LoraConfig, LoraError> {
    let cpath = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&cpath).map_err(|e| LoraError::File {
        path: cpath.clone(),
        message: e.to_string(),
    })?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| LoraError::File {
        path: cpath.clone(),
        message: format!("malformed JSON: {e}"),
    })?;
    let bad = |what: &str| LoraError::File {
        path: cpath.clone(),
        message: format!("missing or invalid {what}"),
    };
    let cfg = LoraConfig {
        r: v["r"].as_u64().ok_or_else(|| bad("r"))? as usize,
        alpha: v["lora_alpha"].as_f64().ok_or_else(|| bad("lora_alpha"))?,
        dropout: v["lora_dropout"].as_f64().unwrap_or(0.0),
        target_modules: serde_json::from_value(v["target_modules"].clone())
            .map_err(|_| bad("target_modules"))?,
    };
    attach(bert, &cfg, &mut Rng::new(0))?;
    let wpath = dir.join("adapter_model.safetensors");
    let tensors =
        candle_core::safetensors::load(&wpath, bert.device()).map_err(|e| LoraError::File {
            path: wpath.clone(),
            message: e.to_string(),
        })?;
    for (n, var) in bert.trainable_vars() {
        let key = format!("base_model.model.{n}");
        let t = tensors.get(&key).ok_or_else(|| LoraError::File {
            path: wpath.clone(),
            message: format!("tensor {key:?} is missing"),
        })?;
        var.set(t)?;
    }
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::embed::model::Dropout;
    use candle_core::Device;

    fn bert() -> Bert {
        let cfg = serde_json::from_value(serde_json::json!({"vocab_size": 20, "hidden_size": 8,
            "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 16,
            "max_position_embeddings": 16}))
        .unwrap();
        Bert::random(&cfg, &mut Rng::new(1), &Device::Cpu).unwrap()
    }

    fn run(b: &Bert) -> Vec<f32> {
        let ids = Tensor::new(&[[2u32, 5, 7, 3]], &Device::Cpu).unwrap();
        let mask = Tensor::ones((1, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
        b.forward(&ids, &ids.zeros_like().unwrap(), &mask, &mut Dropout::off())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    #[test]
    fn adapters_train_only_themselves_and_merge_exactly() {
        let mut b = bert();
        let before = run(&b);
        let n = attach(&mut b, &LoraConfig::default(), &mut Rng::new(2)).unwrap();
        assert_eq!(n, 4);
        assert_eq!(run(&b), before, "B = 0 leaves the model unchanged");
        let vars = b.trainable_vars();
        assert_eq!(vars.len(), 8);
        assert!(vars.iter().all(|(n, _)| n.contains(".lora_")));
        // Pretend training moved B.
        for (n, v) in &vars {
            if n.contains("lora_B") {
                v.set(&(v.as_tensor().ones_like().unwrap() * 0.05).unwrap())
                    .unwrap();
            }
        }
        let adapted = run(&b);
        assert_ne!(adapted, before);
        let dir = tempfile::tempdir().unwrap();
        save_adapter(&b, &LoraConfig::default(), "base", dir.path()).unwrap();
        let names = candle_core::safetensors::load(
            dir.path().join("adapter_model.safetensors"),
            &Device::Cpu,
        )
        .unwrap();
        assert!(names
            .contains_key("base_model.model.encoder.layer.0.attention.self.query.lora_A.weight"));
        let mut reloaded = bert();
        load_adapter(&mut reloaded, dir.path()).unwrap();
        assert_eq!(run(&reloaded), adapted);
        merge(&mut b).unwrap();
        assert!(b.linears().all(|l| l.lora.is_none()));
        let merged = run(&b);
        let d = merged
            .iter()
            .zip(&adapted)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(d < 1e-5, "{d}");
    }

    #[test]
    fn unknown_targets_are_refused() {
        let mut b = bert();
        let cfg = LoraConfig {
            target_modules: vec!["q_proj".into()],
            ..LoraConfig::default()
        };
        let err = attach(&mut b, &cfg, &mut Rng::new(1))
            .unwrap_err()
            .to_string();
        assert!(err.contains("q_proj"), "{err}");
    }
}
