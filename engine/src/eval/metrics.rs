//! Information-retrieval metrics with the definitions of sentence-transformers'
//! `InformationRetrievalEvaluator`: binary relevance, per-query values averaged over the queries
//! that have at least one relevant document. The home of every metrics type a job reports:
//! [`IrMetrics`] and [`DimResult`] (retrieval), [`RerankMetrics`] (reranking, computed in
//! `rerank::eval`).

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};

/// Metrics of one model at one dimension.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DimResult {
    /// Embedding dimension.
    pub dim: usize,
    /// The metrics.
    pub metrics: IrMetrics,
}

/// Reranking metrics of one pipeline (embedder alone, or embedder + a reranker).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RerankMetrics {
    /// What produced the ranking (`embedder`, `embedder + base reranker`, ...).
    pub name: String,
    /// Mean reciprocal rank of the first relevant document in the top 10.
    pub mrr_at_10: f64,
    /// NDCG@10 over the candidate list.
    pub ndcg_at_10: f64,
    /// Recall at 1, 5 and 10.
    pub recall: BTreeMap<usize, f64>,
    /// Queries evaluated.
    pub queries: usize,
    /// Candidates per query (the retrieval depth).
    pub depth: usize,
    /// Reranking speed in (query, document) pairs per second (`None` for the embedder alone).
    pub pairs_per_sec: Option<f64>,
}

/// Cut-offs computed by default (sentence-transformers' defaults).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cutoffs {
    /// Accuracy@k.
    pub accuracy: Vec<usize>,
    /// Precision@k and Recall@k.
    pub precision_recall: Vec<usize>,
    /// MRR@k.
    pub mrr: Vec<usize>,
    /// NDCG@k.
    pub ndcg: Vec<usize>,
    /// MAP@k.
    pub map: Vec<usize>,
}

impl Default for Cutoffs {
    fn default() -> Self {
        Self {
            accuracy: vec![1, 3, 5, 10],
            precision_recall: vec![1, 3, 5, 10],
            mrr: vec![10],
            ndcg: vec![10],
            map: vec![100],
        }
    }
}

impl Cutoffs {
    /// Largest cut-off: how many ranked documents each query needs.
    pub fn max_k(&self) -> usize {
        [
            &self.accuracy,
            &self.precision_recall,
            &self.mrr,
            &self.ndcg,
            &self.map,
        ]
        .iter()
        .flat_map(|v| v.iter().copied())
        .max()
        .unwrap_or(10)
    }
}

/// Averaged metrics, keyed by cut-off.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct IrMetrics {
    /// Fraction of queries with a relevant document in the top k.
    pub accuracy: BTreeMap<usize, f64>,
    /// Relevant documents in the top k, divided by k.
    pub precision: BTreeMap<usize, f64>,
    /// Relevant documents in the top k, divided by the number of relevant documents.
    pub recall: BTreeMap<usize, f64>,
    /// Reciprocal rank of the first relevant document within the top k (else 0).
    pub mrr: BTreeMap<usize, f64>,
    /// Binary-gain NDCG within the top k.
    pub ndcg: BTreeMap<usize, f64>,
    /// Average precision within the top k, divided by min(k, number of relevant documents).
    pub map: BTreeMap<usize, f64>,
    /// Number of queries averaged.
    pub queries: usize,
    /// Each query's MRR@10 and NDCG@10, in query order, for paired comparisons
    /// ([`super::compare`]); not serialised (only the intervals computed from them are).
    #[serde(skip)]
    pub per_query: PerQuery,
}

/// Per-query values of the headline metrics (the queries averaged, in order).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PerQuery {
    /// Reciprocal rank of the first relevant document within the top 10 (else 0).
    pub mrr_at_10: Vec<f64>,
    /// Binary-gain NDCG@10.
    pub ndcg_at_10: Vec<f64>,
}

fn dcg(hits: impl Iterator<Item = bool>) -> f64 {
    hits.enumerate()
        .filter(|(_, h)| *h)
        .map(|(i, _)| 1.0 / ((i + 2) as f64).log2())
        .sum()
}

/// Computes metrics from each query's ranked document ids (best first, at least `max_k` long
/// or the whole corpus) and its relevant ids. Queries without relevant ids are skipped.
pub fn compute(rankings: &[Vec<String>], relevant: &[HashSet<String>], cut: &Cutoffs) -> IrMetrics {
    let mut m = IrMetrics::default();
    let mut n = 0usize;
    for (ranked, rel) in rankings.iter().zip(relevant) {
        if rel.is_empty() {
            continue;
        }
        n += 1;
        let hits: Vec<bool> = ranked.iter().map(|d| rel.contains(d)).collect();
        let top = |k: usize| &hits[..k.min(hits.len())];
        let rr10 = top(10)
            .iter()
            .position(|h| *h)
            .map_or(0.0, |r| 1.0 / (r + 1) as f64);
        m.per_query.mrr_at_10.push(rr10);
        let ideal10 = dcg((0..rel.len().min(10)).map(|_| true));
        m.per_query
            .ndcg_at_10
            .push(dcg(top(10).iter().copied()) / ideal10);
        for &k in &cut.accuracy {
            *m.accuracy.entry(k).or_default() += top(k).iter().any(|h| *h) as u8 as f64;
        }
        for &k in &cut.precision_recall {
            let c = top(k).iter().filter(|h| **h).count() as f64;
            *m.precision.entry(k).or_default() += c / k as f64;
            *m.recall.entry(k).or_default() += c / rel.len() as f64;
        }
        for &k in &cut.mrr {
            let rr = top(k)
                .iter()
                .position(|h| *h)
                .map_or(0.0, |r| 1.0 / (r + 1) as f64);
            *m.mrr.entry(k).or_default() += rr;
        }
        for &k in &cut.ndcg {
            let ideal = dcg((0..rel.len().min(k)).map(|_| true));
            *m.ndcg.entry(k).or_default() += dcg(top(k).iter().copied()) / ideal;
        }
        for &k in &cut.map {
            let mut correct = 0usize;
            let mut sum = 0.0;
            for (rank, h) in top(k).iter().enumerate() {
                if *h {
                    correct += 1;
                    sum += correct as f64 / (rank + 1) as f64;
                }
            }
            *m.map.entry(k).or_default() += sum / k.min(rel.len()) as f64;
        }
    }
    for map in [
        &mut m.accuracy,
        &mut m.precision,
        &mut m.recall,
        &mut m.mrr,
        &mut m.ndcg,
        &mut m.map,
    ] {
        for v in map.values_mut() {
            *v /= n.max(1) as f64;
        }
    }
    m.queries = n;
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }
    fn set(v: &[&str]) -> HashSet<String> {
        v.iter().map(|s| s.to_string()).collect()
    }
    fn close(a: f64, b: f64) {
        assert!((a - b).abs() < 1e-12, "{a} vs {b}");
    }

    #[test]
    fn single_query_hand_computed() {
        // Relevant docs at ranks 2 and 4 (1-based) out of 3 relevant docs.
        let cut = Cutoffs {
            accuracy: vec![1, 3],
            precision_recall: vec![1, 5],
            mrr: vec![1, 10],
            ndcg: vec![5],
            map: vec![5],
        };
        let m = compute(
            &[ids(&["a", "r1", "b", "r2", "c", "r3"])],
            &[set(&["r1", "r2", "r3"])],
            &cut,
        );
        close(m.accuracy[&1], 0.0);
        close(m.accuracy[&3], 1.0);
        close(m.precision[&1], 0.0);
        close(m.precision[&5], 2.0 / 5.0);
        close(m.recall[&5], 2.0 / 3.0);
        close(m.mrr[&1], 0.0);
        close(m.mrr[&10], 0.5);
        let dcg = 1.0 / 3f64.log2() + 1.0 / 5f64.log2();
        let idcg = 1.0 + 1.0 / 3f64.log2() + 1.0 / 4f64.log2();
        close(m.ndcg[&5], dcg / idcg);
        // AP@5 = (1/2 + 2/4) / min(5, 3)
        close(m.map[&5], (0.5 + 0.5) / 3.0);
    }

    #[test]
    fn averages_over_queries_and_skips_unjudged() {
        let cut = Cutoffs::default();
        let m = compute(
            &[ids(&["x", "y"]), ids(&["y", "x"]), ids(&["x"])],
            &[set(&["x"]), set(&["x"]), set(&[])],
            &cut,
        );
        assert_eq!(m.queries, 2);
        close(m.mrr[&10], (1.0 + 0.5) / 2.0);
        close(m.accuracy[&1], 0.5);
        close(m.recall[&10], 1.0);
        close(m.map[&100], (1.0 + 0.5) / 2.0);
        close(m.ndcg[&10], (1.0 + 1.0 / 3f64.log2()) / 2.0);
        assert_eq!(cut.max_k(), 100);
        assert_eq!(m.per_query.mrr_at_10, vec![1.0, 0.5]);
        close(m.per_query.ndcg_at_10[1], 1.0 / 3f64.log2());
    }
}
