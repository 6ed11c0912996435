//! sentence-transformers' cross-encoder losses on a score matrix (queries, candidates) whose
//! column 0 is each query's positive: BinaryCrossEntropyLoss, MultipleNegativesRankingLoss and
//! LambdaLoss (NDCG-Loss2++ weighting).

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::train::loss::log_sum_exp_rows;

/// Errors raised by the reranker losses.
#[derive(Debug, thiserror::Error)]
pub enum RerankLossError {
    /// The labels do not fit the score matrix.
    #[error("reranker loss: {message}")]
    Shape {
        /// What disagrees.
        message: String,
    },
    /// A tensor computation failed.
    #[error("reranker loss computation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

/// Which cross-encoder loss to train with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RerankLoss {
    /// `BCEWithLogitsLoss` on every (query, passage) pair, positives weighted by `pos_weight`
    /// (`None`: the number of hard negatives per positive, as sentence-transformers recommends).
    Bce {
        /// Weight of the positive class.
        pos_weight: Option<f64>,
    },
    /// Cross-entropy over `scale * sigmoid(logit)` of the positive, the hard negatives and
    /// `in_batch_negatives` passages drawn from the other queries of the batch.
    Mnrl {
        /// Multiplier of the activated scores (10 in sentence-transformers).
        scale: f64,
        /// Other queries' passages scored per query (4 in sentence-transformers).
        in_batch_negatives: usize,
    },
    /// LambdaLoss, listwise, with NDCG-Loss2++ weights (`mu * NDCG-Loss2 + LambdaRank`).
    Lambda {
        /// Only pairs touching the top `k` predicted ranks count (`None`: all).
        k: Option<usize>,
        /// Steepness of the pairwise logistic.
        sigma: f64,
        /// Weight of the NDCG-Loss2 term.
        mu: f64,
    },
}

impl RerankLoss {
    /// The loss named on the command line (`bce`, `mnrl`, `lambda`) with sentence-transformers'
    /// defaults.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "bce" => Some(Self::Bce { pos_weight: None }),
            "mnrl" => Some(Self::Mnrl {
                scale: 10.0,
                in_batch_negatives: 4,
            }),
            "lambda" => Some(Self::Lambda {
                k: None,
                sigma: 1.0,
                mu: 10.0,
            }),
            _ => None,
        }
    }

    /// In-batch negatives to score per query (MNRL only).
    pub fn in_batch_negatives(&self) -> usize {
        match self {
            Self::Mnrl {
                in_batch_negatives, ..
            } => *in_batch_negatives,
            _ => 0,
        }
    }

    /// The loss of a score matrix (queries, 1 + negatives) with the positive in column 0.
    pub fn compute(&self, logits: &Tensor) -> Result<Tensor, RerankLossError> {
        let (_, c) = logits.dims2()?;
        match self {
            Self::Bce { pos_weight } => {
                bce_first_positive(logits, pos_weight.unwrap_or((c - 1).max(1) as f64))
            }
            Self::Mnrl { scale, .. } => mnrl_first_positive(logits, *scale),
            Self::Lambda { k, sigma, mu } => {
                let rows = logits.dim(0)?;
                let mut labels = vec![vec![0f32; c]; rows];
                for row in &mut labels {
                    row[0] = 1.0;
                }
                lambda_loss(logits, &labels, *k, *sigma, *mu)
            }
        }
    }
}

/// `log(1 + e^x)`, stably: `relu(x) + log(1 + e^-|x|)`.
fn softplus(x: &Tensor) -> candle_core::Result<Tensor> {
    x.relu()? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?
}

/// BCEWithLogitsLoss (mean) with label 1 in column 0 and 0 elsewhere:
/// `pos_weight * y * softplus(-x) + (1 - y) * softplus(x)`.
pub fn bce_first_positive(logits: &Tensor, pos_weight: f64) -> Result<Tensor, RerankLossError> {
    let (r, c) = logits.dims2()?;
    let pos = (softplus(&logits.narrow(1, 0, 1)?.neg()?)? * pos_weight)?.sum_all()?;
    let neg = if c > 1 {
        softplus(&logits.narrow(1, 1, c - 1)?)?.sum_all()?
    } else {
        pos.zeros_like()?
    };
    Ok(((pos + neg)? / (r * c) as f64)?)
}

/// The cross-encoder MultipleNegativesRankingLoss: cross-entropy of `scale * sigmoid(x)` with
/// column 0 as the label.
pub fn mnrl_first_positive(logits: &Tensor, scale: f64) -> Result<Tensor, RerankLossError> {
    let z = ((logits.neg()?.exp()? + 1.0)?.recip()? * scale)?;
    let lse = log_sum_exp_rows(&z)?;
    Ok((lse - z.narrow(1, 0, 1)?)?.mean_all()?)
}

/// LambdaLoss with NDCG-Loss2++ weights, as sentence-transformers computes it (binary log,
/// pairs whose true label is higher in the predicted order, top-`k` mask). `labels[i][j]` is the
/// relevance of candidate `j` of query `i`. The weights depend on the current ranking and are
/// constants for the gradient.
pub fn lambda_loss(
    logits: &Tensor,
    labels: &[Vec<f32>],
    k: Option<usize>,
    sigma: f64,
    mu: f64,
) -> Result<Tensor, RerankLossError> {
    let (rows, n) = logits.dims2()?;
    if labels.len() != rows || labels.iter().any(|l| l.len() != n) {
        return Err(RerankLossError::Shape {
            message: format!("{rows}x{n} scores but labels of another shape"),
        });
    }
    let scores: Vec<Vec<f32>> = logits.detach().to_dtype(DType::F32)?.to_vec2()?;
    let k = k.unwrap_or(n).min(n);
    let discount: Vec<f64> = (0..n).map(|r| (2.0 + r as f64).log2()).collect();
    let mut weights = vec![0f32; rows * n * n];
    let mut count = 0usize;
    for (i, (s, y)) in scores.iter().zip(labels).enumerate() {
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| s[b].total_cmp(&s[a]));
        let t: Vec<f64> = order.iter().map(|&j| y[j] as f64).collect();
        let mut ideal: Vec<f64> = y.iter().map(|&v| v as f64).collect();
        ideal.sort_by(|a, b| b.total_cmp(a));
        let max_dcg = (0..k)
            .map(|r| (2f64.powf(ideal[r].max(0.0)) - 1.0) / discount[r])
            .sum::<f64>()
            .max(1e-10);
        let gain: Vec<f64> = t
            .iter()
            .map(|&v| (2f64.powf(v.max(0.0)) - 1.0) / max_dcg)
            .collect();
        for r in 0..n {
            for c in 0..n {
                if t[r] - t[c] <= 0.0 || (r >= k && c >= k) {
                    continue;
                }
                let d = r.abs_diff(c);
                let ndcg2 = (1.0 / (1.0 + d as f64).log2() - 1.0 / discount[d]).abs();
                let lambda_rank = (1.0 / discount[r] - 1.0 / discount[c]).abs();
                let w = (mu * ndcg2 + lambda_rank) * (gain[r] - gain[c]).abs();
                weights[(i * n + order[r]) * n + order[c]] = (w / std::f64::consts::LN_2) as f32;
                count += 1;
            }
        }
    }
    let w = Tensor::from_vec(weights, (rows, n, n), logits.device())?.to_dtype(logits.dtype())?;
    let diffs = (logits.unsqueeze(2)?.broadcast_sub(&logits.unsqueeze(1)?)? * sigma)?;
    // log(sigmoid(x)) = -softplus(-x)
    let losses = (softplus(&diffs.neg()?)? * w)?.sum_all()?;
    Ok((losses / count.max(1) as f64)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(rows: &[Vec<f32>]) -> Tensor {
        Tensor::new(rows.to_vec(), &Device::Cpu).unwrap()
    }

    fn sp(x: f64) -> f64 {
        (1.0 + x.exp()).ln()
    }

    #[test]
    fn bce_matches_its_definition() {
        let x = [vec![2.0f32, -1.0, 0.5], vec![-0.3, 0.7, -2.0]];
        let got = bce_first_positive(&t(&x), 2.0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        let mut want = 0.0;
        for row in &x {
            want += 2.0 * sp(-row[0] as f64);
            want += row[1..].iter().map(|&v| sp(v as f64)).sum::<f64>();
        }
        want /= 6.0;
        assert!((got - want).abs() < 1e-6, "{got} {want}");
    }

    #[test]
    fn mnrl_matches_its_definition() {
        let x = [vec![2.0f32, -1.0, 0.5], vec![-0.3, 0.7, -2.0]];
        let got = mnrl_first_positive(&t(&x), 10.0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        let sig = |v: f32| 1.0 / (1.0 + (-(v as f64)).exp());
        let want: f64 = x
            .iter()
            .map(|row| {
                let z: Vec<f64> = row.iter().map(|&v| 10.0 * sig(v)).collect();
                z.iter().map(|v| v.exp()).sum::<f64>().ln() - z[0]
            })
            .sum::<f64>()
            / 2.0;
        assert!((got - want).abs() < 1e-5, "{got} {want}");
    }

    /// LambdaLoss against a direct transcription of sentence-transformers' computation for one
    /// query with three documents (positive predicted second).
    #[test]
    fn lambda_matches_a_hand_computation() {
        let s = [0.2f64, 0.9, -0.4];
        let got = lambda_loss(
            &t(&[s.iter().map(|&v| v as f32).collect()]),
            &[vec![1.0, 0.0, 0.0]],
            None,
            1.0,
            10.0,
        )
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
        // Predicted order: doc1 (0.9), doc0 (0.2, relevant), doc2. True-by-pred = [0, 1, 0].
        let disc = |r: usize| (2.0 + r as f64).log2();
        let max_dcg = 1.0 / disc(0);
        let gain = [0.0, 1.0 / max_dcg, 0.0];
        // Pairs (r, c) with t[r] > t[c]: (1, 0) and (1, 2).
        let mut total = 0.0;
        for (c, diff) in [(0usize, s[0] - s[1]), (2, s[0] - s[2])] {
            let d = 1usize.abs_diff(c);
            let ndcg2 = (1.0 / (1.0 + d as f64).log2() - 1.0 / disc(d)).abs();
            let lr = (1.0 / disc(1) - 1.0 / disc(c)).abs();
            let w = (10.0 * ndcg2 + lr) * (gain[1] - gain[c]).abs();
            total += w * -sp(-diff) / std::f64::consts::LN_2;
        }
        let want = -total / 2.0;
        assert!((got - want).abs() < 1e-5, "{got} {want}");
    }

    #[test]
    fn losses_fall_when_the_positive_scores_higher() {
        for loss in ["bce", "mnrl", "lambda"] {
            let l = RerankLoss::from_name(loss).unwrap();
            let bad = l.compute(&t(&[vec![-1.0, 1.0, 0.5]])).unwrap();
            let good = l.compute(&t(&[vec![3.0, -1.0, -0.5]])).unwrap();
            let (bad, good) = (
                bad.to_scalar::<f32>().unwrap(),
                good.to_scalar::<f32>().unwrap(),
            );
            assert!(good < bad, "{loss}: {good} !< {bad}");
        }
    }
}
