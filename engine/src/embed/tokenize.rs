//! Tokenisation with a Hugging Face `tokenizer.json`, padded to the longest text of each batch
//! and truncated to the model's maximum sequence length.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use tokenizers::{
    EncodeInput, PaddingParams, PaddingStrategy, Tokenizer, TruncationParams, TruncationStrategy,
};

/// Errors raised while loading a tokenizer or encoding texts.
#[derive(Debug, thiserror::Error)]
pub enum TokenizeError {
    /// `tokenizer.json` is absent.
    #[error("{path}: tokenizer.json is missing (export it with transformers' \
             AutoTokenizer.from_pretrained(..).save_pretrained(DIR), which writes the fast tokenizer)")]
    Missing {
        /// The expected file.
        path: PathBuf,
    },
    /// `tokenizer.json` could not be parsed.
    #[error("{path}: malformed tokenizer: {message}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// The tokenizers crate's message.
        message: String,
    },
    /// Encoding texts failed.
    #[error("tokenizing failed: {message}")]
    Encode {
        /// The tokenizers crate's message.
        message: String,
    },
    /// The tokenizer produces ids the model has no embeddings for.
    #[error(
        "{path}: the tokenizer does not match the model: it has {tokenizer_vocab} tokens but the \
         model's config.json has vocab_size {model_vocab}; use the tokenizer.json that was saved \
         with these weights"
    )]
    VocabMismatch {
        /// The tokenizer file.
        path: PathBuf,
        /// Tokens the tokenizer can produce (added tokens included).
        tokenizer_vocab: usize,
        /// Rows of the model's embedding table.
        model_vocab: usize,
    },
    /// Building the id tensors failed.
    #[error("building token tensors failed: {0}")]
    Candle(#[from] candle_core::Error),
}

/// Token ids, token types and attention mask of a batch, all (batch, seq).
#[derive(Debug, Clone)]
pub struct TokenBatch {
    /// Token ids (u32).
    pub input_ids: Tensor,
    /// Token type ids (u32).
    pub token_type_ids: Tensor,
    /// 1.0 for real tokens, 0.0 for padding (f32).
    pub attention_mask: Tensor,
}

/// A tokenizer configured for sentence embedding.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    path: PathBuf,
    max_len: usize,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("path", &self.path)
            .field("max_len", &self.max_len)
            .finish()
    }
}

impl TextTokenizer {
    /// Loads `tokenizer.json`, switching padding to longest-in-batch and truncation to `max_len`
    /// tokens (special tokens included), as sentence-transformers does.
    pub fn from_file(path: &Path, max_len: usize) -> Result<Self, TokenizeError> {
        if !path.exists() {
            return Err(TokenizeError::Missing {
                path: path.to_path_buf(),
            });
        }
        let inner = Tokenizer::from_file(path).map_err(|e| TokenizeError::Malformed {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let mut t = Self {
            inner,
            path: path.to_path_buf(),
            max_len,
        };
        t.set_max_len(max_len)?;
        Ok(t)
    }

    /// Changes the truncation length.
    pub fn set_max_len(&mut self, max_len: usize) -> Result<(), TokenizeError> {
        self.max_len = max_len;
        let pad = match self.inner.get_padding() {
            Some(p) => PaddingParams {
                strategy: PaddingStrategy::BatchLongest,
                ..p.clone()
            },
            None => PaddingParams {
                strategy: PaddingStrategy::BatchLongest,
                pad_id: self.inner.token_to_id("[PAD]").unwrap_or(0),
                ..PaddingParams::default()
            },
        };
        self.inner.with_padding(Some(pad));
        self.inner
            .with_truncation(Some(TruncationParams {
                max_length: max_len,
                strategy: TruncationStrategy::LongestFirst,
                ..TruncationParams::default()
            }))
            .map_err(|e| TokenizeError::Malformed {
                path: self.path.clone(),
                message: e.to_string(),
            })?;
        Ok(())
    }

    /// The truncation length.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// The wrapped Hugging Face tokenizer.
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }

    /// The file it was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Checks that every id the tokenizer can produce has a row in an embedding table of
    /// `model_vocab` rows (a tokenizer from another model would index out of range).
    pub fn check_vocab(&self, model_vocab: usize) -> Result<(), TokenizeError> {
        let tokenizer_vocab = self.inner.get_vocab_size(true);
        if tokenizer_vocab > model_vocab {
            return Err(TokenizeError::VocabMismatch {
                path: self.path.clone(),
                tokenizer_vocab,
                model_vocab,
            });
        }
        Ok(())
    }

    /// Tokenises `texts` into tensors on `device`.
    pub fn encode(&self, texts: &[&str], device: &Device) -> Result<TokenBatch, TokenizeError> {
        let inputs: Vec<EncodeInput<'_>> = texts.iter().map(|&t| t.into()).collect();
        self.encode_inputs(inputs, device)
    }

    /// Tokenises (query, passage) pairs as `[CLS] query [SEP] passage [SEP]` with token type 0
    /// for the query and 1 for the passage, truncating the longer side first (Hugging Face's
    /// `longest_first`, as sentence-transformers' CrossEncoder does).
    pub fn encode_pairs(
        &self,
        pairs: &[(&str, &str)],
        device: &Device,
    ) -> Result<TokenBatch, TokenizeError> {
        let inputs: Vec<EncodeInput<'_>> = pairs.iter().map(|&(a, b)| (a, b).into()).collect();
        self.encode_inputs(inputs, device)
    }

    fn encode_inputs(
        &self,
        inputs: Vec<EncodeInput<'_>>,
        device: &Device,
    ) -> Result<TokenBatch, TokenizeError> {
        let enc = self
            .inner
            .encode_batch(inputs, true)
            .map_err(|e| TokenizeError::Encode {
                message: e.to_string(),
            })?;
        let b = enc.len();
        let l = enc.iter().map(|e| e.get_ids().len()).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(b * l);
        let mut types = Vec::with_capacity(b * l);
        let mut mask = Vec::with_capacity(b * l);
        for e in &enc {
            ids.extend_from_slice(e.get_ids());
            types.extend_from_slice(e.get_type_ids());
            mask.extend(e.get_attention_mask().iter().map(|&m| m as f32));
        }
        Ok(TokenBatch {
            input_ids: Tensor::from_vec(ids, (b, l), device)?,
            token_type_ids: Tensor::from_vec(types, (b, l), device)?,
            attention_mask: Tensor::from_vec(mask, (b, l), device)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pads_to_longest_and_truncates() {
        let dir = tempfile::tempdir().unwrap();
        let texts = [
            "the cat sat on the mat",
            "a dog",
            "cats and dogs are friends",
        ];
        crate::embed::tiny::write_tiny_model(dir.path(), &texts, &Default::default()).unwrap();
        let t = TextTokenizer::from_file(&dir.path().join("tokenizer.json"), 5).unwrap();
        let b = t
            .encode(&["a dog", "the cat sat on the mat"], &Device::Cpu)
            .unwrap();
        assert_eq!(b.input_ids.dims(), &[2, 5]);
        let mask: Vec<Vec<f32>> = b.attention_mask.to_vec2().unwrap();
        assert_eq!(mask[0], vec![1., 1., 1., 1., 0.]);
        assert_eq!(mask[1], vec![1.; 5]);
        let ids: Vec<Vec<u32>> = b.input_ids.to_vec2().unwrap();
        let cls = t.inner().token_to_id("[CLS]").unwrap();
        let sep = t.inner().token_to_id("[SEP]").unwrap();
        assert_eq!((ids[1][0], ids[1][4]), (cls, sep));
    }

    #[test]
    fn pairs_get_token_types_and_truncate_the_longer_side() {
        let dir = tempfile::tempdir().unwrap();
        let texts = [
            "the cat sat on the mat",
            "a dog",
            "cats and dogs are friends",
        ];
        crate::embed::tiny::write_tiny_model(dir.path(), &texts, &Default::default()).unwrap();
        let t = TextTokenizer::from_file(&dir.path().join("tokenizer.json"), 9).unwrap();
        let b = t
            .encode_pairs(&[("a dog", "the cat sat on the mat")], &Device::Cpu)
            .unwrap();
        let types: Vec<Vec<u32>> = b.token_type_ids.to_vec2().unwrap();
        let ids: Vec<Vec<u32>> = b.input_ids.to_vec2().unwrap();
        let sep = t.inner().token_to_id("[SEP]").unwrap();
        // [CLS] a dog [SEP] + 4 passage tokens + [SEP]: the passage (6 words) lost two.
        assert_eq!(types[0], vec![0, 0, 0, 0, 1, 1, 1, 1, 1]);
        assert_eq!((ids[0][3], ids[0][8]), (sep, sep));
        t.check_vocab(t.inner().get_vocab_size(true)).unwrap();
        let err = t.check_vocab(5).unwrap_err().to_string();
        assert!(err.contains("does not match the model"), "{err}");
    }

    #[test]
    fn missing_and_malformed_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tokenizer.json");
        let err = TextTokenizer::from_file(&p, 8).unwrap_err().to_string();
        assert!(err.contains("tokenizer.json is missing"), "{err}");
        std::fs::write(&p, "{\"model\": 3}").unwrap();
        let err = TextTokenizer::from_file(&p, 8).unwrap_err().to_string();
        assert!(err.contains("malformed tokenizer"), "{err}");
    }
}
