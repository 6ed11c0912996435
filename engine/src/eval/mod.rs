//! Retrieval evaluation of sentence encoders on BEIR-layout test sets, at every Matryoshka
//! dimension, with sentence-transformers' `InformationRetrievalEvaluator` definitions (cosine
//! similarity; embeddings truncated to each dimension and re-normalised).

pub mod beir;
pub mod compare;
pub mod metrics;
pub mod questions;

use std::collections::HashSet;
use std::fmt::Write as _;

use crate::embed::{EmbedError, SentenceEncoder};
use beir::BeirDataset;
pub use metrics::DimResult;
use metrics::{Cutoffs, IrMetrics};

/// Errors raised during evaluation.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// Embedding failed.
    #[error(transparent)]
    Embed(#[from] EmbedError),
    /// A dimension is larger than the model width.
    #[error("evaluation dimension {dim} exceeds the model's embedding width {width}")]
    BadDim {
        /// The dimension asked for.
        dim: usize,
        /// The model width.
        width: usize,
    },
}

fn unit(v: &[f32]) -> Vec<f32> {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    v.iter().map(|x| x / n).collect()
}

/// Ranks the corpus for every query at each dimension in `dims` and computes the metrics.
pub fn evaluate(
    encoder: &SentenceEncoder,
    data: &BeirDataset,
    dims: &[usize],
    batch_size: usize,
) -> Result<Vec<DimResult>, EvalError> {
    let width = encoder.dim();
    if let Some(&dim) = dims.iter().find(|&&d| d == 0 || d > width) {
        return Err(EvalError::BadDim { dim, width });
    }
    let queries: Vec<&(String, String)> = data
        .queries
        .iter()
        .filter(|(id, _)| data.qrels.get(id).is_some_and(|r| !r.is_empty()))
        .collect();
    let qtexts: Vec<&str> = queries.iter().map(|(_, t)| t.as_str()).collect();
    let ctexts: Vec<&str> = data.corpus.iter().map(|(_, t)| t.as_str()).collect();
    tracing::info!(
        queries = qtexts.len(),
        corpus = ctexts.len(),
        "encoding for evaluation"
    );
    let qe = encoder.encode(&qtexts, batch_size)?;
    let ce = encoder.encode(&ctexts, batch_size)?;
    let relevant: Vec<HashSet<String>> = queries
        .iter()
        .map(|(id, _)| data.qrels[id].clone())
        .collect();
    let cut = Cutoffs::default();
    let max_k = cut.max_k();
    let mut out = Vec::new();
    for &dim in dims {
        let qd: Vec<Vec<f32>> = qe.iter().map(|v| unit(&v[..dim])).collect();
        let cd: Vec<Vec<f32>> = ce.iter().map(|v| unit(&v[..dim])).collect();
        let rankings = top_k(&qd, &cd, max_k, data);
        out.push(DimResult {
            dim,
            metrics: metrics::compute(&rankings, &relevant, &cut),
        });
    }
    Ok(out)
}

/// Base vs fine-tuned at the widest dimension both were evaluated at (the model as ragd uses
/// it), with the paired bootstrap intervals and the verdict of [`compare`]; seeded, so the same
/// evaluations give the same interval.
pub fn compare_widest(base: &[DimResult], tuned: &[DimResult]) -> Option<compare::Comparison> {
    let t = tuned.iter().max_by_key(|r| r.dim)?;
    let b = base.iter().find(|r| r.dim == t.dim)?;
    compare::compare(&b.metrics, &t.metrics, 0x5eed)
}

/// Base vs fine-tuned at each dimension both were evaluated at, widest first, with the seed of
/// [`compare_widest`] (so the widest row is the headline). Needs the per-query values, which are
/// not serialised: compute it where the evaluations are made.
pub fn compare_per_dim(
    base: &[DimResult],
    tuned: &[DimResult],
) -> Vec<(usize, compare::Comparison)> {
    let mut rows: Vec<_> = tuned
        .iter()
        .filter_map(|t| {
            let b = base.iter().find(|b| b.dim == t.dim)?;
            Some((t.dim, compare::compare(&b.metrics, &t.metrics, 0x5eed)?))
        })
        .collect();
    rows.sort_by_key(|r| std::cmp::Reverse(r.0));
    rows
}

/// Each query's `k` best corpus ids by dot product of unit vectors (ties by corpus order).
fn top_k(
    queries: &[Vec<f32>],
    corpus: &[Vec<f32>],
    k: usize,
    data: &BeirDataset,
) -> Vec<Vec<String>> {
    queries
        .iter()
        .map(|q| {
            let mut scored: Vec<(f32, usize)> = corpus
                .iter()
                .enumerate()
                .map(|(i, c)| (q.iter().zip(c).map(|(a, b)| a * b).sum(), i))
                .collect();
            scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            scored
                .into_iter()
                .take(k)
                .map(|(_, i)| data.corpus[i].0.clone())
                .collect()
        })
        .collect()
}

/// The queries that have relevant documents, in file order, with each one's `depth` best corpus
/// ids by cosine similarity at the model's full width (first-stage retrieval for reranking).
pub fn retrieve(
    encoder: &SentenceEncoder,
    data: &BeirDataset,
    depth: usize,
    batch_size: usize,
) -> Result<Vec<(String, Vec<String>)>, EvalError> {
    let ids: Vec<&(String, String)> = data
        .queries
        .iter()
        .filter(|(id, _)| data.qrels.get(id).is_some_and(|r| !r.is_empty()))
        .collect();
    let qtexts: Vec<&str> = ids.iter().map(|(_, t)| t.as_str()).collect();
    let ctexts: Vec<&str> = data.corpus.iter().map(|(_, t)| t.as_str()).collect();
    let qe: Vec<Vec<f32>> = encoder
        .encode(&qtexts, batch_size)?
        .iter()
        .map(|v| unit(v))
        .collect();
    let ce: Vec<Vec<f32>> = encoder
        .encode(&ctexts, batch_size)?
        .iter()
        .map(|v| unit(v))
        .collect();
    let ranked = top_k(&qe, &ce, depth, data);
    Ok(ids.iter().map(|(id, _)| id.clone()).zip(ranked).collect())
}

/// Reads one figure from the metrics.
type MetricGetter = fn(&IrMetrics) -> f64;

/// Formats results as a table; with a baseline, each metric shows `base -> tuned (delta)`.
pub fn format_table(tuned: &[DimResult], baseline: Option<&[DimResult]>) -> String {
    let rows: [(&str, MetricGetter); 10] = [
        ("MRR@10", |m| m.mrr[&10]),
        ("NDCG@10", |m| m.ndcg[&10]),
        ("MAP@100", |m| m.map[&100]),
        ("Recall@1", |m| m.recall[&1]),
        ("Recall@5", |m| m.recall[&5]),
        ("Recall@10", |m| m.recall[&10]),
        ("Accuracy@1", |m| m.accuracy[&1]),
        ("Accuracy@3", |m| m.accuracy[&3]),
        ("Accuracy@5", |m| m.accuracy[&5]),
        ("Accuracy@10", |m| m.accuracy[&10]),
    ];
    let mut s = String::new();
    let mut header = format!("{:<12}", "metric");
    for r in tuned {
        let h = match baseline {
            Some(_) => format!("dim {}: base -> tuned", r.dim),
            None => format!("dim {}", r.dim),
        };
        let _ = write!(header, " | {h:<28}");
    }
    let _ = writeln!(s, "{}", header.trim_end());
    let _ = writeln!(s, "{}", "-".repeat(header.trim_end().len()));
    for (name, get) in rows {
        let mut line = format!("{name:<12}");
        for (i, r) in tuned.iter().enumerate() {
            let t = get(&r.metrics);
            let cell = match baseline.and_then(|b| b.get(i)) {
                Some(b) => {
                    let v = get(&b.metrics);
                    format!("{v:.4} -> {t:.4} ({:+.4})", t - v)
                }
                None => format!("{t:.4}"),
            };
            let _ = write!(line, " | {cell:<28}");
        }
        let _ = writeln!(s, "{}", line.trim_end());
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::tests::{tiny_encoder, toy_pairs};
    use std::collections::HashMap;

    fn toy_beir() -> BeirDataset {
        let pairs = toy_pairs();
        let mut d = BeirDataset {
            qrels: HashMap::new(),
            ..Default::default()
        };
        for (i, p) in pairs.iter().enumerate() {
            d.corpus.push((format!("d{i}"), p.positive.clone()));
            d.queries.push((format!("q{i}"), p.query.clone()));
            d.qrels
                .insert(format!("q{i}"), HashSet::from([format!("d{i}")]));
        }
        d
    }

    #[test]
    fn each_dimension_is_compared_widest_first() {
        let (_d, enc) = tiny_encoder();
        let (_d2, other) = tiny_encoder();
        let data = toy_beir();
        let base = evaluate(&enc, &data, &[16, 32], 16).unwrap();
        let tuned = evaluate(&other, &data, &[32, 16, 8], 16).unwrap();
        let rows = compare_per_dim(&base, &tuned);
        // Dimension 8 has no base evaluation: left out.
        assert_eq!(rows.iter().map(|r| r.0).collect::<Vec<_>>(), vec![32, 16]);
        assert_eq!(Some(&rows[0].1), compare_widest(&base, &tuned).as_ref());
        assert_eq!(rows[1].1.queries, data.queries.len());
    }

    #[test]
    fn evaluates_each_dim_and_agrees_with_direct_ranking() {
        let (_d, enc) = tiny_encoder();
        let data = toy_beir();
        let res = evaluate(&enc, &data, &[32, 16], 16).unwrap();
        assert_eq!(res.len(), 2);
        assert_eq!(res[0].metrics.queries, toy_pairs().len());
        // Accuracy@1 must equal the fraction of queries whose own document scores highest.
        let pairs = toy_pairs();
        let q: Vec<&str> = pairs.iter().map(|p| p.query.as_str()).collect();
        let d: Vec<&str> = pairs.iter().map(|p| p.positive.as_str()).collect();
        let (qe, de) = (enc.encode(&q, 64).unwrap(), enc.encode(&d, 64).unwrap());
        let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
        let top1 = qe
            .iter()
            .enumerate()
            .filter(|(i, qv)| de.iter().all(|dv| dot(qv, dv) <= dot(qv, &de[*i])))
            .count() as f64
            / pairs.len() as f64;
        assert!((res[0].metrics.accuracy[&1] - top1).abs() < 1e-9, "{top1}");
        assert!(res[0].metrics.recall[&10] >= res[0].metrics.recall[&1]);
        let table = format_table(&res, Some(&res));
        assert!(
            table.contains("MRR@10") && table.contains("dim 16: base -> tuned"),
            "{table}"
        );
        assert!(table.contains("(+0.0000)"));
        // A model against itself: a zero change, no measurable change.
        let same = compare_widest(&res, &res).expect("comparable");
        assert_eq!(same.verdict, compare::Verdict::NoMeasurableChange);
        assert_eq!((same.mrr_at_10.low, same.mrr_at_10.high), (0.0, 0.0));
        assert_eq!(same.queries, toy_pairs().len());
        let err = evaluate(&enc, &data, &[64], 16).unwrap_err().to_string();
        assert!(err.contains("64"), "{err}");
    }
}
