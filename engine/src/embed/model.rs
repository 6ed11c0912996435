//! A BERT encoder written with differentiable Candle ops only.
//!
//! candle-transformers' `BertModel` uses fused layer-norm / softmax kernels without a backward
//! pass, so gradients silently never reach its weights (see `shared/notes/candle.md`). Every op
//! here (matmul, broadcast arithmetic, `index_select`, and the fused layer norm, GELU and attention
//! softmax of [`super::fused`]) has a backward.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};

use super::config::BertConfig;
use crate::rng::Rng;

/// Errors raised while loading or running the encoder.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The weights file cannot be read as safetensors.
    #[error("{path}: cannot read safetensors weights: {source}")]
    Safetensors {
        /// The weights file.
        path: PathBuf,
        /// Candle's error.
        source: candle_core::Error,
    },
    /// A tensor the architecture needs is absent from the weights file.
    #[error("{path}: tensor {name:?} is missing (is this a BERT-family encoder?)")]
    MissingTensor {
        /// The weights file.
        path: PathBuf,
        /// The missing tensor.
        name: String,
    },
    /// A tensor's shape disagrees with config.json.
    #[error("{path}: tensor {name:?} has shape {found:?} but config.json implies {expected:?}")]
    Shape {
        /// The weights file.
        path: PathBuf,
        /// The tensor.
        name: String,
        /// Shape in the file.
        found: Vec<usize>,
        /// Shape implied by the configuration.
        expected: Vec<usize>,
    },
    /// Writing a safetensors file failed.
    #[error("{path}: cannot write safetensors: {message}")]
    Write {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// A tensor computation failed.
    #[error("tensor computation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

/// Writes tensors to a safetensors file with the `{"format": "pt"}` metadata that transformers
/// expects.
pub fn save_safetensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<(), ModelError> {
    let contiguous: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(k, t)| Ok((k.clone(), t.to_device(&Device::Cpu)?.contiguous()?)))
        .collect::<candle_core::Result<_>>()?;
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(
        contiguous.iter().map(|(k, t)| (k.as_str(), t)),
        Some(meta),
        path,
    )
    .map_err(|e| ModelError::Write {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

pub use super::dropout::Dropout;

use super::fused::fused_for;
use super::fused_attention::TokenLayout;
use super::layers::{Layer, LayerNorm};
pub use super::layers::{Linear, LoraLayer};
use super::packing::Packing;

/// The BERT encoder: embeddings plus transformer layers, returning token states.
#[derive(Debug, Clone)]
pub struct Bert {
    cfg: BertConfig,
    prefix: String,
    vars: BTreeMap<String, Var>,
    extra: BTreeMap<String, Tensor>,
    word: Tensor,
    position: Tensor,
    token_type: Tensor,
    emb_norm: LayerNorm,
    layers: Vec<Layer>,
    device: Device,
}

/// Names and shapes of the trainable tensors of a BERT with configuration `cfg`.
pub fn expected_tensors(cfg: &BertConfig) -> Vec<(String, Vec<usize>)> {
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    let mut v = vec![
        (
            "embeddings.word_embeddings.weight".into(),
            vec![cfg.vocab_size, h],
        ),
        (
            "embeddings.position_embeddings.weight".into(),
            vec![cfg.max_position_embeddings, h],
        ),
        (
            "embeddings.token_type_embeddings.weight".into(),
            vec![cfg.type_vocab_size, h],
        ),
        ("embeddings.LayerNorm.weight".into(), vec![h]),
        ("embeddings.LayerNorm.bias".into(), vec![h]),
    ];
    for l in 0..cfg.num_hidden_layers {
        let p = format!("encoder.layer.{l}");
        for (m, shape) in [
            ("attention.self.query", vec![h, h]),
            ("attention.self.key", vec![h, h]),
            ("attention.self.value", vec![h, h]),
            ("attention.output.dense", vec![h, h]),
            ("intermediate.dense", vec![i, h]),
            ("output.dense", vec![h, i]),
        ] {
            v.push((format!("{p}.{m}.bias"), vec![shape[0]]));
            v.push((format!("{p}.{m}.weight"), shape));
        }
        for m in ["attention.output.LayerNorm", "output.LayerNorm"] {
            v.push((format!("{p}.{m}.weight"), vec![h]));
            v.push((format!("{p}.{m}.bias"), vec![h]));
        }
    }
    v
}

impl Bert {
    /// Loads weights from a safetensors file (names with or without a `bert.` prefix; old
    /// `LayerNorm.gamma/beta` names are accepted). Tensors the encoder does not use (pooler,
    /// `position_ids`) are kept untouched for export.
    pub fn load(path: &Path, cfg: &BertConfig, device: &Device) -> Result<Self, ModelError> {
        let mut file = candle_core::safetensors::load(path, device).map_err(|source| {
            ModelError::Safetensors {
                path: path.to_path_buf(),
                source,
            }
        })?;
        let prefix = if file.contains_key("bert.embeddings.word_embeddings.weight") {
            "bert."
        } else {
            ""
        };
        let mut vars = BTreeMap::new();
        for (name, shape) in expected_tensors(cfg) {
            let full = format!("{prefix}{name}");
            let legacy = full
                .replace("LayerNorm.weight", "LayerNorm.gamma")
                .replace("LayerNorm.bias", "LayerNorm.beta");
            let t = file
                .remove(&full)
                .or_else(|| file.remove(&legacy))
                .ok_or_else(|| ModelError::MissingTensor {
                    path: path.to_path_buf(),
                    name: full.clone(),
                })?;
            if t.dims() != shape.as_slice() {
                return Err(ModelError::Shape {
                    path: path.to_path_buf(),
                    name: full,
                    found: t.dims().to_vec(),
                    expected: shape,
                });
            }
            vars.insert(name, Var::from_tensor(&t.to_dtype(DType::F32)?)?);
        }
        let extra = file.into_iter().collect();
        Self::assemble(cfg.clone(), prefix.into(), vars, extra, device)
    }

    /// A randomly initialised encoder (normal(0, 0.02) weights, unit layer norms, zero biases),
    /// as transformers initialises BERT.
    pub fn random(cfg: &BertConfig, rng: &mut Rng, device: &Device) -> Result<Self, ModelError> {
        let mut vars = BTreeMap::new();
        for (name, shape) in expected_tensors(cfg) {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = if name.ends_with("LayerNorm.weight") {
                vec![1.0; n]
            } else if name.ends_with(".bias") {
                vec![0.0; n]
            } else {
                (0..n).map(|_| (rng.normal() * 0.02) as f32).collect()
            };
            let t = Tensor::from_vec(data, shape, device)?;
            vars.insert(name, Var::from_tensor(&t)?);
        }
        Self::assemble(cfg.clone(), String::new(), vars, BTreeMap::new(), device)
    }

    fn assemble(
        cfg: BertConfig,
        prefix: String,
        vars: BTreeMap<String, Var>,
        extra: BTreeMap<String, Tensor>,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let get = |n: &str| vars[n].as_tensor().clone();
        let linear = |m: String| Linear {
            weight: get(&format!("{m}.weight")),
            bias: get(&format!("{m}.bias")),
            module: m,
            lora: None,
        };
        let norm = |m: &str| LayerNorm {
            weight: get(&format!("{m}.weight")),
            bias: get(&format!("{m}.bias")),
            eps: cfg.layer_norm_eps,
        };
        let layers = (0..cfg.num_hidden_layers)
            .map(|l| {
                let p = format!("encoder.layer.{l}");
                Layer {
                    query: linear(format!("{p}.attention.self.query")),
                    key: linear(format!("{p}.attention.self.key")),
                    value: linear(format!("{p}.attention.self.value")),
                    attn_out: linear(format!("{p}.attention.output.dense")),
                    attn_norm: norm(&format!("{p}.attention.output.LayerNorm")),
                    inter: linear(format!("{p}.intermediate.dense")),
                    out: linear(format!("{p}.output.dense")),
                    out_norm: norm(&format!("{p}.output.LayerNorm")),
                    folded: None,
                }
            })
            .collect();
        Ok(Self {
            word: get("embeddings.word_embeddings.weight"),
            position: get("embeddings.position_embeddings.weight"),
            token_type: get("embeddings.token_type_embeddings.weight"),
            emb_norm: norm("embeddings.LayerNorm"),
            layers,
            cfg,
            prefix,
            vars,
            extra,
            device: device.clone(),
        })
    }

    /// Token states (batch, seq, hidden) for `input_ids` / `token_type_ids` (u32, batch x seq)
    /// and an attention mask of 1.0 / 0.0 (f32, batch x seq).
    pub fn forward(
        &self,
        input_ids: &Tensor,
        token_type_ids: &Tensor,
        attention_mask: &Tensor,
        drop: &mut Dropout<'_>,
    ) -> Result<Tensor, ModelError> {
        // On the CPU the encoder runs on the real tokens only (see `packing`); elsewhere on the
        // padded batch with a mask bias.
        let packed = fused_for(&self.word);
        Ok(self.forward_inner(input_ids, token_type_ids, attention_mask, drop, packed)?)
    }

    fn forward_inner(
        &self,
        ids: &Tensor,
        type_ids: &Tensor,
        mask: &Tensor,
        drop: &mut Dropout<'_>,
        packed: bool,
    ) -> candle_core::Result<Tensor> {
        let (b, l) = ids.dims2()?;
        let h = self.cfg.hidden_size;
        let nh = self.cfg.num_attention_heads;
        let hp = self.cfg.hidden_dropout_prob;
        let (x, layout) = if packed {
            let packing = Packing::from_mask(mask)?;
            let word = self.word.index_select(&packing.gather(ids)?, 0)?;
            let tt = self
                .token_type
                .index_select(&packing.gather(type_ids)?, 0)?;
            let pos = self
                .position
                .index_select(&packing.positions(ids.device())?, 0)?;
            (((word + tt)? + pos)?, TokenLayout::Packed(packing))
        } else {
            let word = self.word.index_select(&ids.flatten_all()?, 0)?;
            let tt = self.token_type.index_select(&type_ids.flatten_all()?, 0)?;
            let pos = self.position.narrow(0, 0, l)?;
            let x = (word + tt)?.reshape((b, l, h))?.broadcast_add(&pos)?;
            let bias = mask.to_dtype(x.dtype())?.affine(10000.0, -10000.0)?;
            (x, TokenLayout::Padded { bias })
        };
        let mut x = drop.apply(&self.emb_norm.forward(&x)?, hp)?;
        let p = (hp, self.cfg.attention_probs_dropout_prob);
        for layer in &self.layers {
            x = layer.forward(&x, &layout, nh, p, drop)?;
        }
        match layout {
            TokenLayout::Packed(packing) => packing.unpack(&x),
            TokenLayout::Padded { .. } => Ok(x),
        }
    }

    /// A view sharing the same weights but detached from autograd, so that inference records no
    /// graph (LoRA adapters stay attached as they are), with each layer's biases moved where
    /// they cost least (`layers::Layer::fold_biases`): the same outputs to float rounding.
    pub fn detached(&self) -> Self {
        let mut b = self.clone();
        let norm = |n: &mut LayerNorm| {
            n.weight = n.weight.detach();
            n.bias = n.bias.detach();
        };
        b.word = b.word.detach();
        b.position = b.position.detach();
        b.token_type = b.token_type.detach();
        norm(&mut b.emb_norm);
        for layer in &mut b.layers {
            norm(&mut layer.attn_norm);
            norm(&mut layer.out_norm);
        }
        for lin in b.linears_mut() {
            lin.weight = lin.weight.detach();
            lin.bias = lin.bias.detach();
        }
        for (i, layer) in b.layers.iter_mut().enumerate() {
            // A layer whose biases cannot be folded (a failed product) runs as written.
            layer.folded = layer.fold_biases().unwrap_or_else(|e| {
                tracing::warn!(layer = i, error = %e, "biases not folded; the layer runs as written");
                None
            });
        }
        b
    }

    /// The configuration.
    pub fn config(&self) -> &BertConfig {
        &self.cfg
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// All base weights by canonical name (no `bert.` prefix).
    pub fn base_vars(&self) -> &BTreeMap<String, Var> {
        &self.vars
    }

    /// The variables the optimiser updates: the LoRA adapters when any are attached, otherwise
    /// every base weight. Sorted by name.
    pub fn trainable_vars(&self) -> Vec<(String, Var)> {
        let lora: Vec<(String, Var)> = self
            .linears()
            .filter_map(|l| {
                l.lora.as_ref().map(|a| {
                    [
                        (format!("{}.lora_A.weight", l.module), a.a.clone()),
                        (format!("{}.lora_B.weight", l.module), a.b.clone()),
                    ]
                })
            })
            .flatten()
            .collect();
        if lora.is_empty() {
            self.vars
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        } else {
            lora
        }
    }

    /// Number of base parameters.
    pub fn num_parameters(&self) -> usize {
        self.vars.values().map(|v| v.elem_count()).sum()
    }

    /// Every linear layer, in model order.
    pub fn linears(&self) -> impl Iterator<Item = &Linear> {
        self.layers
            .iter()
            .flat_map(|l| [&l.query, &l.key, &l.value, &l.attn_out, &l.inter, &l.out])
    }

    /// Every linear layer, mutably (to attach or remove LoRA adapters).
    pub fn linears_mut(&mut self) -> impl Iterator<Item = &mut Linear> {
        self.layers.iter_mut().flat_map(|l| {
            [
                &mut l.query,
                &mut l.key,
                &mut l.value,
                &mut l.attn_out,
                &mut l.inter,
                &mut l.out,
            ]
        })
    }

    /// Removes and returns a tensor the encoder does not use: `name` under the file's `bert.`
    /// prefix (`pooler.dense.weight`), or else exactly `name` (`classifier.weight`).
    pub fn take_extra(&mut self, name: &str) -> Option<Tensor> {
        self.extra
            .remove(&format!("{}{name}", self.prefix))
            .or_else(|| self.extra.remove(name))
    }

    /// Tensors to write into `model.safetensors`, with the file's original names (prefix
    /// included), LoRA adapters merged into their base weights, and untouched extra tensors.
    pub fn export_tensors(&self) -> Result<Vec<(String, Tensor)>, ModelError> {
        self.export_tensors_prefixed(&self.prefix.clone())
    }

    /// As [`Bert::export_tensors`], with every encoder tensor (extras included) named under
    /// `prefix` instead of the file's own (`bert.` for a `BertForSequenceClassification`).
    pub fn export_tensors_prefixed(
        &self,
        prefix: &str,
    ) -> Result<Vec<(String, Tensor)>, ModelError> {
        let mut merged: BTreeMap<String, Tensor> = self
            .vars
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
            .collect();
        for l in self.linears() {
            if let Some(a) = &l.lora {
                let delta = (a.b.as_tensor().matmul(a.a.as_tensor())? * a.scale)?;
                let name = format!("{}.weight", l.module);
                let w = (&merged[&name] + delta)?;
                merged.insert(name, w);
            }
        }
        let mut out: Vec<(String, Tensor)> = merged
            .into_iter()
            .map(|(k, v)| (format!("{prefix}{k}"), v))
            .collect();
        out.extend(self.extra.iter().map(|(k, v)| {
            let bare = k.strip_prefix(self.prefix.as_str()).unwrap_or(k);
            (format!("{prefix}{bare}"), v.clone())
        }));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn tiny_cfg() -> BertConfig {
        serde_json::from_value(serde_json::json!({"vocab_size": 20, "hidden_size": 8,
            "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 16,
            "max_position_embeddings": 16}))
        .unwrap()
    }

    fn inputs(dev: &Device) -> (Tensor, Tensor, Tensor) {
        let ids = Tensor::new(&[[2u32, 5, 7, 3], [2, 9, 3, 0]], dev).unwrap();
        let tt = ids.zeros_like().unwrap();
        let mask = Tensor::new(&[[1f32, 1., 1., 1.], [1., 1., 1., 0.]], dev).unwrap();
        (ids, tt, mask)
    }

    #[test]
    fn padding_does_not_change_real_tokens() {
        let dev = Device::Cpu;
        let bert = Bert::random(&tiny_cfg(), &mut Rng::new(3), &dev).unwrap();
        let (ids, tt, mask) = inputs(&dev);
        let full = bert.forward(&ids, &tt, &mask, &mut Dropout::off()).unwrap();
        let ids2 = Tensor::new(&[[2u32, 9, 3]], &dev).unwrap();
        let short = bert
            .forward(
                &ids2,
                &ids2.zeros_like().unwrap(),
                &Tensor::ones((1, 3), DType::F32, &dev).unwrap(),
                &mut Dropout::off(),
            )
            .unwrap();
        let a = full.get(1).unwrap().narrow(0, 0, 3).unwrap();
        let diff = (a - short.get(0).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-5);
    }

    #[test]
    fn the_packed_encoder_matches_the_padded_one_with_gradients() {
        let dev = Device::Cpu;
        let bert = Bert::random(&tiny_cfg(), &mut Rng::new(4), &dev).unwrap();
        let (ids, tt, mask) = inputs(&dev);
        let w = crate::embed::fused::tests::random(&[2, 4, 8], &mut Rng::new(5), 1.0)
            .broadcast_mul(&mask.unsqueeze(2).unwrap())
            .unwrap();
        let run = |packed: bool| {
            let y = bert
                .forward_inner(&ids, &tt, &mask, &mut Dropout::off(), packed)
                .unwrap();
            let grads = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let g: Vec<Tensor> = bert
                .trainable_vars()
                .iter()
                .map(|(name, v)| {
                    let g = grads.get(v);
                    g.unwrap_or_else(|| panic!("{name} gets no gradient"))
                        .clone()
                })
                .collect();
            (y.broadcast_mul(&mask.unsqueeze(2).unwrap()).unwrap(), g)
        };
        let (y1, g1) = run(true);
        let (y2, g2) = run(false);
        let diff = |a: &Tensor, b: &Tensor| crate::embed::fused::tests::max_diff(a, b);
        assert!(diff(&y1, &y2) < 1e-5, "token states differ");
        for ((name, _), (a, b)) in bert.trainable_vars().iter().zip(g1.iter().zip(&g2)) {
            let d = diff(a, b);
            assert!(d < 1e-4, "gradient of {name} differs by {d}");
        }
    }

    #[test]
    fn folded_biases_give_the_states_of_the_layers_as_written() {
        let dev = Device::Cpu;
        let bert = Bert::random(&tiny_cfg(), &mut Rng::new(6), &dev).unwrap();
        // Every weight and bias random (a fresh model's biases are zero, which folds to zero).
        let mut rng = Rng::new(7);
        for (name, var) in bert.base_vars() {
            let scale = if name.contains("LayerNorm") { 0.2 } else { 0.5 };
            let noise = crate::embed::fused::tests::random(var.dims(), &mut rng, scale);
            let value = if name.ends_with("LayerNorm.weight") {
                (noise + 1.0).unwrap()
            } else {
                noise
            };
            var.set(&value).unwrap();
        }
        let inference = bert.detached();
        assert!(inference.layers.iter().all(|l| l.folded.is_some()));
        assert!(bert.layers.iter().all(|l| l.folded.is_none()));
        let (ids, tt, mask) = inputs(&dev);
        for packed in [true, false] {
            let run = |b: &Bert| {
                b.forward_inner(&ids, &tt, &mask, &mut Dropout::off(), packed)
                    .unwrap()
                    .broadcast_mul(&mask.unsqueeze(2).unwrap())
                    .unwrap()
            };
            let (written, folded) = (run(&bert), run(&inference));
            let d = crate::embed::fused::tests::max_diff(&written, &folded);
            assert!(d < 1e-5, "packed {packed}: folded states differ by {d}");
        }
    }

    #[test]
    fn missing_and_misshapen_tensors_are_named() {
        let dev = Device::Cpu;
        let dir = tempfile::tempdir().unwrap();
        let bert = Bert::random(&tiny_cfg(), &mut Rng::new(3), &dev).unwrap();
        let mut tensors: BTreeMap<String, Tensor> =
            bert.export_tensors().unwrap().into_iter().collect();
        tensors.remove("encoder.layer.1.output.dense.weight");
        let p = dir.path().join("model.safetensors");
        let list: Vec<(String, Tensor)> = tensors.into_iter().collect();
        save_safetensors(&p, &list).unwrap();
        let err = Bert::load(&p, &tiny_cfg(), &dev).unwrap_err().to_string();
        assert!(err.contains("encoder.layer.1.output.dense.weight"), "{err}");
        let mut cfg = tiny_cfg();
        cfg.num_hidden_layers = 1;
        cfg.vocab_size = 21;
        let err = Bert::load(&p, &cfg, &dev).unwrap_err().to_string();
        assert!(
            err.contains("word_embeddings") && err.contains("[21, 8]"),
            "{err}"
        );
        std::fs::write(&p, b"not safetensors").unwrap();
        let err = Bert::load(&p, &cfg, &dev).unwrap_err().to_string();
        assert!(err.contains("model.safetensors"), "{err}");
    }
}
