//! The head of a `BertForSequenceClassification` reranker: the BERT pooler
//! (`tanh(W_p h_CLS + b_p)`), dropout, and `Linear(hidden -> 1)`.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use serde_json::Value;

use crate::embed::config::ConfigError;
use crate::embed::model::{Bert, Dropout};
use crate::rng::Rng;

/// Errors raised while reading or building the head.
#[derive(Debug, thiserror::Error)]
pub enum HeadError {
    /// The model has more (or fewer) than one output label.
    #[error(
        "{path}: the classification head has {num_labels} labels; a reranker needs exactly one \
         relevance logit (num_labels 1), as cross-encoder/ms-marco-* models have. Start from such a \
         model, or from a plain encoder, which gets a new one-logit head"
    )]
    Labels {
        /// The file that says so.
        path: PathBuf,
        /// Its number of labels.
        num_labels: usize,
    },
    /// config.json names a classification model but the weights hold no head.
    #[error(
        "{path}: config.json says {architecture} but the weights have no {missing}: the file is \
         incomplete or from another model; re-download it, or delete `architectures` from \
         config.json to load the encoder alone with a new head"
    )]
    MissingHead {
        /// The weights file.
        path: PathBuf,
        /// The architecture config.json names.
        architecture: String,
        /// The absent tensor.
        missing: String,
    },
    /// A head tensor has the wrong shape.
    #[error("{path}: tensor {name:?} has shape {found:?} but the model implies {expected:?}")]
    Shape {
        /// The weights file.
        path: PathBuf,
        /// The tensor.
        name: String,
        /// Shape in the file.
        found: Vec<usize>,
        /// Shape the hidden size implies.
        expected: Vec<usize>,
    },
    /// The model names an activation this engine does not implement.
    #[error(
        "{path}: activation {name:?} is not supported; use torch.nn.modules.activation.Sigmoid, \
         torch.nn.modules.activation.Tanh or torch.nn.modules.linear.Identity"
    )]
    Activation {
        /// The file naming it.
        path: PathBuf,
        /// The dotted name.
        name: String,
    },
    /// A configuration file is malformed.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A tensor computation failed.
    #[error("reranker head computation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

/// The activation sentence-transformers applies to the logit in `predict` / `rank`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `1 / (1 + e^-x)` (the default for one-label models).
    Sigmoid,
    /// The logit itself.
    Identity,
    /// `tanh(x)`.
    Tanh,
}

impl Activation {
    /// The dotted PyTorch name sentence-transformers stores.
    pub fn torch_name(self) -> &'static str {
        match self {
            Self::Sigmoid => "torch.nn.modules.activation.Sigmoid",
            Self::Identity => "torch.nn.modules.linear.Identity",
            Self::Tanh => "torch.nn.modules.activation.Tanh",
        }
    }

    fn parse(name: &str, path: &Path) -> Result<Self, HeadError> {
        match name.rsplit('.').next().unwrap_or("") {
            "Sigmoid" => Ok(Self::Sigmoid),
            "Identity" => Ok(Self::Identity),
            "Tanh" => Ok(Self::Tanh),
            _ => Err(HeadError::Activation {
                path: path.to_path_buf(),
                name: name.into(),
            }),
        }
    }

    /// Applies the activation to one logit.
    pub fn apply(self, x: f32) -> f32 {
        match self {
            Self::Sigmoid => 1.0 / (1.0 + (-x).exp()),
            Self::Identity => x,
            Self::Tanh => x.tanh(),
        }
    }
}

/// Where the head's weights came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadOrigin {
    /// A trained `BertForSequenceClassification` head.
    Loaded,
    /// A new classifier on an encoder's own pooler.
    NewClassifier,
    /// A new pooler and classifier (the encoder had neither).
    NewPoolerAndClassifier,
}

const POOLER_W: &str = "pooler.dense.weight";
const POOLER_B: &str = "pooler.dense.bias";
const CLS_W: &str = "classifier.weight";
const CLS_B: &str = "classifier.bias";

/// The pooler and the one-logit classifier.
#[derive(Debug, Clone)]
pub struct RerankHead {
    vars: Vec<(String, Var)>,
    detach: bool,
    origin: HeadOrigin,
    activation: Activation,
}

impl RerankHead {
    /// Takes the head out of a loaded encoder's unused tensors, or builds a new one as
    /// transformers initialises it (normal(0, 0.02) weights, zero biases) when the model has none.
    pub fn from_model(dir: &Path, bert: &mut Bert, rng: &mut Rng) -> Result<Self, HeadError> {
        let config_path = dir.join("config.json");
        let config: Value = crate::embed::config::read_json(&config_path, "")?;
        let architecture = config["architectures"]
            .as_array()
            .and_then(|a| a.iter().filter_map(Value::as_str).next())
            .unwrap_or("")
            .to_string();
        let classification = architecture.ends_with("ForSequenceClassification");
        let labels = config["id2label"]
            .as_object()
            .map(|m| m.len())
            .or_else(|| config["num_labels"].as_u64().map(|n| n as usize));
        if classification {
            // transformers' default when a classification config names no labels is 2.
            let n = labels.unwrap_or(2);
            if n != 1 {
                return Err(HeadError::Labels {
                    path: config_path,
                    num_labels: n,
                });
            }
        }
        let activation = activation(dir, &config)?;
        let h = bert.config().hidden_size;
        let weights = dir.join("model.safetensors");
        let device = bert.device().clone();
        let mut take = |name: &str, shape: &[usize]| -> Result<Option<Tensor>, HeadError> {
            let Some(t) = bert.take_extra(name) else {
                return Ok(None);
            };
            if name == CLS_W && t.dims().len() == 2 && t.dims()[0] != 1 {
                return Err(HeadError::Labels {
                    path: weights.clone(),
                    num_labels: t.dims()[0],
                });
            }
            if t.dims() != shape {
                return Err(HeadError::Shape {
                    path: weights.clone(),
                    name: name.into(),
                    found: t.dims().to_vec(),
                    expected: shape.to_vec(),
                });
            }
            Ok(Some(t.to_dtype(DType::F32)?))
        };
        let found = [
            take(POOLER_W, &[h, h])?,
            take(POOLER_B, &[h])?,
            take(CLS_W, &[1, h])?,
            take(CLS_B, &[1])?,
        ];
        let names = [POOLER_W, POOLER_B, CLS_W, CLS_B];
        let (pw, pb, cw, cb, origin) = match found {
            [Some(pw), Some(pb), Some(cw), Some(cb)] => (pw, pb, cw, cb, HeadOrigin::Loaded),
            ref f if classification => {
                let i = f.iter().position(Option::is_none).unwrap_or(2);
                return Err(HeadError::MissingHead {
                    path: weights.clone(),
                    architecture,
                    missing: names[i].into(),
                });
            }
            [Some(pw), Some(pb), _, _] => {
                let (cw, cb) = new_linear(1, h, rng, &device)?;
                (pw, pb, cw, cb, HeadOrigin::NewClassifier)
            }
            _ => {
                let (pw, pb) = new_linear(h, h, rng, &device)?;
                let (cw, cb) = new_linear(1, h, rng, &device)?;
                (pw, pb, cw, cb, HeadOrigin::NewPoolerAndClassifier)
            }
        };
        let vars = [(POOLER_W, pw), (POOLER_B, pb), (CLS_W, cw), (CLS_B, cb)]
            .into_iter()
            .map(|(n, t)| Ok((n.to_string(), Var::from_tensor(&t)?)))
            .collect::<Result<_, candle_core::Error>>()?;
        Ok(Self {
            vars,
            detach: false,
            origin,
            activation,
        })
    }

    /// Where the weights came from.
    pub fn origin(&self) -> HeadOrigin {
        self.origin
    }

    /// The activation `predict` scores get.
    pub fn activation(&self) -> Activation {
        self.activation
    }

    fn tensor(&self, i: usize) -> Tensor {
        let t = self.vars[i].1.as_tensor();
        if self.detach {
            t.detach()
        } else {
            t.clone()
        }
    }

    /// A copy whose forward pass records no graph.
    pub fn detached(&self) -> Self {
        Self {
            detach: true,
            ..self.clone()
        }
    }

    /// Logits (batch) from the `[CLS]` states (batch, hidden).
    pub fn forward(
        &self,
        cls: &Tensor,
        dropout: f64,
        drop: &mut Dropout<'_>,
    ) -> Result<Tensor, HeadError> {
        let pooled = cls
            .matmul(&self.tensor(0).t()?)?
            .broadcast_add(&self.tensor(1))?
            .tanh()?;
        let pooled = drop.apply(&pooled, dropout)?;
        let logits = pooled
            .matmul(&self.tensor(2).t()?)?
            .broadcast_add(&self.tensor(3))?;
        Ok(logits.squeeze(1)?)
    }

    /// The head's variables to train: all four, or with LoRA on the encoder only the classifier
    /// (and a pooler that is new), as PEFT's `modules_to_save` does for classification.
    pub fn trainable_vars(&self, lora: bool) -> Vec<(String, Var)> {
        let new_pooler = self.origin == HeadOrigin::NewPoolerAndClassifier;
        self.vars
            .iter()
            .filter(|(n, _)| !lora || n.starts_with("classifier") || new_pooler)
            .cloned()
            .collect()
    }

    /// Tensors for a `BertForSequenceClassification` `model.safetensors`.
    pub fn export_tensors(&self) -> Vec<(String, Tensor)> {
        self.vars
            .iter()
            .map(|(n, v)| {
                let name = if n.starts_with("pooler") {
                    format!("bert.{n}")
                } else {
                    n.clone()
                };
                (name, v.as_tensor().detach())
            })
            .collect()
    }
}

fn new_linear(
    out: usize,
    inp: usize,
    rng: &mut Rng,
    device: &Device,
) -> candle_core::Result<(Tensor, Tensor)> {
    let w: Vec<f32> = (0..out * inp)
        .map(|_| (rng.normal() * 0.02) as f32)
        .collect();
    Ok((
        Tensor::from_vec(w, (out, inp), device)?,
        Tensor::zeros(out, DType::F32, device)?,
    ))
}

/// The activation named by config.json's `sentence_transformers.activation_fn` (v4+), its
/// older `sbert_ce_default_activation_function`, or `config_sentence_transformers.json`; sigmoid
/// (sentence-transformers' default for one label) when none does.
fn activation(dir: &Path, config: &Value) -> Result<Activation, HeadError> {
    let config_path = dir.join("config.json");
    let named = config["sentence_transformers"]["activation_fn"]
        .as_str()
        .or_else(|| config["sbert_ce_default_activation_function"].as_str());
    if let Some(name) = named {
        return Activation::parse(name, &config_path);
    }
    let st_path = dir.join("config_sentence_transformers.json");
    if st_path.exists() {
        let st: Value = crate::embed::config::read_json(&st_path, "")?;
        if let Some(name) = st["activation_fn"].as_str() {
            return Activation::parse(name, &st_path);
        }
    }
    Ok(Activation::Sigmoid)
}
