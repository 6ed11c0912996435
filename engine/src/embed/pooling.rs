//! Pooling of token states into sentence embeddings, and L2 normalisation, with the same
//! definitions as sentence-transformers' `Pooling` and `Normalize` modules.

use candle_core::{Tensor, D};

use super::config::Pooling;

/// Pools token states (batch, seq, hidden) with an attention mask (batch, seq) of 1.0 / 0.0.
pub fn pool(hidden: &Tensor, mask: &Tensor, mode: Pooling) -> candle_core::Result<Tensor> {
    let m = mask.to_dtype(hidden.dtype())?.unsqueeze(D::Minus1)?;
    match mode {
        Pooling::Mean => {
            let sum = hidden.broadcast_mul(&m)?.sum(1)?;
            let count = m.sum(1)?.clamp(1e-9, f64::MAX)?;
            sum.broadcast_div(&count)
        }
        Pooling::Cls => hidden.narrow(1, 0, 1)?.squeeze(1),
        Pooling::Max => {
            // Padding positions become -1e9, as sentence-transformers does.
            let masked = hidden
                .broadcast_mul(&m)?
                .broadcast_add(&m.affine(1e9, -1e9)?)?;
            masked.max(1)
        }
    }
}

/// L2-normalises rows: `x / max(||x||, 1e-12)` (torch's `F.normalize`).
pub fn normalize(x: &Tensor) -> candle_core::Result<Tensor> {
    let norm = x
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .sqrt()?
        .clamp(1e-12, f64::MAX)?;
    x.broadcast_div(&norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn data() -> (Tensor, Tensor) {
        let dev = Device::Cpu;
        let h = Tensor::new(&[[[1f32, 2.], [3., -4.], [100., 100.]]], &dev).unwrap();
        let m = Tensor::new(&[[1f32, 1., 0.]], &dev).unwrap();
        (h, m)
    }

    #[test]
    fn mean_cls_max_ignore_padding() {
        let (h, m) = data();
        let mean: Vec<Vec<f32>> = pool(&h, &m, Pooling::Mean).unwrap().to_vec2().unwrap();
        assert_eq!(mean, vec![vec![2., -1.]]);
        let cls: Vec<Vec<f32>> = pool(&h, &m, Pooling::Cls).unwrap().to_vec2().unwrap();
        assert_eq!(cls, vec![vec![1., 2.]]);
        let max: Vec<Vec<f32>> = pool(&h, &m, Pooling::Max).unwrap().to_vec2().unwrap();
        assert_eq!(max, vec![vec![3., 2.]]);
    }

    #[test]
    fn normalize_gives_unit_rows() {
        let x = Tensor::new(&[[3f32, 4.], [0., 0.]], &Device::Cpu).unwrap();
        let n: Vec<Vec<f32>> = normalize(&x).unwrap().to_vec2().unwrap();
        assert_eq!(n, vec![vec![0.6, 0.8], vec![0., 0.]]);
    }
}
