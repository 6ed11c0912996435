//! Cross-encoder rerankers: a BERT encoder reading `[CLS] query [SEP] passage [SEP]`, the BERT
//! pooler and a `Linear(hidden -> 1)` head, loaded from a Hugging Face
//! `BertForSequenceClassification` directory or from a plain encoder that gets a new head.
//!
//! The encoder is the embedder's ([`crate::embed::model::Bert`]); training reuses the embedding
//! trainer's optimiser, schedule, checkpoints, LoRA and loop ([`train`]).

pub mod eval;
pub mod export;
pub mod head;
pub mod loss;
pub mod train;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};

use crate::embed::config::{BertConfig, ConfigError};
use crate::embed::model::{Bert, Dropout, ModelError};
use crate::embed::tokenize::{TextTokenizer, TokenBatch, TokenizeError};
use crate::embed::{hub, EmbedError};
use crate::rng::Rng;
pub use head::{Activation, HeadOrigin, RerankHead};

/// Errors raised while loading or running a cross-encoder.
#[derive(Debug, thiserror::Error)]
pub enum RerankError {
    /// A configuration file is missing or malformed.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The encoder weights cannot be loaded.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The tokenizer cannot be loaded, does not match, or failed.
    #[error(transparent)]
    Tokenize(#[from] TokenizeError),
    /// The hub id cannot be resolved, or another embedding-side failure.
    #[error(transparent)]
    Embed(#[from] EmbedError),
    /// The classification head cannot be used as a reranker head.
    #[error(transparent)]
    Head(#[from] head::HeadError),
    /// A tensor computation failed.
    #[error("reranker computation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

/// A cross-encoder reranker: encoder, pooler and one-logit head, with its tokenizer.
#[derive(Debug, Clone)]
pub struct CrossEncoder {
    bert: Bert,
    head: RerankHead,
    tokenizer: TextTokenizer,
    max_len: usize,
    dir: PathBuf,
}

impl CrossEncoder {
    /// Loads a reranker from a local directory or a Hugging Face hub id (cache first). An encoder
    /// without a classification head gets a new one drawn from `seed`.
    pub fn load(spec: &str, device: &Device, seed: u64) -> Result<Self, RerankError> {
        let dir = hub::resolve_model(spec).map_err(EmbedError::from)?;
        Self::load_dir(&dir, device, seed)
    }

    /// Loads a reranker directory (config.json, model.safetensors, tokenizer.json).
    pub fn load_dir(dir: &Path, device: &Device, seed: u64) -> Result<Self, RerankError> {
        let cfg = BertConfig::from_dir(dir)?;
        let weights = crate::embed::weights_file(dir)?;
        let max_len = max_length(dir, &cfg)?;
        let tokenizer = TextTokenizer::from_file(&dir.join("tokenizer.json"), max_len)?;
        tokenizer.check_vocab(cfg.vocab_size)?;
        let mut bert = Bert::load(&weights, &cfg, device)?;
        let head = RerankHead::from_model(dir, &mut bert, &mut Rng::new(seed ^ 0xC1A5))?;
        tracing::info!(dir = %dir.display(), params = bert.num_parameters(),
            head = ?head.origin(), max_len, "loaded cross-encoder");
        Ok(Self {
            bert,
            head,
            tokenizer,
            max_len,
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

    /// The pooler and classification head.
    pub fn head(&self) -> &RerankHead {
        &self.head
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.tokenizer
    }

    /// The directory the model was loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The device.
    pub fn device(&self) -> &Device {
        self.bert.device()
    }

    /// Maximum tokens per (query, passage) pair, special tokens included.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Changes the maximum pair length (capped at the model's learned positions).
    pub fn set_max_len(&mut self, n: usize) -> Result<(), RerankError> {
        let n = n.min(self.bert.config().max_position_embeddings);
        self.max_len = n;
        self.tokenizer.set_max_len(n)?;
        Ok(())
    }

    /// The variables the optimiser updates: the encoder's (its LoRA adapters when attached)
    /// followed by the head's. Head variables are named `pooler.*` / `classifier.*`.
    pub fn trainable_vars(&self) -> Vec<(String, Var)> {
        let lora = self.bert.linears().any(|l| l.lora.is_some());
        let mut vars = self.bert.trainable_vars();
        vars.extend(self.head.trainable_vars(lora));
        vars
    }

    /// Tokenises (query, passage) pairs onto the model's device.
    pub fn tokenize(&self, pairs: &[(&str, &str)]) -> Result<TokenBatch, RerankError> {
        Ok(self.tokenizer.encode_pairs(pairs, self.bert.device())?)
    }

    /// Differentiable logits, shape (batch), of a pair batch. Dropout is active when `drop`
    /// carries an RNG.
    pub fn logits(
        &self,
        batch: &TokenBatch,
        drop: &mut Dropout<'_>,
    ) -> Result<Tensor, RerankError> {
        Self::logits_with(&self.bert, &self.head, batch, drop)
    }

    fn logits_with(
        bert: &Bert,
        head: &RerankHead,
        batch: &TokenBatch,
        drop: &mut Dropout<'_>,
    ) -> Result<Tensor, RerankError> {
        let h = bert.forward(
            &batch.input_ids,
            &batch.token_type_ids,
            &batch.attention_mask,
            drop,
        )?;
        let cls = h.narrow(1, 0, 1)?.squeeze(1)?;
        Ok(head.forward(&cls, bert.config().hidden_dropout_prob, drop)?)
    }

    /// Logits of (query, passage) pairs in evaluation mode, `batch_size` pairs at a time (pairs
    /// sorted by length first); one logit per pair in input order. These are the values of
    /// sentence-transformers' `CrossEncoder.predict(pairs, activation_fn=Identity())`.
    pub fn predict(
        &self,
        pairs: &[(&str, &str)],
        batch_size: usize,
    ) -> Result<Vec<f32>, RerankError> {
        let mut order: Vec<usize> = (0..pairs.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(pairs[i].0.len() + pairs[i].1.len()));
        let mut out = vec![0f32; pairs.len()];
        let bert = self.bert.detached();
        let head = self.head.detached();
        for chunk in order.chunks(batch_size.max(1)) {
            let batch_pairs: Vec<(&str, &str)> = chunk.iter().map(|&i| pairs[i]).collect();
            let batch = self.tokenize(&batch_pairs)?;
            let logits: Vec<f32> = Self::logits_with(&bert, &head, &batch, &mut Dropout::off())?
                .to_dtype(DType::F32)?
                .to_vec1()?;
            for (&i, v) in chunk.iter().zip(logits) {
                out[i] = v;
            }
        }
        Ok(out)
    }

    /// Scores as sentence-transformers reports them: the model's activation (sigmoid unless the
    /// model says otherwise) applied to [`CrossEncoder::predict`]'s logits.
    pub fn score(
        &self,
        pairs: &[(&str, &str)],
        batch_size: usize,
    ) -> Result<Vec<f32>, RerankError> {
        let act = self.head.activation();
        Ok(self
            .predict(pairs, batch_size)?
            .into_iter()
            .map(|x| act.apply(x))
            .collect())
    }
}

/// The maximum pair length sentence-transformers uses for `dir`: `sentence_bert_config.json`'s
/// `max_seq_length`, else the tokenizer's `model_max_length`, else the learned positions.
fn max_length(dir: &Path, cfg: &BertConfig) -> Result<usize, RerankError> {
    #[derive(serde::Deserialize)]
    struct Sbert {
        max_seq_length: Option<usize>,
    }
    #[derive(serde::Deserialize)]
    struct TokCfg {
        model_max_length: Option<f64>,
    }
    let sbert = dir.join("sentence_bert_config.json");
    let tok = dir.join("tokenizer_config.json");
    let mut n = None;
    if sbert.exists() {
        let s: Sbert = crate::embed::config::read_json(&sbert, "")?;
        n = s.max_seq_length;
    }
    if n.is_none() && tok.exists() {
        let t: TokCfg = crate::embed::config::read_json(&tok, "")?;
        // transformers writes a huge sentinel when the tokenizer has no limit.
        n = t
            .model_max_length
            .filter(|&v| v > 0.0 && v < 1e6)
            .map(|v| v as usize);
    }
    Ok(n.unwrap_or(cfg.max_position_embeddings)
        .min(cfg.max_position_embeddings))
}

#[cfg(test)]
pub(crate) mod tests;
