//! Base vs fine-tuned on the same queries, as a user can trust it: the paired bootstrap 95%
//! interval of the change in MRR@10 and NDCG@10, and a verdict drawn from the intervals.
//!
//! Paired: each resample draws queries with replacement and takes the mean of (tuned - base) over
//! the same draws, so the query-to-query spread that both models share cancels out. Percentile
//! interval (2.5th and 97.5th of the resampled means), seeded, 2,000 resamples by default.

use super::metrics::IrMetrics;
use crate::rng::Rng;
use serde::{Deserialize, Serialize};
use std::fmt;

/// Resamples drawn by [`compare`].
pub const RESAMPLES: usize = 2000;

/// The change of one metric with its interval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeltaInterval {
    /// The base model's mean.
    pub base: f64,
    /// The fine-tuned model's mean.
    pub tuned: f64,
    /// `tuned - base`.
    pub delta: f64,
    /// Lower end of the 95% interval of `delta`.
    pub low: f64,
    /// Upper end of the 95% interval of `delta`.
    pub high: f64,
}

impl DeltaInterval {
    /// Whether the whole interval is above zero.
    pub fn above_zero(&self) -> bool {
        self.low > 0.0
    }

    /// Whether the whole interval is below zero.
    pub fn below_zero(&self) -> bool {
        self.high < 0.0
    }
}

impl fmt::Display for DeltaInterval {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:.4} -> {:.4} ({:+.4}, 95% CI {:+.4} .. {:+.4})",
            self.base, self.tuned, self.delta, self.low, self.high
        )
    }
}

/// What the intervals say.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// An interval is above zero and none is below.
    Better,
    /// Both intervals span zero (or they disagree).
    NoMeasurableChange,
    /// An interval is below zero and none is above.
    Worse,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verdict::Better => "better",
            Verdict::NoMeasurableChange => "no measurable change",
            Verdict::Worse => "worse",
        })
    }
}

/// Base vs fine-tuned on one query set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    /// Queries compared.
    pub queries: usize,
    /// The change in MRR@10.
    pub mrr_at_10: DeltaInterval,
    /// The change in NDCG@10.
    pub ndcg_at_10: DeltaInterval,
    /// What the intervals say.
    pub verdict: Verdict,
}

impl fmt::Display for Comparison {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "MRR@10   {}", self.mrr_at_10)?;
        writeln!(f, "NDCG@10  {}", self.ndcg_at_10)?;
        write!(
            f,
            "verdict: {} (paired bootstrap over {} queries, {RESAMPLES} resamples)",
            self.verdict, self.queries
        )
    }
}

/// The paired bootstrap interval of `mean(tuned - base)`; `base` and `tuned` hold the same
/// queries in the same order. `None` when they differ in length or are empty.
pub fn paired_bootstrap(
    base: &[f64],
    tuned: &[f64],
    resamples: usize,
    seed: u64,
) -> Option<DeltaInterval> {
    if base.len() != tuned.len() || base.is_empty() || resamples == 0 {
        return None;
    }
    let n = base.len();
    let diffs: Vec<f64> = tuned.iter().zip(base).map(|(t, b)| t - b).collect();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let mut rng = Rng::new(seed);
    let mut means: Vec<f64> = (0..resamples)
        .map(|_| (0..n).map(|_| diffs[rng.below(n)]).sum::<f64>() / n as f64)
        .collect();
    means.sort_by(f64::total_cmp);
    let at = |q: f64| means[((q * resamples as f64) as usize).min(resamples - 1)];
    Some(DeltaInterval {
        base: mean(base),
        tuned: mean(tuned),
        delta: mean(&diffs),
        low: at(0.025),
        high: at(0.975),
    })
}

/// The verdict of two intervals: better when one is above zero and none below, worse the other
/// way round, otherwise no measurable change.
pub fn verdict(intervals: &[&DeltaInterval]) -> Verdict {
    let up = intervals.iter().any(|d| d.above_zero());
    let down = intervals.iter().any(|d| d.below_zero());
    match (up, down) {
        (true, false) => Verdict::Better,
        (false, true) => Verdict::Worse,
        _ => Verdict::NoMeasurableChange,
    }
}

/// Compares two evaluations of the same queries (from [`super::evaluate`] at one dimension).
/// `None` when they do not hold the same number of per-query values.
pub fn compare(base: &IrMetrics, tuned: &IrMetrics, seed: u64) -> Option<Comparison> {
    let (b, t) = (&base.per_query, &tuned.per_query);
    let mrr = paired_bootstrap(&b.mrr_at_10, &t.mrr_at_10, RESAMPLES, seed)?;
    let ndcg = paired_bootstrap(&b.ndcg_at_10, &t.ndcg_at_10, RESAMPLES, seed ^ 0x9e37)?;
    Some(Comparison {
        queries: b.mrr_at_10.len(),
        verdict: verdict(&[&mrr, &ndcg]),
        mrr_at_10: mrr,
        ndcg_at_10: ndcg,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clear_gain_is_better_and_its_interval_excludes_zero() {
        // 200 queries: the tuned model is 0.1 better on every one, up to noise.
        let base: Vec<f64> = (0..200).map(|i| (i % 7) as f64 / 10.0).collect();
        let tuned: Vec<f64> = base
            .iter()
            .enumerate()
            .map(|(i, b)| b + 0.1 + ((i % 3) as f64 - 1.0) * 0.02)
            .collect();
        let d = paired_bootstrap(&base, &tuned, 1000, 1).unwrap();
        assert!((d.delta - 0.1).abs() < 1e-3, "{d}");
        assert!(
            d.low > 0.09 && d.high < 0.11 && d.low <= d.delta && d.delta <= d.high,
            "{d}"
        );
        assert_eq!(verdict(&[&d, &d]), Verdict::Better);
    }

    #[test]
    fn noise_spans_zero_and_a_loss_is_worse() {
        // Half the queries gain 0.5, half lose 0.5: no measurable change.
        let base = vec![0.5; 100];
        let tuned: Vec<f64> = (0..100)
            .map(|i| if i % 2 == 0 { 1.0 } else { 0.0 })
            .collect();
        let d = paired_bootstrap(&base, &tuned, 2000, 7).unwrap();
        assert!(d.low < 0.0 && d.high > 0.0, "{d}");
        assert_eq!(verdict(&[&d]), Verdict::NoMeasurableChange);
        let worse = paired_bootstrap(
            &tuned.iter().map(|_| 0.9).collect::<Vec<_>>(),
            &base,
            500,
            3,
        )
        .unwrap();
        assert_eq!(verdict(&[&worse, &d]), Verdict::Worse);
        // Seeded: the same interval again.
        assert_eq!(paired_bootstrap(&base, &tuned, 2000, 7).unwrap(), d);
        assert!(paired_bootstrap(&base, &tuned[..10], 10, 1).is_none());
    }

    #[test]
    fn the_comparison_reads_the_per_query_values() {
        let mut base = IrMetrics::default();
        let mut tuned = IrMetrics::default();
        base.per_query.mrr_at_10 = vec![0.0, 0.5, 1.0, 0.25];
        base.per_query.ndcg_at_10 = vec![0.0, 0.6, 1.0, 0.4];
        tuned.per_query.mrr_at_10 = vec![1.0, 1.0, 1.0, 0.5];
        tuned.per_query.ndcg_at_10 = vec![1.0, 1.0, 1.0, 0.6];
        let c = compare(&base, &tuned, 5).unwrap();
        assert_eq!(c.queries, 4);
        assert!((c.mrr_at_10.delta - 0.4375).abs() < 1e-12);
        let text = c.to_string();
        assert!(
            text.contains("verdict: ") && text.contains("95% CI"),
            "{text}"
        );
        assert!(compare(&base, &IrMetrics::default(), 5).is_none());
    }
}
