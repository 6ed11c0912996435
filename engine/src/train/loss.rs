//! Losses on sentence embeddings: MultipleNegativesRankingLoss (in-batch plus hard negatives)
//! and MatryoshkaLoss over truncated dimensions, with sentence-transformers' definitions.

use candle_core::{DType, Tensor, D};

/// Errors raised while configuring or computing a loss.
#[derive(Debug, thiserror::Error)]
pub enum LossError {
    /// A Matryoshka dimension exceeds the model width or is zero.
    #[error("Matryoshka dimension {dim} is not in 1..={width} (the model's embedding width)")]
    BadDim {
        /// The dimension asked for.
        dim: usize,
        /// The model's width.
        width: usize,
    },
    /// Matryoshka weights and dims differ in length.
    #[error("{weights} Matryoshka weights given for {dims} dimensions")]
    WeightCount {
        /// Number of weights.
        weights: usize,
        /// Number of dims.
        dims: usize,
    },
    /// A tensor computation failed.
    #[error("loss computation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

/// sentence-transformers' default Matryoshka dimensions.
pub const DEFAULT_MATRYOSHKA_DIMS: [usize; 4] = [384, 256, 128, 64];

/// Resolves Matryoshka dimensions: the defaults are cut to the model width (and the width itself
/// is added when it is not among them); explicitly requested dims above the width are an error.
/// Returned largest first.
pub fn matryoshka_dims(requested: Option<&[usize]>, width: usize) -> Result<Vec<usize>, LossError> {
    let mut dims: Vec<usize> = match requested {
        Some(r) => {
            if let Some(&dim) = r.iter().find(|&&d| d == 0 || d > width) {
                return Err(LossError::BadDim { dim, width });
            }
            r.to_vec()
        }
        None => {
            let mut d: Vec<usize> = DEFAULT_MATRYOSHKA_DIMS
                .iter()
                .copied()
                .filter(|&d| d <= width)
                .collect();
            if !d.contains(&width) {
                d.push(width);
            }
            d
        }
    };
    dims.sort_unstable_by(|a, b| b.cmp(a));
    dims.dedup();
    Ok(dims)
}

/// The loss applied to a batch of anchor and candidate embeddings.
#[derive(Debug, Clone, PartialEq)]
pub struct LossSpec {
    /// Similarity scale (sentence-transformers' default 20).
    pub scale: f64,
    /// Matryoshka dimensions with weights; empty for plain MNRL at full width.
    pub matryoshka: Vec<(usize, f64)>,
    /// Both ways (MultipleNegativesSymmetricRankingLoss): the mean of MNRL and of each positive
    /// choosing its anchor among the batch's anchors.
    pub symmetric: bool,
}

impl Default for LossSpec {
    fn default() -> Self {
        Self {
            scale: 20.0,
            matryoshka: Vec::new(),
            symmetric: false,
        }
    }
}

impl LossSpec {
    /// MNRL inside MatryoshkaLoss over `dims` with `weights` (all 1 when `None`).
    pub fn matryoshka(
        scale: f64,
        dims: &[usize],
        weights: Option<&[f64]>,
    ) -> Result<Self, LossError> {
        let weights = match weights {
            Some(w) if w.len() != dims.len() => {
                return Err(LossError::WeightCount {
                    weights: w.len(),
                    dims: dims.len(),
                })
            }
            Some(w) => w.to_vec(),
            None => vec![1.0; dims.len()],
        };
        Ok(Self {
            scale,
            matryoshka: dims.iter().copied().zip(weights).collect(),
            symmetric: false,
        })
    }

    /// Computes the loss for anchors (B, d) against candidates (B * (1 + negatives), d) laid
    /// out as all positives, then each column of negatives; `mask` (B, B * (1 + negatives)) is
    /// added to the scaled scores (see [`super::guide`]).
    pub fn compute(
        &self,
        anchors: &Tensor,
        candidates: &Tensor,
        mask: Option<&Tensor>,
    ) -> Result<Tensor, LossError> {
        if self.matryoshka.is_empty() {
            return self.at_width(anchors, candidates, mask);
        }
        let mut total: Option<Tensor> = None;
        for &(dim, w) in &self.matryoshka {
            let a = anchors.narrow(D::Minus1, 0, dim)?;
            let c = candidates.narrow(D::Minus1, 0, dim)?;
            let l = (self.at_width(&a, &c, mask)? * w)?;
            total = Some(match total {
                Some(t) => (t + l)?,
                None => l,
            });
        }
        Ok(total.expect("matryoshka is not empty"))
    }

    /// MNRL at the embeddings' width, both ways when `symmetric` (the mask's anchor-positive
    /// block, transposed, masks the way back).
    fn at_width(
        &self,
        anchors: &Tensor,
        candidates: &Tensor,
        mask: Option<&Tensor>,
    ) -> Result<Tensor, LossError> {
        let forward = mnrl(anchors, candidates, self.scale, mask)?;
        if !self.symmetric {
            return Ok(forward);
        }
        let b = anchors.dim(0)?;
        let positives = candidates.narrow(0, 0, b)?;
        let back_mask = mask.map(|m| m.narrow(1, 0, b)?.t()).transpose()?;
        let backward = mnrl(&positives, anchors, self.scale, back_mask.as_ref())?;
        Ok(((forward + backward)? * 0.5)?)
    }
}

/// Cosine similarity matrix (rows of `a` against rows of `b`).
pub fn cos_sim(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    let n = |x: &Tensor| -> candle_core::Result<Tensor> {
        let norm = x
            .sqr()?
            .sum_keepdim(D::Minus1)?
            .sqrt()?
            .clamp(1e-12, f64::MAX)?;
        x.broadcast_div(&norm)
    };
    n(a)?.matmul(&n(b)?.t()?)
}

/// MultipleNegativesRankingLoss: cross-entropy of `scale * cos_sim(anchor_i, candidates)` with
/// candidate `i` (its positive) as the label; the other positives and all negatives are negatives.
/// `mask`, when given, is added to the scaled scores (a large negative value drops a candidate).
pub fn mnrl(
    anchors: &Tensor,
    candidates: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
) -> Result<Tensor, LossError> {
    let b = anchors.dim(0)?;
    let mut scores = (cos_sim(anchors, candidates)? * scale)?;
    if let Some(m) = mask {
        let m = m.to_dtype(scores.dtype())?;
        scores = (scores + m)?;
    }
    let lse = log_sum_exp_rows(&scores)?;
    let eye = Tensor::eye(b, DType::F32, scores.device())?.to_dtype(scores.dtype())?;
    let positive = (scores.narrow(1, 0, b)? * eye)?.sum_keepdim(D::Minus1)?;
    Ok((lse - positive)?.mean_all()?)
}

/// `log(sum(exp(x)))` of each row of a (rows, n) matrix, shape (rows, 1), computed stably (the
/// row maximum is a constant shift).
pub fn log_sum_exp_rows(x: &Tensor) -> candle_core::Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    x.broadcast_sub(&max)?
        .exp()?
        .sum_keepdim(D::Minus1)?
        .log()?
        + max
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn reference_mnrl(a: &[Vec<f32>], c: &[Vec<f32>], scale: f64) -> f64 {
        let norm = |v: &Vec<f32>| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        let mut total = 0.0;
        for (i, ai) in a.iter().enumerate() {
            let s: Vec<f64> = c
                .iter()
                .map(|cj| {
                    let dot: f64 = ai.iter().zip(cj).map(|(x, y)| *x as f64 * *y as f64).sum();
                    scale * dot / (norm(ai) * norm(cj))
                })
                .collect();
            let lse = s.iter().map(|x| x.exp()).sum::<f64>().ln();
            total += lse - s[i];
        }
        total / a.len() as f64
    }

    #[test]
    fn mnrl_matches_hand_computation_with_hard_negatives() {
        let a = vec![vec![1f32, 0.2, 0.], vec![0., 1., 0.5]];
        let c = vec![
            vec![0.9f32, 0.1, 0.1],
            vec![0.1, 0.8, 0.7],
            vec![0.5, 0.5, 0.],
            vec![-1., 0.3, 0.2],
        ];
        let dev = Device::Cpu;
        let at = Tensor::new(a.clone(), &dev).unwrap();
        let ct = Tensor::new(c.clone(), &dev).unwrap();
        let got = mnrl(&at, &ct, 20.0, None)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        let want = reference_mnrl(&a, &c, 20.0);
        assert!((got - want).abs() < 1e-4, "{got} {want}");
    }

    #[test]
    fn symmetric_mnrl_averages_both_ways() {
        let a = vec![vec![1f32, 0.2, 0.], vec![0., 1., 0.5], vec![0.3, -0.2, 1.]];
        let c = vec![
            vec![0.9f32, 0.1, 0.1],
            vec![0.1, 0.8, 0.7],
            vec![0.2, 0.1, 0.9],
            vec![0.5, 0.5, 0.],
            vec![-1., 0.3, 0.2],
            vec![0.4, 0.4, 0.4],
        ];
        let dev = Device::Cpu;
        let spec = LossSpec {
            symmetric: true,
            ..LossSpec::default()
        };
        let at = Tensor::new(a.clone(), &dev).unwrap();
        let ct = Tensor::new(c.clone(), &dev).unwrap();
        let got = spec.compute(&at, &ct, None).unwrap();
        let got = got.to_scalar::<f32>().unwrap() as f64;
        // Forward over every candidate; back: each positive against the anchors only.
        let want = (reference_mnrl(&a, &c, 20.0) + reference_mnrl(&c[..3], &a, 20.0)) / 2.0;
        assert!((got - want).abs() < 1e-4, "{got} {want}");
        let one_way = LossSpec::default().compute(&at, &ct, None).unwrap();
        let one_way = one_way.to_scalar::<f32>().unwrap() as f64;
        assert!((one_way - reference_mnrl(&a, &c, 20.0)).abs() < 1e-4);
        assert!((got - one_way).abs() > 1e-3, "the way back counts");
    }

    #[test]
    fn a_masked_candidate_counts_as_absent() {
        let a = vec![vec![1f32, 0.2, 0.], vec![0., 1., 0.5]];
        let c = vec![
            vec![0.9f32, 0.1, 0.1],
            vec![0.1, 0.8, 0.7],
            vec![0.5, 0.5, 0.],
            vec![-1., 0.3, 0.2],
        ];
        let dev = Device::Cpu;
        let at = Tensor::new(a.clone(), &dev).unwrap();
        let ct = Tensor::new(c.clone(), &dev).unwrap();
        // Anchor 0 loses candidate 2, anchor 1 loses candidate 0.
        let mask =
            Tensor::new(vec![vec![0f32, 0., -1e4, 0.], vec![-1e4, 0., 0., 0.]], &dev).unwrap();
        let got = mnrl(&at, &ct, 20.0, Some(&mask))
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        // Each anchor's loss over the candidates left to it: as a one-anchor problem whose
        // positive (candidate 0 for anchor 0, 1 for anchor 1) comes first once 2 or 0 is gone.
        let keep = |i: usize, drop: usize| -> f64 {
            let cands: Vec<Vec<f32>> = (0..4)
                .filter(|&j| j != drop)
                .map(|j| c[j].clone())
                .collect();
            reference_mnrl(&[a[i].clone()], &cands, 20.0)
        };
        let want = (keep(0, 2) + keep(1, 0)) / 2.0;
        assert!((got - want).abs() < 1e-4, "{got} {want}");
    }

    #[test]
    fn matryoshka_sums_truncated_losses() {
        let dev = Device::Cpu;
        let a = vec![vec![1f32, 0.2, 0.3, -0.1], vec![0., 1., 0.5, 0.4]];
        let c = vec![vec![0.9f32, 0.1, 0.1, 0.2], vec![0.1, 0.8, 0.7, -0.3]];
        let at = Tensor::new(a.clone(), &dev).unwrap();
        let ct = Tensor::new(c.clone(), &dev).unwrap();
        let spec = LossSpec::matryoshka(20.0, &[4, 2], Some(&[1.0, 0.5])).unwrap();
        let got = spec
            .compute(&at, &ct, None)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        let cut = |v: &[Vec<f32>]| v.iter().map(|r| r[..2].to_vec()).collect::<Vec<_>>();
        let want = reference_mnrl(&a, &c, 20.0) + 0.5 * reference_mnrl(&cut(&a), &cut(&c), 20.0);
        assert!((got - want).abs() < 1e-4, "{got} {want}");
    }

    #[test]
    fn matryoshka_dims_are_cut_and_checked() {
        assert_eq!(matryoshka_dims(None, 384).unwrap(), vec![384, 256, 128, 64]);
        assert_eq!(matryoshka_dims(None, 32).unwrap(), vec![32]);
        assert_eq!(matryoshka_dims(None, 300).unwrap(), vec![300, 256, 128, 64]);
        assert_eq!(matryoshka_dims(Some(&[16, 32]), 32).unwrap(), vec![32, 16]);
        let err = matryoshka_dims(Some(&[64]), 32).unwrap_err().to_string();
        assert!(err.contains("64") && err.contains("1..=32"), "{err}");
        assert!(LossSpec::matryoshka(20.0, &[4, 2], Some(&[1.0])).is_err());
    }
}
