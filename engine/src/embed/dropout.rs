//! Inverted dropout with a seeded RNG (so that GradCache can replay the same masks).

use candle_core::Tensor;

use crate::rng::Rng;

/// Dropout state for one forward pass: `None` runs in evaluation mode (no dropout).
pub struct Dropout<'a>(pub Option<&'a mut Rng>);

impl Dropout<'_> {
    /// Evaluation mode: dropout is the identity.
    pub fn off() -> Dropout<'static> {
        Dropout(None)
    }

    /// A seed for dropout masks drawn inside a fused op (`None` in evaluation mode or for
    /// `p <= 0`): the op derives every mask from it, in the forward and again in the backward.
    pub fn seed(&mut self, p: f64) -> Option<u64> {
        match self.0.as_deref_mut() {
            Some(rng) if p > 0.0 => Some(rng.next_u64()),
            _ => None,
        }
    }

    /// Applies inverted dropout with drop probability `p` (identity in evaluation mode).
    pub fn apply(&mut self, x: &Tensor, p: f64) -> candle_core::Result<Tensor> {
        let Some(rng) = self.0.as_deref_mut() else {
            return Ok(x.clone());
        };
        if p <= 0.0 {
            return Ok(x.clone());
        }
        let n = x.elem_count();
        let keep = (1.0 / (1.0 - p)) as f32;
        let threshold = (p * (1u64 << 32) as f64) as u64;
        let mut mask = Vec::with_capacity(n + 1);
        while mask.len() < n {
            let r = rng.next_u64();
            for half in [r & 0xFFFF_FFFF, r >> 32] {
                mask.push(if half < threshold { 0.0 } else { keep });
            }
        }
        mask.truncate(n);
        let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
        x * mask
    }
}

/// The inverted-dropout factors (0 or 1 / (1 - rate)) of stream `stream` of a fused op's
/// masks: the same seed and stream always give the same factors, on any thread, so a backward
/// regenerates the forward's mask instead of keeping it.
pub(crate) fn dropout_factors(out: &mut [f32], rate: f32, seed: u64, stream: usize) {
    let mut rng = Rng::new(seed ^ (stream as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let keep = 1.0 / (1.0 - rate);
    let threshold = (rate as f64 * (1u64 << 32) as f64) as u64;
    for pair in out.chunks_mut(2) {
        let r = rng.next_u64();
        for (v, half) in pair.iter_mut().zip([r & 0xFFFF_FFFF, r >> 32]) {
            *v = if half < threshold { 0.0 } else { keep };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn dropout_is_seeded_and_scaled() {
        let dev = Device::Cpu;
        let x = Tensor::ones(10_000, DType::F32, &dev).unwrap();
        let mut r1 = Rng::new(1);
        let mut r2 = Rng::new(1);
        let a = Dropout(Some(&mut r1))
            .apply(&x, 0.1)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let b = Dropout(Some(&mut r2))
            .apply(&x, 0.1)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(a, b);
        let zeros = a.iter().filter(|v| **v == 0.0).count();
        assert!((800..1200).contains(&zeros), "{zeros}");
        let mean: f32 = a.iter().sum::<f32>() / a.len() as f32;
        assert!((mean - 1.0).abs() < 0.03, "{mean}");
        let off = Dropout::off()
            .apply(&x, 0.5)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(off.iter().all(|v| *v == 1.0));
    }
}
