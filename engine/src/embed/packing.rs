//! Packed token layout: the real tokens of a padded (batch, tokens) batch, text after text, with
//! no padding between them.
//!
//! Every op of the encoder but attention works token by token, and attention never lets a real
//! token read a padding one, so the padding positions of a batch change nothing a real token
//! sees. A batch of 32 texts padded to its longest is about a quarter padding at 128 tokens and a
//! third at 256 (the debfaq training pairs); on the packed layout the CPU encoder skips that work,
//! forward and backward, and attention runs on each text's own square instead of the longest
//! one's. Token states go back to the padded layout (zeros at padding) at the end.

use candle_core::{DType, Device, Result, Tensor};

/// Where the real tokens of a padded batch go in the packed layout.
#[derive(Debug, Clone)]
pub(crate) struct Packing {
    batch: usize,
    tokens: usize,
    /// Flat (text * tokens + position) index of every real token, in packed order.
    rows: Vec<u32>,
    /// `rows` as a tensor on the mask's device (the index of every gather and of the unpack).
    rows_tensor: Tensor,
    /// First packed row and number of real tokens of each text.
    seqs: Vec<(usize, usize)>,
}

impl Packing {
    /// The packing of an attention mask (batch, tokens) of 1.0 for real tokens, 0.0 for padding.
    /// Real tokens need not be a prefix: each text's tokens keep their order and positions.
    pub(crate) fn from_mask(mask: &Tensor) -> Result<Self> {
        let (batch, tokens) = mask.dims2()?;
        let values: Vec<f32> = mask.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let mut rows = Vec::with_capacity(values.len());
        let mut seqs = Vec::with_capacity(batch);
        for (text, row) in values.chunks(tokens.max(1)).enumerate().take(batch) {
            let start = rows.len();
            let real = row.iter().enumerate().filter(|(_, m)| **m > 0.5);
            rows.extend(real.map(|(pos, _)| (text * tokens + pos) as u32));
            seqs.push((start, rows.len() - start));
        }
        let rows_tensor = Tensor::from_slice(&rows, rows.len(), mask.device())?;
        Ok(Self {
            batch,
            tokens,
            rows,
            rows_tensor,
            seqs,
        })
    }

    /// First packed row and number of real tokens of each text.
    pub(crate) fn seqs(&self) -> &[(usize, usize)] {
        &self.seqs
    }

    /// The real entries of a (batch, tokens, ...) tensor, packed: (batch, tokens) ids give
    /// (real), (batch, tokens, hidden) states give (real, hidden).
    pub(crate) fn gather(&self, t: &Tensor) -> Result<Tensor> {
        t.flatten(0, 1)?.index_select(&self.rows_tensor, 0)
    }

    /// The position of every real token within its text (u32, shape (real)).
    pub(crate) fn positions(&self, device: &Device) -> Result<Tensor> {
        let pos: Vec<u32> = self
            .rows
            .iter()
            .map(|r| r % self.tokens.max(1) as u32)
            .collect();
        Tensor::from_vec(pos, self.rows.len(), device)
    }

    /// Packed token states (real, hidden) back in the padded layout (batch, tokens, hidden),
    /// zeros at padding. Differentiable: the gradient of each real row is its padded row's.
    pub(crate) fn unpack(&self, x: &Tensor) -> Result<Tensor> {
        let hidden = x.dim(1)?;
        let padded = Tensor::zeros((self.batch * self.tokens, hidden), x.dtype(), x.device())?;
        padded
            .index_add(&self.rows_tensor, x, 0)?
            .reshape((self.batch, self.tokens, hidden))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn real_tokens_pack_text_after_text_and_unpack_to_their_places() {
        let dev = Device::Cpu;
        // Text 0 has three real tokens, text 1 two, text 2 none; text 1's padding is in front.
        let mask = Tensor::new(
            &[[1f32, 1., 1., 0.], [0., 0., 1., 1.], [0., 0., 0., 0.]],
            &dev,
        )
        .unwrap();
        let p = Packing::from_mask(&mask).unwrap();
        assert_eq!(p.seqs(), &[(0, 3), (3, 2), (5, 0)]);
        let ids = Tensor::new(&[[10u32, 11, 12, 0], [0, 0, 20, 21], [0, 0, 0, 0]], &dev).unwrap();
        let packed: Vec<u32> = p.gather(&ids).unwrap().to_vec1().unwrap();
        assert_eq!(packed, vec![10, 11, 12, 20, 21]);
        let pos: Vec<u32> = p.positions(&dev).unwrap().to_vec1().unwrap();
        assert_eq!(pos, vec![0, 1, 2, 2, 3]);
        let x = Tensor::arange(1f32, 11., &dev)
            .unwrap()
            .reshape((5, 2))
            .unwrap();
        let padded: Vec<Vec<Vec<f32>>> = p.unpack(&x).unwrap().to_vec3().unwrap();
        assert_eq!(
            padded[0],
            vec![vec![1., 2.], vec![3., 4.], vec![5., 6.], vec![0., 0.]]
        );
        assert_eq!(
            padded[1],
            vec![vec![0., 0.], vec![0., 0.], vec![7., 8.], vec![9., 10.]]
        );
        assert_eq!(padded[2], vec![vec![0., 0.]; 4]);
    }

    #[test]
    fn unpacking_passes_each_rows_gradient_back() {
        let dev = Device::Cpu;
        let mask = Tensor::new(&[[1f32, 0.], [1., 1.]], &dev).unwrap();
        let p = Packing::from_mask(&mask).unwrap();
        let x = candle_core::Var::from_tensor(&Tensor::ones((3, 2), DType::F32, &dev).unwrap())
            .unwrap();
        let w = Tensor::new(&[[[1f32, 2.], [3., 4.]], [[5., 6.], [7., 8.]]], &dev).unwrap();
        let grads = (p.unpack(x.as_tensor()).unwrap() * w)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g: Vec<Vec<f32>> = grads.get(&x).unwrap().to_vec2().unwrap();
        assert_eq!(g, vec![vec![1., 2.], vec![5., 6.], vec![7., 8.]]);
    }
}
