//! Jittered exponential backoff: the coordinator redialling workers, a worker whose enrolment
//! connection was refused.

use rand::Rng;
use std::time::Duration;

/// Delays that double from `initial` up to `max`, each drawn uniformly from [d/2, d] ("equal
/// jitter") so that many redialling coordinators or sessions do not move in lockstep.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    /// A backoff starting at `initial`, capped at `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            current: initial,
        }
    }

    /// The next delay to wait.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.current;
        self.current = (self.current * 2).min(self.max);
        let half = d / 2;
        half + rand::rng().random_range(Duration::ZERO..=half)
    }

    /// Starts over from `initial` (after a success).
    pub fn reset(&mut self) {
        self.current = self.initial;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_stay_jittered_and_capped() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(800));
        let mut ceilings = vec![];
        for _ in 0..6 {
            let d = b.next_delay();
            ceilings.push(d);
        }
        let caps = [100u64, 200, 400, 800, 800, 800];
        for (d, cap) in ceilings.iter().zip(caps) {
            assert!(
                *d <= Duration::from_millis(cap) && *d >= Duration::from_millis(cap / 2),
                "{d:?} vs {cap}"
            );
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
