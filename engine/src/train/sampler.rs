//! The no-duplicates batch sampler: like sentence-transformers' `NoDuplicatesBatchSampler`, it
//! never puts two examples that share a text (query, positive or negative) in one batch, since a
//! duplicate would be a false in-batch negative for MultipleNegativesRankingLoss.

use std::collections::HashSet;

use super::data::TrainPair;
use crate::rng::Rng;

/// Splits a seeded shuffle of `pairs` into batches of `batch_size` with no text repeated inside
/// a batch. Examples that collide are deferred to a later batch. With `drop_last`, a final
/// short batch is dropped.
pub fn no_duplicate_batches(
    pairs: &[TrainPair],
    batch_size: usize,
    rng: &mut Rng,
    drop_last: bool,
) -> Vec<Vec<usize>> {
    let batch_size = batch_size.max(1);
    let mut remaining: Vec<usize> = (0..pairs.len()).collect();
    rng.shuffle(&mut remaining);
    let mut batches = Vec::new();
    while !remaining.is_empty() {
        let mut batch = Vec::with_capacity(batch_size);
        let mut seen: HashSet<&str> = HashSet::new();
        let mut deferred = Vec::new();
        for &i in &remaining {
            if batch.len() == batch_size {
                deferred.push(i);
                continue;
            }
            let p = &pairs[i];
            let texts: Vec<&str> = std::iter::once(p.query.as_str())
                .chain(std::iter::once(p.positive.as_str()))
                .chain(p.negatives.iter().map(String::as_str))
                .collect();
            if texts.iter().any(|t| seen.contains(t)) {
                deferred.push(i);
            } else {
                seen.extend(texts);
                batch.push(i);
            }
        }
        remaining = deferred;
        if batch.len() < batch_size && drop_last {
            break;
        }
        batches.push(batch);
    }
    batches
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(q: &str, p: &str) -> TrainPair {
        TrainPair {
            query: q.into(),
            positive: p.into(),
            negatives: vec![],
        }
    }

    #[test]
    fn batches_never_repeat_a_text_and_cover_everything() {
        let mut pairs: Vec<TrainPair> = (0..20)
            .map(|i| pair(&format!("q{i}"), &format!("p{i}")))
            .collect();
        // Five queries share a positive: at most one of them per batch.
        for p in pairs.iter_mut().take(5) {
            p.positive = "shared".into();
        }
        let batches = no_duplicate_batches(&pairs, 4, &mut Rng::new(1), false);
        let mut all: Vec<usize> = batches.iter().flatten().copied().collect();
        all.sort();
        assert_eq!(all, (0..20).collect::<Vec<_>>());
        for b in &batches {
            assert!(b.iter().filter(|&&i| i < 5).count() <= 1, "{batches:?}");
        }
    }

    #[test]
    fn seeded_and_drop_last() {
        let pairs: Vec<TrainPair> = (0..10)
            .map(|i| pair(&format!("q{i}"), &format!("p{i}")))
            .collect();
        let a = no_duplicate_batches(&pairs, 4, &mut Rng::new(5), true);
        let b = no_duplicate_batches(&pairs, 4, &mut Rng::new(5), true);
        let c = no_duplicate_batches(&pairs, 4, &mut Rng::new(6), true);
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(a.len(), 2);
        assert!(a.iter().all(|x| x.len() == 4));
    }
}
