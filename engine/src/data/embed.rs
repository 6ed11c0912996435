//! The [`Embedder`] trait the filters and the miner use, a dense embedding matrix, and
//! [`HashingEmbedder`], a deterministic lexical embedder.
//!
//! The base model (a BERT such as all-MiniLM-L6-v2, from the training engine) implements
//! [`Embedder`] for real runs. [`HashingEmbedder`] is a genuine but purely lexical embedding
//! (hashed bag of words and word bigrams): it needs no model, so tests and model-less runs use it;
//! it knows nothing of meaning, so it is no substitute for the base model in production.
use tokio_util::sync::CancellationToken;

use super::{Progress, ProgressSender};

/// Embedding errors.
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    /// The embedder failed.
    #[error("embedder failed: {message}")]
    Failed {
        /// What failed.
        message: String,
        /// The underlying error, if any.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    /// The embedder returned the wrong number of vectors.
    #[error("embedder returned {got} vectors for {expected} texts")]
    CountMismatch {
        /// Texts given.
        expected: usize,
        /// Vectors returned.
        got: usize,
    },
    /// Vectors of different widths.
    #[error("embedder returned a vector of {got} dimensions where {expected} were expected")]
    DimensionMismatch {
        /// Width expected.
        expected: usize,
        /// Width returned.
        got: usize,
    },
    /// The run was cancelled.
    #[error("embedding cancelled")]
    Cancelled,
}

/// Turns texts into vectors. Blocking (CPU work): call from a blocking thread.
pub trait Embedder: Send + Sync {
    /// Embeds a batch of texts; one vector per text, all of the same width.
    fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbedError>;
    /// A name for the manifest (model id or path).
    fn name(&self) -> String;
}

/// A sentence-transformers model (the base model of a run) as an [`Embedder`].
pub struct ModelEmbedder {
    encoder: crate::embed::SentenceEncoder,
    batch: usize,
    name: String,
}

impl ModelEmbedder {
    /// Wraps a loaded encoder; `name` goes to the manifest.
    pub fn new(encoder: crate::embed::SentenceEncoder, batch: usize, name: String) -> Self {
        Self {
            encoder,
            batch: batch.max(1),
            name,
        }
    }
}

impl Embedder for ModelEmbedder {
    fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        self.encoder
            .encode(&refs, self.batch)
            .map_err(|e| EmbedError::Failed {
                message: e.to_string(),
                source: Some(Box::new(e)),
            })
    }

    fn name(&self) -> String {
        self.name.clone()
    }
}

/// Row-major matrix of L2-normalised embeddings.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EmbeddingMatrix {
    dim: usize,
    data: Vec<f32>,
}

impl EmbeddingMatrix {
    /// Builds a matrix from rows, L2-normalising each (a zero row stays zero).
    pub fn from_rows(rows: Vec<Vec<f32>>) -> Result<Self, EmbedError> {
        let dim = rows.first().map_or(0, Vec::len);
        let mut data = Vec::with_capacity(dim * rows.len());
        for row in rows {
            if row.len() != dim {
                return Err(EmbedError::DimensionMismatch {
                    expected: dim,
                    got: row.len(),
                });
            }
            let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt();
            let scale = if norm > 0.0 { 1.0 / norm } else { 0.0 };
            data.extend(row.iter().map(|x| x * scale));
        }
        Ok(Self { dim, data })
    }

    /// Vector width.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.data.len().checked_div(self.dim).unwrap_or(0)
    }

    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Row `i`.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.dim..(i + 1) * self.dim]
    }

    /// All values, row-major.
    pub fn as_slice(&self) -> &[f32] {
        &self.data
    }

    /// Rows `start..end` as a slice.
    pub fn rows(&self, start: usize, end: usize) -> &[f32] {
        &self.data[start * self.dim..end * self.dim]
    }
}

/// Cosine similarity of two normalised rows.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Embeds `texts` in batches, reporting progress as `stage`. Blocking.
pub fn embed_all(
    embedder: &dyn Embedder,
    texts: &[String],
    batch_size: usize,
    stage: &'static str,
    progress: Option<&ProgressSender>,
    cancel: &CancellationToken,
) -> Result<EmbeddingMatrix, EmbedError> {
    // Batches of similar lengths pad little: longest first, as sentence-transformers does; the
    // rows go back to the texts' order.
    let _memory = crate::alloc::ReuseFreedMemory::hold();
    let mut order: Vec<usize> = (0..texts.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(texts[i].len()));
    let mut rows = vec![Vec::new(); texts.len()];
    let mut done = 0;
    for batch_ids in order.chunks(batch_size.max(1)) {
        if cancel.is_cancelled() {
            return Err(EmbedError::Cancelled);
        }
        let batch: Vec<String> = batch_ids.iter().map(|&i| texts[i].clone()).collect();
        let out = embedder.embed(&batch)?;
        if out.len() != batch.len() {
            return Err(EmbedError::CountMismatch {
                expected: batch.len(),
                got: out.len(),
            });
        }
        for (&i, row) in batch_ids.iter().zip(out) {
            rows[i] = row;
        }
        done += batch.len();
        if let Some(tx) = progress {
            let _ = tx.send(Progress::new(stage, done as u64, texts.len() as u64));
        }
    }
    EmbeddingMatrix::from_rows(rows)
}

/// A deterministic lexical embedder: lowercase alphanumeric words and word bigrams hashed
/// (blake3) into `dim` buckets with a sign bit, weighted `1 + ln(tf)`. See the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HashingEmbedder {
    dim: usize,
}

impl HashingEmbedder {
    /// An embedder of width `dim` (at least 1).
    pub fn new(dim: usize) -> Self {
        Self { dim: dim.max(1) }
    }

    fn bucket(&self, feature: &str) -> (usize, f32) {
        let h = blake3::hash(feature.as_bytes());
        let b = h.as_bytes();
        let v = u64::from_le_bytes(b[..8].try_into().unwrap_or([0; 8]));
        let sign = if b[8] & 1 == 0 { 1.0 } else { -1.0 };
        ((v % self.dim as u64) as usize, sign)
    }

    fn embed_one(&self, text: &str) -> Vec<f32> {
        let words = words(text);
        let mut counts = std::collections::HashMap::<String, u32>::new();
        for w in &words {
            *counts.entry(w.clone()).or_default() += 1;
        }
        for pair in words.windows(2) {
            *counts
                .entry(format!("{} {}", pair[0], pair[1]))
                .or_default() += 1;
        }
        let mut v = vec![0.0f32; self.dim];
        for (feature, tf) in counts {
            let (i, sign) = self.bucket(&feature);
            v[i] += sign * (1.0 + (tf as f32).ln());
        }
        v
    }
}

/// Lowercase alphanumeric words of a text.
pub fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

impl Embedder for HashingEmbedder {
    fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
        Ok(texts.iter().map(|t| self.embed_one(t)).collect())
    }

    fn name(&self) -> String {
        format!("hashing-bow-{}", self.dim)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashing_embedder_is_deterministic_and_lexical() {
        let e = HashingEmbedder::new(256);
        let texts: Vec<String> = [
            "How do I vacuum a table?",
            "VACUUM reclaims storage occupied by dead tuples in a table.",
            "The bash shell reads .bashrc at startup.",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let m = embed_all(&e, &texts, 2, "embed", None, &CancellationToken::new()).unwrap();
        assert_eq!((m.len(), m.dim()), (3, 256));
        assert!((dot(m.row(0), m.row(0)) - 1.0).abs() < 1e-5);
        assert!(dot(m.row(0), m.row(1)) > dot(m.row(0), m.row(2)));
        assert_eq!(
            m,
            embed_all(&e, &texts, 3, "embed", None, &CancellationToken::new()).unwrap()
        );
    }

    #[test]
    fn ragged_rows_are_refused() {
        let err = EmbeddingMatrix::from_rows(vec![vec![1.0, 0.0], vec![1.0]]).unwrap_err();
        assert!(matches!(
            err,
            EmbedError::DimensionMismatch {
                expected: 2,
                got: 1
            }
        ));
    }
}
