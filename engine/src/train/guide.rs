//! False-negative control with a guide model (sentence-transformers' GISTEmbedLoss semantics):
//! the base embedder, frozen, scores every anchor against every candidate of its batch, and a
//! candidate it scores above the anchor's own positive (less `margin`) is masked out of the
//! loss, on the view that it is more likely an unlabelled positive than a negative.
//!
//! The guide is the model before training, so its embeddings are taken once, before the first
//! step ([`Guide::embed`]); each batch then only needs dot products. Unlike GISTEmbedLoss this
//! keeps MNRL's candidate set (positives and mined negatives; no anchor-anchor or
//! positive-positive terms) and its scale, so the mask is the only change.

use candle_core::{Device, Tensor};

use super::data::TrainPair;
use crate::embed::{EmbedError, SentenceEncoder};

/// Added to a masked candidate's scaled score: its softmax weight becomes 0.
const MASKED: f32 = -1e4;

/// The guide's unit embeddings of every text of the training pairs.
pub struct Guide {
    queries: Vec<Vec<f32>>,
    positives: Vec<Vec<f32>>,
    /// `negatives[pair][j]`.
    negatives: Vec<Vec<Vec<f32>>>,
    margin: f32,
}

/// How many candidates the guide has masked so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MaskCounts {
    /// Candidates scored (the positive of each anchor not counted).
    pub candidates: u64,
    /// Candidates masked.
    pub masked: u64,
}

impl Guide {
    /// Embeds every query, positive and negative of `pairs` with `encoder` (the guide: call it
    /// before training changes the weights), `batch_size` texts at a time.
    pub fn embed(
        encoder: &SentenceEncoder,
        pairs: &[TrainPair],
        margin: f32,
        batch_size: usize,
    ) -> Result<Self, EmbedError> {
        let unit = |v: Vec<f32>| {
            let n = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
            v.into_iter().map(|x| x / n).collect::<Vec<f32>>()
        };
        let embed = |texts: Vec<&str>| -> Result<Vec<Vec<f32>>, EmbedError> {
            Ok(encoder
                .encode(&texts, batch_size)?
                .into_iter()
                .map(unit)
                .collect())
        };
        let queries = embed(pairs.iter().map(|p| p.query.as_str()).collect())?;
        let positives = embed(pairs.iter().map(|p| p.positive.as_str()).collect())?;
        let flat = embed(
            pairs
                .iter()
                .flat_map(|p| p.negatives.iter().map(String::as_str))
                .collect(),
        )?;
        let mut flat = flat.into_iter();
        let negatives = pairs
            .iter()
            .map(|p| flat.by_ref().take(p.negatives.len()).collect())
            .collect();
        Ok(Self {
            queries,
            positives,
            negatives,
            margin,
        })
    }

    /// The additive mask of micro-batch `mb` for scores laid out as [`super::loss::LossSpec`]
    /// takes them: (B, B * (1 + negatives)), candidate column `c * B + j` is pair `mb[j]`'s
    /// positive for `c == 0`, else its negative `c - 1`. 0 keeps a score, a large negative value
    /// masks it (f32); an anchor's own positive is never masked. Adds what it did to `counts`.
    pub fn mask(
        &self,
        mb: &[usize],
        device: &Device,
        counts: &mut MaskCounts,
    ) -> candle_core::Result<Tensor> {
        let b = mb.len();
        let n_neg = self.negatives[mb[0]].len();
        let dot = |a: &[f32], c: &[f32]| a.iter().zip(c).map(|(x, y)| x * y).sum::<f32>();
        let mut out = vec![0f32; b * b * (1 + n_neg)];
        for (i, &pi) in mb.iter().enumerate() {
            let q = &self.queries[pi];
            let threshold = dot(q, &self.positives[pi]) - self.margin;
            let row = &mut out[i * b * (1 + n_neg)..(i + 1) * b * (1 + n_neg)];
            for c in 0..=n_neg {
                for (j, &pj) in mb.iter().enumerate() {
                    if c == 0 && j == i {
                        continue;
                    }
                    let cand = match c {
                        0 => &self.positives[pj],
                        _ => &self.negatives[pj][c - 1],
                    };
                    counts.candidates += 1;
                    if dot(q, cand) > threshold {
                        row[c * b + j] = MASKED;
                        counts.masked += 1;
                    }
                }
            }
        }
        Tensor::from_vec(out, (b, b * (1 + n_neg)), device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guide(queries: &[[f32; 2]], positives: &[[f32; 2]], negatives: &[[f32; 2]]) -> Guide {
        Guide {
            queries: queries.iter().map(|v| v.to_vec()).collect(),
            positives: positives.iter().map(|v| v.to_vec()).collect(),
            negatives: negatives.iter().map(|v| vec![v.to_vec()]).collect(),
            margin: 0.0,
        }
    }

    #[test]
    fn masks_candidates_the_guide_ranks_above_the_positive() {
        // Query 0 = (1,0) scores its positive 0.6, pair 1's positive 0.8 and its own negative
        // 0.7 (both masked) and pair 1's negative 0 (kept).
        let g = guide(
            &[[1.0, 0.0], [0.0, 1.0]],
            &[[0.6, 0.8], [0.8, 0.6]],
            &[[0.7, 0.71], [0.0, -1.0]],
        );
        let mut counts = MaskCounts::default();
        let m = g.mask(&[0, 1], &Device::Cpu, &mut counts).unwrap();
        let m: Vec<Vec<f32>> = m.to_vec2().unwrap();
        // Columns: positive 0, positive 1, negative of 0, negative of 1.
        assert_eq!(m[0], vec![0.0, MASKED, MASKED, 0.0]);
        // Query 1 = (0,1): positive 1 scores 0.6; positive 0 scores 0.8 > 0.6 -> masked,
        // negative 0 scores 0.71 > 0.6 -> masked, negative 1 scores -1 -> kept.
        assert_eq!(m[1], vec![MASKED, 0.0, MASKED, 0.0]);
        assert_eq!(
            counts,
            MaskCounts {
                candidates: 6,
                masked: 4
            }
        );
    }

    #[test]
    fn a_margin_masks_near_ties_too_and_the_positive_never() {
        let mut g = guide(&[[1.0, 0.0]; 2], &[[1.0, 0.0]; 2], &[[0.0, 1.0]; 2]);
        let mut counts = MaskCounts::default();
        let m: Vec<Vec<f32>> = g
            .mask(&[0, 1], &Device::Cpu, &mut counts)
            .unwrap()
            .to_vec2()
            .unwrap();
        // The other positive ties with the own one (1.0 = 1.0): not above it, kept.
        assert_eq!(m[0], vec![0.0, 0.0, 0.0, 0.0]);
        g.margin = 0.1;
        let m: Vec<Vec<f32>> = g
            .mask(&[0, 1], &Device::Cpu, &mut counts)
            .unwrap()
            .to_vec2()
            .unwrap();
        assert_eq!(m[0], vec![0.0, MASKED, 0.0, 0.0]);
        assert_eq!(m[1], vec![MASKED, 0.0, 0.0, 0.0]);
    }
}
