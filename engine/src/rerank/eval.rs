//! Evaluation on the task a reranker does: an embedder retrieves each query's top `depth`
//! documents, the cross-encoder reorders them. Metrics follow sentence-transformers'
//! `CrossEncoderRerankingEvaluator` with `always_rerank_positives=False` (a relevant document the
//! embedder did not retrieve cannot be reranked in; MRR@10 and NDCG@10 over the candidate list,
//! NDCG's ideal from the relevant candidates), plus Recall@{1,5,10} against all relevant
//! documents, as the retrieval evaluator defines it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::time::Instant;

use super::{CrossEncoder, RerankError};
use crate::eval::beir::BeirDataset;

pub use crate::eval::metrics::RerankMetrics;

/// Recall cut-offs reported.
pub const RECALL_AT: [usize; 3] = [1, 5, 10];

fn dcg(hits: impl Iterator<Item = bool>) -> f64 {
    hits.enumerate()
        .filter(|(_, h)| *h)
        .map(|(i, _)| 1.0 / ((i + 2) as f64).log2())
        .sum()
}

/// Metrics of ranked candidate lists (`rankings[i]` for `relevant[i]`).
pub fn metrics(
    name: &str,
    rankings: &[Vec<String>],
    relevant: &[&HashSet<String>],
    depth: usize,
    pairs_per_sec: Option<f64>,
) -> RerankMetrics {
    let n = rankings.len().max(1) as f64;
    let (mut mrr, mut ndcg) = (0.0, 0.0);
    let mut recall: BTreeMap<usize, f64> = RECALL_AT.iter().map(|&k| (k, 0.0)).collect();
    for (ranked, rel) in rankings.iter().zip(relevant) {
        let hits: Vec<bool> = ranked.iter().map(|d| rel.contains(d)).collect();
        let top10 = &hits[..hits.len().min(10)];
        mrr += top10
            .iter()
            .position(|h| *h)
            .map_or(0.0, |r| 1.0 / (r + 1) as f64);
        let in_list = hits.iter().filter(|h| **h).count();
        if in_list > 0 {
            let ideal = dcg((0..in_list.min(10)).map(|_| true));
            ndcg += dcg(top10.iter().copied()) / ideal;
        }
        for (&k, r) in recall.iter_mut() {
            let found = hits[..hits.len().min(k)].iter().filter(|h| **h).count();
            *r += found as f64 / rel.len().max(1) as f64;
        }
    }
    recall.values_mut().for_each(|v| *v /= n);
    RerankMetrics {
        name: name.into(),
        mrr_at_10: mrr / n,
        ndcg_at_10: ndcg / n,
        recall,
        queries: rankings.len(),
        depth,
        pairs_per_sec,
    }
}

/// First-stage results to rerank: each query id with its candidate document ids, best first.
pub type Candidates = [(String, Vec<String>)];

/// Reorders every query's candidates by the cross-encoder's logits (ties keep the first-stage
/// order). Returns the new rankings and the scoring speed in pairs per second.
pub fn rerank(
    model: &CrossEncoder,
    data: &BeirDataset,
    candidates: &Candidates,
    batch_size: usize,
) -> Result<(Vec<Vec<String>>, f64), RerankError> {
    let queries: HashMap<&str, &str> = data
        .queries
        .iter()
        .map(|(id, t)| (id.as_str(), t.as_str()))
        .collect();
    let docs: HashMap<&str, &str> = data
        .corpus
        .iter()
        .map(|(id, t)| (id.as_str(), t.as_str()))
        .collect();
    let mut pairs: Vec<(&str, &str)> = Vec::new();
    for (qid, cands) in candidates {
        let q = queries.get(qid.as_str()).copied().unwrap_or_default();
        pairs.extend(
            cands
                .iter()
                .map(|d| (q, docs.get(d.as_str()).copied().unwrap_or_default())),
        );
    }
    let t0 = Instant::now();
    let scores = model.predict(&pairs, batch_size)?;
    let rate = pairs.len() as f64 / t0.elapsed().as_secs_f64().max(1e-9);
    let mut offset = 0;
    let rankings = candidates
        .iter()
        .map(|(_, cands)| {
            let s = &scores[offset..offset + cands.len()];
            offset += cands.len();
            let mut order: Vec<usize> = (0..cands.len()).collect();
            order.sort_by(|&a, &b| s[b].total_cmp(&s[a]).then(a.cmp(&b)));
            order.into_iter().map(|i| cands[i].clone()).collect()
        })
        .collect();
    Ok((rankings, rate))
}

/// Relevant ids of each candidate query, in the same order.
pub fn relevant_sets<'a>(
    data: &'a BeirDataset,
    candidates: &Candidates,
) -> Vec<&'a HashSet<String>> {
    candidates.iter().map(|(q, _)| &data.qrels[q]).collect()
}

/// Evaluates the first stage alone and each named reranker on it.
pub fn evaluate_pipelines(
    data: &BeirDataset,
    candidates: &Candidates,
    rerankers: &[(&str, &CrossEncoder)],
    batch_size: usize,
) -> Result<Vec<RerankMetrics>, RerankError> {
    let relevant = relevant_sets(data, candidates);
    let depth = candidates.iter().map(|(_, c)| c.len()).max().unwrap_or(0);
    let first: Vec<Vec<String>> = candidates.iter().map(|(_, c)| c.clone()).collect();
    let mut out = vec![metrics("embedder", &first, &relevant, depth, None)];
    for (name, model) in rerankers {
        tracing::info!(
            reranker = name,
            queries = candidates.len(),
            depth,
            "reranking"
        );
        let (ranked, rate) = rerank(model, data, candidates, batch_size)?;
        out.push(metrics(
            &format!("embedder + {name}"),
            &ranked,
            &relevant,
            depth,
            Some(rate),
        ));
    }
    Ok(out)
}

/// Reads one figure of a pipeline's metrics.
type MetricOf = Box<dyn Fn(&RerankMetrics) -> f64>;

/// A table with one column per pipeline; columns after the first show the change against it.
pub fn format_table(results: &[RerankMetrics]) -> String {
    let mut s = String::new();
    let Some(first) = results.first() else {
        return s;
    };
    let _ = write!(s, "{:<12}", "metric");
    for r in results {
        let _ = write!(s, " | {:<28}", r.name);
    }
    s = s.trim_end().to_string();
    s.push('\n');
    let mut rows: Vec<(String, MetricOf)> = vec![
        ("MRR@10".into(), Box::new(|m| m.mrr_at_10)),
        ("NDCG@10".into(), Box::new(|m| m.ndcg_at_10)),
    ];
    for k in RECALL_AT {
        rows.push((format!("Recall@{k}"), Box::new(move |m| m.recall[&k])));
    }
    for (label, get) in &rows {
        let _ = write!(s, "{label:<12}");
        for (i, r) in results.iter().enumerate() {
            let cell = if i == 0 {
                format!("{:.4}", get(r))
            } else {
                format!("{:.4} ({:+.4})", get(r), get(r) - get(first))
            };
            let _ = write!(s, " | {cell:<28}");
        }
        s = s.trim_end().to_string();
        s.push('\n');
    }
    let _ = write!(s, "{:<12}", "pairs/s");
    for r in results {
        let cell = r
            .pairs_per_sec
            .map_or_else(|| "-".to_string(), |p| format!("{p:.1}"));
        let _ = write!(s, " | {cell:<28}");
    }
    s = s.trim_end().to_string();
    let _ = write!(
        s,
        "\n({} queries, top {} candidates from the embedder)",
        first.queries, first.depth
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(ids: &[&str]) -> HashSet<String> {
        ids.iter().map(|s| s.to_string()).collect()
    }

    fn ranking(ids: &[&str]) -> Vec<String> {
        ids.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn metrics_follow_the_reranking_evaluator() {
        let rel = [set(&["a"]), set(&["x", "y"]), set(&["z"])];
        let rankings = [
            ranking(&["b", "a", "c"]),
            ranking(&["y", "q", "x"]),
            ranking(&["b", "c"]),
        ];
        let refs: Vec<&HashSet<String>> = rel.iter().collect();
        let m = metrics("t", &rankings, &refs, 3, None);
        assert!((m.mrr_at_10 - (0.5 + 1.0 + 0.0) / 3.0).abs() < 1e-12);
        let ndcg1 = (1.0 / 3f64.log2()) / 1.0;
        let ndcg2 = (1.0 + 1.0 / 4f64.log2()) / (1.0 + 1.0 / 3f64.log2());
        assert!((m.ndcg_at_10 - (ndcg1 + ndcg2) / 3.0).abs() < 1e-12);
        assert!((m.recall[&1] - (0.0 + 0.5 + 0.0) / 3.0).abs() < 1e-12);
        assert!((m.recall[&5] - (1.0 + 1.0 + 0.0) / 3.0).abs() < 1e-12);
        let table = format_table(&[
            m.clone(),
            RerankMetrics {
                name: "u".into(),
                ..m
            },
        ]);
        assert!(
            table.contains("MRR@10") && table.contains("(+0.0000)"),
            "{table}"
        );
    }
}
