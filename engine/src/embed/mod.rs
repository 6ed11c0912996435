//! Sentence-embedding models: loading BERT-family encoders with their sentence-transformers
//! pipeline (pooling, normalisation, maximum length) and encoding texts.

pub mod config;
pub mod dropout;
// Raw row partitions for the thread pool and run-time AVX2 dispatch (each use has a SAFETY note).
#[allow(unsafe_code)]
pub(crate) mod fused;
#[allow(unsafe_code)]
pub(crate) mod fused_attention;
#[allow(unsafe_code)]
pub(crate) mod fused_linear;
#[allow(unsafe_code)]
pub(crate) mod fused_residual;
#[allow(unsafe_code)]
pub(crate) mod gemm;
pub mod hub;
#[allow(unsafe_code)]
pub(crate) mod kernels;
pub mod layers;
pub mod model;
pub(crate) mod packing;
pub mod pooling;
pub mod tiny;
pub mod tokenize;

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use config::{BertConfig, ConfigError, SentenceConfig};
use model::{Bert, Dropout, ModelError};
use tokenize::{TextTokenizer, TokenBatch, TokenizeError};

/// Errors raised while loading a model or computing embeddings.
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    /// A configuration file is missing or malformed.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The weights cannot be loaded or the forward pass failed.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The tokenizer cannot be loaded or failed.
    #[error(transparent)]
    Tokenize(#[from] TokenizeError),
    /// The hub id cannot be resolved.
    #[error(transparent)]
    Hub(#[from] hub::HubError),
    /// `model.safetensors` is absent.
    #[error(
        "{dir}: model.safetensors is missing; a model directory needs config.json, \
             model.safetensors and tokenizer.json"
    )]
    MissingWeights {
        /// The model directory.
        dir: PathBuf,
    },
    /// Only PyTorch pickle weights are present.
    #[error(
        "{dir}: only pytorch_model.bin is present; convert it to safetensors with: python -c \
             \"from transformers import AutoModel; m = AutoModel.from_pretrained('{dir}'); \
             m.save_pretrained('{dir}', safe_serialization=True)\""
    )]
    PytorchOnly {
        /// The model directory.
        dir: PathBuf,
    },
    /// Building the tiny test model failed.
    #[error("building tiny model: {message}")]
    TinyModel {
        /// What went wrong.
        message: String,
    },
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A tensor computation failed.
    #[error("tensor computation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

/// `DIR/model.safetensors`, or the error that says what to do when only PyTorch weights or none
/// are there.
pub fn weights_file(dir: &Path) -> Result<PathBuf, EmbedError> {
    let weights = dir.join("model.safetensors");
    if weights.exists() {
        return Ok(weights);
    }
    if dir.join("pytorch_model.bin").exists() {
        return Err(EmbedError::PytorchOnly {
            dir: dir.to_path_buf(),
        });
    }
    Err(EmbedError::MissingWeights {
        dir: dir.to_path_buf(),
    })
}

/// A sentence-embedding model: encoder, tokenizer and sentence-transformers pipeline.
#[derive(Debug, Clone)]
pub struct SentenceEncoder {
    bert: Bert,
    tokenizer: TextTokenizer,
    sentence: SentenceConfig,
    dir: PathBuf,
}

impl SentenceEncoder {
    /// Loads a model from a local directory or a Hugging Face hub id (cache first).
    pub fn load(spec: &str, device: &Device) -> Result<Self, EmbedError> {
        let dir = hub::resolve_model(spec)?;
        Self::load_dir(&dir, device)
    }

    /// Loads a model directory (config.json, model.safetensors, tokenizer.json and the optional
    /// sentence-transformers files).
    pub fn load_dir(dir: &Path, device: &Device) -> Result<Self, EmbedError> {
        let cfg = BertConfig::from_dir(dir)?;
        let sentence = SentenceConfig::from_dir(dir, &cfg)?;
        let weights = weights_file(dir)?;
        let tokenizer =
            TextTokenizer::from_file(&dir.join("tokenizer.json"), sentence.max_seq_length)?;
        tokenizer.check_vocab(cfg.vocab_size)?;
        let bert = Bert::load(&weights, &cfg, device)?;
        tracing::info!(dir = %dir.display(), params = bert.num_parameters(),
            pooling = ?sentence.pooling, normalize = sentence.normalize,
            max_seq_length = sentence.max_seq_length, "loaded sentence encoder");
        Ok(Self {
            bert,
            tokenizer,
            sentence,
            dir: dir.to_path_buf(),
        })
    }

    /// The encoder.
    pub fn bert(&self) -> &Bert {
        &self.bert
    }

    /// The encoder, mutably (to attach LoRA adapters).
    pub fn bert_mut(&mut self) -> &mut Bert {
        &mut self.bert
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.tokenizer
    }

    /// The sentence-transformers pipeline settings.
    pub fn sentence_config(&self) -> &SentenceConfig {
        &self.sentence
    }

    /// The directory the model was loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The device.
    pub fn device(&self) -> &Device {
        self.bert.device()
    }

    /// Embedding width.
    pub fn dim(&self) -> usize {
        self.bert.config().hidden_size
    }

    /// Changes the maximum sequence length (capped at the model's learned positions).
    pub fn set_max_seq_length(&mut self, n: usize) -> Result<(), EmbedError> {
        let n = n.min(self.bert.config().max_position_embeddings);
        self.sentence.max_seq_length = n;
        self.tokenizer.set_max_len(n)?;
        Ok(())
    }

    /// Tokenises texts onto the model's device.
    pub fn tokenize(&self, texts: &[&str]) -> Result<TokenBatch, EmbedError> {
        Ok(self.tokenizer.encode(texts, self.bert.device())?)
    }

    /// Differentiable sentence embeddings (batch, dim) of a token batch: encoder, pooling and,
    /// if the pipeline has it, normalisation. Dropout is active when `drop` carries an RNG.
    pub fn embed(&self, batch: &TokenBatch, drop: &mut Dropout<'_>) -> Result<Tensor, EmbedError> {
        self.embed_with(&self.bert, batch, drop)
    }

    fn embed_with(
        &self,
        bert: &Bert,
        batch: &TokenBatch,
        drop: &mut Dropout<'_>,
    ) -> Result<Tensor, EmbedError> {
        let h = bert.forward(
            &batch.input_ids,
            &batch.token_type_ids,
            &batch.attention_mask,
            drop,
        )?;
        let mut e = pooling::pool(&h, &batch.attention_mask, self.sentence.pooling)?;
        if self.sentence.normalize {
            e = pooling::normalize(&e)?;
        }
        Ok(e)
    }

    /// Embeds texts in evaluation mode, `batch_size` at a time (texts sorted by length first,
    /// as sentence-transformers does); returns one vector per text in input order.
    pub fn encode(&self, texts: &[&str], batch_size: usize) -> Result<Vec<Vec<f32>>, EmbedError> {
        let _memory = crate::alloc::ReuseFreedMemory::hold();
        let mut order: Vec<usize> = (0..texts.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(texts[i].len()));
        let mut out = vec![Vec::new(); texts.len()];
        let bert = self.bert.detached();
        for chunk in order.chunks(batch_size.max(1)) {
            let batch_texts: Vec<&str> = chunk.iter().map(|&i| texts[i]).collect();
            let batch = self.tokenize(&batch_texts)?;
            let e = self.embed_with(&bert, &batch, &mut Dropout::off())?;
            let rows: Vec<Vec<f32>> = e.to_dtype(candle_core::DType::F32)?.to_vec2()?;
            for (&i, row) in chunk.iter().zip(rows) {
                out[i] = row;
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny(dir: &Path) {
        let texts = tiny::sample_texts();
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        tiny::write_tiny_model(dir, &refs, &tiny::TinySpec::default()).unwrap();
    }

    #[test]
    fn encode_is_order_independent_of_batching() {
        let dir = tempfile::tempdir().unwrap();
        tiny(dir.path());
        let enc = SentenceEncoder::load_dir(dir.path(), &Device::Cpu).unwrap();
        let texts = [
            "the owl eats mice",
            "a fox",
            "where does the dog find worms near the lake?",
        ];
        let a = enc.encode(&texts, 1).unwrap();
        let b = enc.encode(&texts, 3).unwrap();
        for (x, y) in a.iter().zip(&b) {
            let d = x
                .iter()
                .zip(y)
                .map(|(p, q)| (p - q).abs())
                .fold(0f32, f32::max);
            assert!(d < 1e-5, "{d}");
        }
    }

    #[test]
    fn pytorch_only_and_missing_weights_are_explained() {
        let dir = tempfile::tempdir().unwrap();
        tiny(dir.path());
        std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
        let err = SentenceEncoder::load_dir(dir.path(), &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(err.contains("model.safetensors is missing"), "{err}");
        std::fs::write(dir.path().join("pytorch_model.bin"), b"x").unwrap();
        let err = SentenceEncoder::load_dir(dir.path(), &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(err.contains("safe_serialization=True"), "{err}");
    }

    #[test]
    fn max_seq_length_override_truncates() {
        let dir = tempfile::tempdir().unwrap();
        tiny(dir.path());
        let mut enc = SentenceEncoder::load_dir(dir.path(), &Device::Cpu).unwrap();
        enc.set_max_seq_length(4).unwrap();
        let b = enc.tokenize(&["the cat eats fish near the river"]).unwrap();
        assert_eq!(b.input_ids.dims(), &[1, 4]);
        enc.set_max_seq_length(10_000).unwrap();
        assert_eq!(enc.sentence_config().max_seq_length, 64);
    }
}
