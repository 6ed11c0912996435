//! Hard-negative mining (on the exact search of [`super::search`]) with the semantics of
//! sentence-transformers' `mine_hard_negatives`.
//!
//! Mining, per query (one positive each):
//! 1. take the `range_max + 1` corpus entries most similar to the query (cosine);
//! 2. disqualify the positive and any entry whose text equals the positive's (never a negative);
//! 3. disqualify candidates with `score + absolute_margin > positive_score`, then those with
//!    `score > positive_score - |positive_score| * relative_margin` (sign-safe, as
//!    sentence-transformers 6.2 computes it), then `score > max_score`, then
//!    `score < min_score`, counting each reason;
//! 4. keep the best `range_max` of what is left, in score order, and skip the first `range_min`;
//! 5. `top` sampling takes the first `num_negatives`; `random` samples `num_negatives` of them
//!    (seeded) and sorts them by score.
//!
//! `range_max` defaults as in sentence-transformers: `range_min + num_negatives + 1`, or
//! `range_min + 10 * num_negatives + 1` when a margin or `max_score` is set.
//! With a positive text that is not in the corpus (ICT), the source chunk is the excluded entry.
//!
//! Memory: the corpus and query embeddings (`4 * dim` bytes per row each: 100k chunks of 384
//! dims = 154 MB), one score block of `query_block * corpus_block * 4` bytes (256 x 8192 = 8 MiB
//! by default), a tensor copy of each block, and the kept candidates (`k * 8` bytes per query).
use std::collections::HashSet;

use rand::seq::index::sample;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::embed::EmbeddingMatrix;
use super::search::{better, exact_top_k, Hit, SearchBlocks, SearchError};
use super::ProgressSender;

/// Mining and search errors.
#[derive(Debug, thiserror::Error)]
pub enum MineError {
    /// A matrix product failed.
    #[error("similarity search failed: {0}")]
    Tensor(#[from] candle_core::Error),
    /// Inputs disagree in size.
    #[error("mining inputs disagree: {what}")]
    Shape {
        /// Which sizes differ.
        what: String,
    },
    /// The candidate search failed or was cancelled.
    #[error(transparent)]
    Search(#[from] SearchError),
}

/// How negatives are picked from the candidates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Sampling {
    /// The best candidates.
    #[default]
    Top,
    /// A seeded random sample of the candidates.
    Random,
}

/// Mining settings (sentence-transformers' names and meanings).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MineConfig {
    /// Negatives per query.
    pub num_negatives: usize,
    /// Best candidates skipped.
    pub range_min: usize,
    /// Candidates considered; `None` for sentence-transformers' default.
    pub range_max: Option<usize>,
    /// Candidates scoring within this of the positive are dropped.
    pub absolute_margin: Option<f32>,
    /// Candidates scoring above `positive - |positive| * relative_margin` are dropped (default
    /// 0.05).
    pub relative_margin: Option<f32>,
    /// Candidates above this score are dropped.
    pub max_score: Option<f32>,
    /// Candidates below this score are dropped.
    pub min_score: Option<f32>,
    /// Top or random.
    pub sampling: Sampling,
    /// Seed of random sampling.
    pub seed: u64,
    /// Search block sizes.
    pub blocks: SearchBlocks,
}

impl Default for MineConfig {
    fn default() -> Self {
        Self {
            num_negatives: 5,
            range_min: 0,
            range_max: None,
            absolute_margin: None,
            relative_margin: Some(0.05),
            max_score: None,
            min_score: None,
            sampling: Sampling::Top,
            seed: 42,
            blocks: SearchBlocks::default(),
        }
    }
}

impl MineConfig {
    /// `range_max`, or sentence-transformers' default for it.
    pub fn effective_range_max(&self) -> usize {
        self.range_max.unwrap_or_else(|| {
            let filtered = self.absolute_margin.is_some()
                || self.relative_margin.is_some()
                || self.max_score.is_some();
            self.range_min + self.num_negatives * if filtered { 10 } else { 1 } + 1
        })
    }
}

/// Counts of a mining run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MineCounts {
    /// Queries mined.
    pub queries: usize,
    /// Negatives found in all.
    pub negatives: usize,
    /// Queries that got fewer than `num_negatives`.
    pub short_of_negatives: usize,
    /// Candidates that were the positive or a copy of its text.
    pub skipped_positive: usize,
    /// Candidates dropped by the absolute margin.
    pub skipped_absolute_margin: usize,
    /// Candidates dropped by the relative margin.
    pub skipped_relative_margin: usize,
    /// Candidates dropped by `max_score`.
    pub skipped_max_score: usize,
    /// Candidates dropped by `min_score`.
    pub skipped_min_score: usize,
}

/// Negatives for each query, best first, and the counts.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Mined {
    /// Per query, the chosen negatives.
    pub negatives: Vec<Vec<Hit>>,
    /// Counts.
    pub counts: MineCounts,
}

/// What mining works on. `positive_scores[i]` is the similarity of query `i` to its positive,
/// `positive_rows[i]` the corpus row of its source chunk; `corpus_texts` are the corpus texts
/// (entries equal to the positive's text are never negatives).
#[derive(Debug, Clone, Copy)]
pub struct MineInput<'a> {
    /// Query embeddings.
    pub queries: &'a EmbeddingMatrix,
    /// Similarity of each query to its positive.
    pub positive_scores: &'a [f32],
    /// Corpus row of each query's source chunk.
    pub positive_rows: &'a [usize],
    /// Corpus embeddings.
    pub corpus: &'a EmbeddingMatrix,
    /// Corpus texts.
    pub corpus_texts: &'a [String],
}

/// Mines hard negatives. Blocking: call from a blocking thread.
pub fn mine_hard_negatives(
    input: MineInput<'_>,
    config: &MineConfig,
    progress: Option<&ProgressSender>,
    cancel: &CancellationToken,
) -> Result<Mined, MineError> {
    let MineInput {
        queries,
        positive_scores,
        positive_rows,
        corpus,
        corpus_texts,
    } = input;
    let n = queries.len();
    if positive_scores.len() != n || positive_rows.len() != n || corpus_texts.len() != corpus.len()
    {
        return Err(MineError::Shape {
            what: format!(
                "{n} queries, {} positive scores, {} positive rows, {} corpus rows, {} corpus texts",
                positive_scores.len(),
                positive_rows.len(),
                corpus.len(),
                corpus_texts.len()
            ),
        });
    }
    if let Some(&bad) = positive_rows.iter().find(|&&r| r >= corpus.len()) {
        return Err(MineError::Shape {
            what: format!("positive row {bad} outside a corpus of {}", corpus.len()),
        });
    }
    let range_max = config.effective_range_max();
    let candidates = exact_top_k(
        queries,
        corpus,
        range_max + 1,
        config.blocks,
        progress,
        cancel,
    )?;
    let key = |i: usize| blake3::hash(corpus_texts[i].trim().as_bytes());
    let mut counts = MineCounts {
        queries: n,
        ..Default::default()
    };
    let mut negatives = Vec::with_capacity(n);
    for (qi, hits) in candidates.into_iter().enumerate() {
        let pos_row = positive_rows[qi];
        let pos_key = key(pos_row);
        let pos_score = positive_scores[qi];
        let mut valid = Vec::with_capacity(hits.len());
        for hit in hits {
            if hit.index == pos_row || key(hit.index) == pos_key {
                counts.skipped_positive += 1;
            } else if config
                .absolute_margin
                .is_some_and(|m| hit.score + m > pos_score)
            {
                counts.skipped_absolute_margin += 1;
            } else if config
                .relative_margin
                .is_some_and(|m| hit.score > pos_score - pos_score.abs() * m)
            {
                counts.skipped_relative_margin += 1;
            } else if config.max_score.is_some_and(|m| hit.score > m) {
                counts.skipped_max_score += 1;
            } else if config.min_score.is_some_and(|m| hit.score < m) {
                counts.skipped_min_score += 1;
            } else {
                valid.push(hit);
            }
        }
        valid.truncate(range_max);
        let pool: Vec<Hit> = valid.into_iter().skip(config.range_min).collect();
        let mut chosen = match config.sampling {
            Sampling::Top => pool
                .into_iter()
                .take(config.num_negatives)
                .collect::<Vec<_>>(),
            Sampling::Random => {
                let seed = config.seed ^ (qi as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
                let take = config.num_negatives.min(pool.len());
                let mut picked: Vec<Hit> = sample(&mut rng, pool.len(), take)
                    .into_iter()
                    .map(|i| pool[i])
                    .collect();
                picked.sort_by(better);
                picked
            }
        };
        // Two corpus rows with equal text are one negative.
        let mut seen = HashSet::new();
        chosen.retain(|h| seen.insert(key(h.index)));
        if chosen.len() < config.num_negatives {
            counts.short_of_negatives += 1;
        }
        counts.negatives += chosen.len();
        negatives.push(chosen);
    }
    tracing::info!(?counts, range_max, "hard negatives mined");
    Ok(Mined { negatives, counts })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::embed::dot;

    fn m(rows: &[&[f32]]) -> EmbeddingMatrix {
        EmbeddingMatrix::from_rows(rows.iter().map(|r| r.to_vec()).collect()).unwrap()
    }

    #[test]
    fn blocked_search_matches_brute_force() {
        let mut state = 7u64;
        let mut next = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 33) as f32 / (1u64 << 31) as f32) - 0.5
        };
        let corpus = EmbeddingMatrix::from_rows(
            (0..300)
                .map(|_| (0..16).map(|_| next()).collect())
                .collect(),
        )
        .unwrap();
        let queries = EmbeddingMatrix::from_rows(
            (0..37).map(|_| (0..16).map(|_| next()).collect()).collect(),
        )
        .unwrap();
        let blocks = SearchBlocks {
            query_block: 5,
            corpus_block: 64,
        };
        let got = exact_top_k(
            &queries,
            &corpus,
            10,
            blocks,
            None,
            &CancellationToken::new(),
        )
        .unwrap();
        for (qi, hits) in got.iter().enumerate() {
            let mut all: Vec<Hit> = (0..corpus.len())
                .map(|c| Hit {
                    index: c,
                    score: dot(queries.row(qi), corpus.row(c)),
                })
                .collect();
            all.sort_by(better);
            let want: Vec<usize> = all[..10].iter().map(|h| h.index).collect();
            let have: Vec<usize> = hits.iter().map(|h| h.index).collect();
            assert_eq!(have, want, "query {qi}");
        }
    }

    /// One query whose positive is corpus row 0 with score 1.
    fn input<'a>(
        q: &'a EmbeddingMatrix,
        corpus: &'a EmbeddingMatrix,
        texts: &'a [String],
    ) -> MineInput<'a> {
        MineInput {
            queries: q,
            positive_scores: &[1.0],
            positive_rows: &[0],
            corpus,
            corpus_texts: texts,
        }
    }

    /// Corpus rows on the unit circle at known angles to one query at angle 0.
    fn circle(degrees: &[f32]) -> EmbeddingMatrix {
        let rows: Vec<Vec<f32>> = degrees
            .iter()
            .map(|d| {
                let r = d.to_radians();
                vec![r.cos(), r.sin()]
            })
            .collect();
        EmbeddingMatrix::from_rows(rows).unwrap()
    }

    #[test]
    fn margins_range_and_positive_exclusion() {
        // Scores: row0 1.0 (positive), row1 0.985, row2 0.94, row3 0.77, row4 0.5, row5 copy of row0.
        let corpus = circle(&[0.0, 10.0, 20.0, 40.0, 60.0, 0.0]);
        let texts: Vec<String> = ["pos", "a", "b", "c", "d", "pos"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let q = m(&[&[1.0, 0.0]]);
        let run = |config: &MineConfig| {
            mine_hard_negatives(
                input(&q, &corpus, &texts),
                config,
                None,
                &CancellationToken::new(),
            )
            .unwrap()
        };
        let idx = |mined: &Mined| {
            mined.negatives[0]
                .iter()
                .map(|h| h.index)
                .collect::<Vec<_>>()
        };
        // Default relative margin 0.05: 0.985 > 0.95 is dropped.
        let base = MineConfig {
            num_negatives: 2,
            ..Default::default()
        };
        let mined = run(&base);
        assert_eq!(idx(&mined), [2, 3]);
        assert_eq!(mined.counts.skipped_positive, 2);
        assert_eq!(mined.counts.skipped_relative_margin, 1);
        // No margin: the closest non-positive rows.
        let none = MineConfig {
            relative_margin: None,
            ..base.clone()
        };
        assert_eq!(idx(&run(&none)), [1, 2]);
        // Absolute margin 0.1: 0.985 and 0.94 are too close.
        let abs = MineConfig {
            absolute_margin: Some(0.1),
            relative_margin: None,
            ..base.clone()
        };
        assert_eq!(idx(&run(&abs)), [3, 4]);
        // range_min skips the best valid candidate; max/min score bound the rest.
        let ranged = MineConfig {
            range_min: 1,
            relative_margin: None,
            ..base.clone()
        };
        assert_eq!(idx(&run(&ranged)), [2, 3]);
        let bounded = MineConfig {
            relative_margin: None,
            max_score: Some(0.95),
            min_score: Some(0.6),
            num_negatives: 5,
            ..base.clone()
        };
        let mined = run(&bounded);
        assert_eq!(idx(&mined), [2, 3]);
        assert_eq!(mined.counts.short_of_negatives, 1);
        assert_eq!(
            (
                mined.counts.skipped_max_score,
                mined.counts.skipped_min_score
            ),
            (1, 1)
        );
    }

    #[test]
    fn relative_margin_is_sign_safe_for_negative_positive_scores() {
        // Positive at 120 degrees (score -0.5); row1 at 121 (-0.515) is within 5% of |-0.5| of
        // it and is dropped; row2 at 130 (-0.643) is kept. (1 - margin) * positive would keep
        // row1: its threshold, -0.475, lies above the positive.
        let corpus = circle(&[120.0, 121.0, 130.0]);
        let texts: Vec<String> = ["pos", "a", "b"].iter().map(|s| s.to_string()).collect();
        let q = m(&[&[1.0, 0.0]]);
        let mined = mine_hard_negatives(
            MineInput {
                queries: &q,
                positive_scores: &[-0.5],
                positive_rows: &[0],
                corpus: &corpus,
                corpus_texts: &texts,
            },
            &MineConfig {
                num_negatives: 2,
                ..Default::default()
            },
            None,
            &CancellationToken::new(),
        )
        .unwrap();
        let rows: Vec<usize> = mined.negatives[0].iter().map(|h| h.index).collect();
        assert_eq!(rows, [2]);
        assert_eq!(mined.counts.skipped_relative_margin, 1);
    }

    #[test]
    fn random_sampling_is_seeded_and_sorted() {
        let corpus = circle(&[0.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0]);
        let texts: Vec<String> = (0..8).map(|i| format!("t{i}")).collect();
        let q = m(&[&[1.0, 0.0]]);
        let cfg = MineConfig {
            num_negatives: 3,
            relative_margin: None,
            range_max: Some(7),
            sampling: Sampling::Random,
            ..Default::default()
        };
        let run = |c: &MineConfig| {
            mine_hard_negatives(
                input(&q, &corpus, &texts),
                c,
                None,
                &CancellationToken::new(),
            )
            .unwrap()
        };
        let a = run(&cfg);
        assert_eq!(a, run(&cfg));
        let hits = &a.negatives[0];
        assert_eq!(hits.len(), 3);
        assert!(hits.windows(2).all(|w| w[0].score >= w[1].score));
        assert!(hits.iter().all(|h| h.index != 0));
        let differs = (1..30).any(|seed| {
            run(&MineConfig {
                seed,
                ..cfg.clone()
            }) != a
        });
        assert!(differs);
    }
}
