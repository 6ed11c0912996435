//! Exact top-k cosine search by blocked matrix products: queries against a corpus, one score
//! block at a time, the best `k` per query kept in a bounded heap. Used by mining and by the
//! round-trip filter.
use std::cmp::Ordering;
use std::collections::BinaryHeap;

use candle_core::{Device, Tensor};
use tokio_util::sync::CancellationToken;

use super::embed::EmbeddingMatrix;
use super::{Progress, ProgressSender};
use serde::{Deserialize, Serialize};

/// Exact-search errors.
#[derive(Debug, thiserror::Error)]
pub enum SearchError {
    /// A matrix product failed.
    #[error("similarity search failed: {0}")]
    Tensor(#[from] candle_core::Error),
    /// Inputs disagree in size.
    #[error("search inputs disagree: {what}")]
    Shape {
        /// Which sizes differ.
        what: String,
    },
    /// The search was cancelled.
    #[error("search cancelled")]
    Cancelled,
}

/// A candidate: corpus row and cosine score.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hit {
    /// Corpus row.
    pub index: usize,
    /// Cosine similarity.
    pub score: f32,
}

/// Orders hits best first: higher score, then lower index (deterministic on ties).
pub(crate) fn better(a: &Hit, b: &Hit) -> Ordering {
    b.score
        .total_cmp(&a.score)
        .then_with(|| a.index.cmp(&b.index))
}

struct HeapHit(Hit);
impl PartialEq for HeapHit {
    fn eq(&self, o: &Self) -> bool {
        better(&self.0, &o.0) == Ordering::Equal
    }
}
impl Eq for HeapHit {}
impl PartialOrd for HeapHit {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for HeapHit {
    // Max-heap on "worse", so the top is the worst hit kept.
    fn cmp(&self, o: &Self) -> Ordering {
        better(&self.0, &o.0)
    }
}

/// Block sizes of the exact search.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SearchBlocks {
    /// Query rows per block.
    pub query_block: usize,
    /// Corpus rows per block.
    pub corpus_block: usize,
}

impl Default for SearchBlocks {
    fn default() -> Self {
        Self {
            query_block: 256,
            corpus_block: 8192,
        }
    }
}

/// The `k` best corpus rows for every query row, best first, by blocked matrix products.
/// Blocking: call from a blocking thread.
pub fn exact_top_k(
    queries: &EmbeddingMatrix,
    corpus: &EmbeddingMatrix,
    k: usize,
    blocks: SearchBlocks,
    progress: Option<&ProgressSender>,
    cancel: &CancellationToken,
) -> Result<Vec<Vec<Hit>>, SearchError> {
    if queries.is_empty() || corpus.is_empty() || k == 0 {
        return Ok(vec![Vec::new(); queries.len()]);
    }
    if queries.dim() != corpus.dim() {
        return Err(SearchError::Shape {
            what: format!(
                "query width {} vs corpus width {}",
                queries.dim(),
                corpus.dim()
            ),
        });
    }
    let dim = corpus.dim();
    let k = k.min(corpus.len());
    let dev = Device::Cpu;
    let qb = blocks.query_block.max(1);
    let cb = blocks.corpus_block.max(1);
    let corpus_blocks: Vec<(usize, Tensor)> = (0..corpus.len())
        .step_by(cb)
        .map(|start| {
            let end = (start + cb).min(corpus.len());
            let t = Tensor::from_slice(corpus.rows(start, end), (end - start, dim), &dev)?
                .t()?
                .contiguous()?;
            Ok((start, t))
        })
        .collect::<Result<_, SearchError>>()?;
    let mut out = Vec::with_capacity(queries.len());
    for qs in (0..queries.len()).step_by(qb) {
        if cancel.is_cancelled() {
            return Err(SearchError::Cancelled);
        }
        let qe = (qs + qb).min(queries.len());
        let q = Tensor::from_slice(queries.rows(qs, qe), (qe - qs, dim), &dev)?;
        let mut heaps: Vec<BinaryHeap<HeapHit>> =
            (qs..qe).map(|_| BinaryHeap::with_capacity(k + 1)).collect();
        for (cstart, ct) in &corpus_blocks {
            let scores = q.matmul(ct)?;
            let width = scores.dim(1)?;
            let flat = scores.flatten_all()?.to_vec1::<f32>()?;
            for (r, heap) in heaps.iter_mut().enumerate() {
                for (c, &score) in flat[r * width..(r + 1) * width].iter().enumerate() {
                    let hit = Hit {
                        index: cstart + c,
                        score,
                    };
                    if heap.len() < k {
                        heap.push(HeapHit(hit));
                    } else if let Some(worst) = heap.peek() {
                        if better(&hit, &worst.0) == Ordering::Less {
                            heap.pop();
                            heap.push(HeapHit(hit));
                        }
                    }
                }
            }
        }
        for heap in heaps {
            let mut hits: Vec<Hit> = heap.into_iter().map(|h| h.0).collect();
            hits.sort_by(better);
            out.push(hits);
        }
        if let Some(tx) = progress {
            let _ = tx.send(Progress::new("search", qe as u64, queries.len() as u64));
        }
    }
    Ok(out)
}
