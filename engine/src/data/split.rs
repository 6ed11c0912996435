//! Held-out test split by chunk: every query of a chunk lands on the same side, so no chunk's
//! queries are on both sides. The chunks with queries are ordered by a seeded hash of their id and
//! the first `round(fraction * n)` form the test side: exact, seeded, and independent of input order.
use std::collections::{BTreeSet, HashSet};

use serde::{Deserialize, Serialize};

use super::llm::generate::{chunk_seed, GeneratedQuery};

/// Split errors.
#[derive(Debug, thiserror::Error)]
pub enum SplitError {
    /// The fraction is outside [0, 1).
    #[error(
        "test fraction {fraction} must be at least 0 and below 1 (0.1 holds out 10% of the chunks)"
    )]
    BadFraction {
        /// The fraction given.
        fraction: f64,
    },
}

/// Split settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SplitConfig {
    /// Share of chunks held out (default 0.1).
    pub test_fraction: f64,
    /// Seed.
    pub seed: u64,
}

impl Default for SplitConfig {
    fn default() -> Self {
        Self {
            test_fraction: 0.1,
            seed: 42,
        }
    }
}

/// Train and test queries, and the chunks held out.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Split {
    /// Training queries, input order kept.
    pub train: Vec<GeneratedQuery>,
    /// Test queries, input order kept.
    pub test: Vec<GeneratedQuery>,
    /// Ids of the held-out chunks.
    pub test_chunks: BTreeSet<String>,
}

/// Splits queries by chunk.
pub fn split_by_chunk(
    queries: Vec<GeneratedQuery>,
    config: &SplitConfig,
) -> Result<Split, SplitError> {
    if !(0.0..1.0).contains(&config.test_fraction) || config.test_fraction.is_nan() {
        return Err(SplitError::BadFraction {
            fraction: config.test_fraction,
        });
    }
    let distinct: BTreeSet<&str> = queries.iter().map(|q| q.chunk_id.as_str()).collect();
    let mut order: Vec<(u64, &str)> = distinct
        .into_iter()
        .map(|id| (chunk_seed(config.seed ^ 0x5eed_5e11, id), id))
        .collect();
    order.sort();
    let n_test = (config.test_fraction * order.len() as f64).round() as usize;
    let test_chunks: HashSet<String> = order[..n_test]
        .iter()
        .map(|(_, id)| id.to_string())
        .collect();
    let mut split = Split::default();
    for q in queries {
        if test_chunks.contains(&q.chunk_id) {
            split.test.push(q);
        } else {
            split.train.push(q);
        }
    }
    split.test_chunks = test_chunks.into_iter().collect();
    Ok(split)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::llm::generate::QuerySource;

    fn queries() -> Vec<GeneratedQuery> {
        (0..40)
            .flat_map(|c| {
                (0..3).map(move |k| GeneratedQuery {
                    query: format!("question {k} about chunk {c}?"),
                    chunk_id: format!("doc_chunk_{c}"),
                    positive_text: None,
                    source: QuerySource::Llm,
                })
            })
            .collect()
    }

    #[test]
    fn chunks_never_straddle_and_fraction_is_exact() {
        let s = split_by_chunk(queries(), &SplitConfig::default()).unwrap();
        assert_eq!(s.test_chunks.len(), 4);
        assert_eq!(s.test.len(), 12);
        assert_eq!(s.train.len(), 108);
        let train_chunks: HashSet<_> = s.train.iter().map(|q| q.chunk_id.clone()).collect();
        assert!(s.test.iter().all(|q| !train_chunks.contains(&q.chunk_id)));
    }

    #[test]
    fn seeded_and_order_independent() {
        let a = split_by_chunk(queries(), &SplitConfig::default()).unwrap();
        let mut rev = queries();
        rev.reverse();
        let b = split_by_chunk(rev, &SplitConfig::default()).unwrap();
        assert_eq!(a.test_chunks, b.test_chunks);
        let c = split_by_chunk(
            queries(),
            &SplitConfig {
                seed: 7,
                ..Default::default()
            },
        )
        .unwrap();
        assert_ne!(a.test_chunks, c.test_chunks);
        assert!(split_by_chunk(
            queries(),
            &SplitConfig {
                test_fraction: 1.0,
                seed: 1
            }
        )
        .is_err());
    }
}
