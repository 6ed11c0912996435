//! A fused CPU linear layer `y = x W^T + b` with its own backward.
//!
//! Composed from Candle ops, a linear layer is five graph nodes (reshape, transpose, matmul,
//! broadcast add, reshape), and Candle's backward allocates, zeroes and adds one full-size
//! gradient per node. Here it is one node: the bias is written into the output and the product
//! accumulated onto it; the backward returns dx, dW and db from two products and a column sum.

use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use super::fused::{f32_slice, fused_for, storage_f32};
use super::gemm::{gemm_into, matmul, Dst, Mat};

/// `x W^T + b` over the last dimension of `x`, for `weight` (out, in) and `bias` (out).
pub(crate) fn linear(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    if fused_for(x) {
        return x
            .contiguous()?
            .apply_op3(&weight.contiguous()?, &bias.contiguous()?, LinearOp);
    }
    let (out, inp) = weight.dims2()?;
    let lead: Vec<usize> = x.dims()[..x.rank() - 1].to_vec();
    let x2 = x.reshape(((), inp))?;
    let y = x2.matmul(&weight.t()?)?.broadcast_add(bias)?;
    y.reshape([lead, vec![out]].concat())
}

struct LinearOp;

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "ragd-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, self.name())?;
        let w = f32_slice(s2, l2, self.name())?;
        let b = f32_slice(s3, l3, self.name())?;
        let (out, inp) = l2.shape().dims2()?;
        if b.len() != out || l1.dims().last() != Some(&inp) {
            bail!(
                "linear: input {:?}, weight {:?} and bias {:?} do not fit",
                l1.dims(),
                l2.dims(),
                l3.dims()
            )
        }
        let n = x.len() / inp;
        let mut y: Vec<f32> = Vec::with_capacity(n * out);
        for _ in 0..n {
            y.extend_from_slice(b);
        }
        let dst = Dst {
            ptr: y.as_mut_ptr(),
            len: y.len(),
            offset: 0,
            row_stride: out,
        };
        // SAFETY: `y` is owned here and sized n x out.
        unsafe {
            gemm_into(
                dst,
                Mat::rows(x, n, inp),
                Mat::rows(w, out, inp).t(),
                true,
                true,
            )
        };
        let mut dims = l1.dims().to_vec();
        *dims.last_mut().expect("input has a last dimension") = out;
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (out, inp) = weight.dims2()?;
        let n = x.elem_count() / inp;
        let grad = grad.contiguous()?;
        let (gs, gl) = grad.storage_and_layout();
        let (ws, wl) = weight.storage_and_layout();
        let (xs, xl) = x.storage_and_layout();
        let g = storage_f32(&gs, gl, self.name())?;
        let gm = Mat::rows(g, n, out);
        let dx = matmul(
            gm,
            Mat::rows(storage_f32(&ws, wl, self.name())?, out, inp),
            true,
        );
        let dw = matmul(
            gm.t(),
            Mat::rows(storage_f32(&xs, xl, self.name())?, n, inp),
            true,
        );
        let db = column_sums(g, out);
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(dw, (out, inp), dev)?),
            Some(Tensor::from_vec(db, out, dev)?),
        ))
    }
}

/// Sums of each of the `width` columns of the row-major `data`.
fn column_sums(data: &[f32], width: usize) -> Vec<f32> {
    let mut acc = vec![0f32; width];
    for row in data.chunks_exact(width) {
        for (a, v) in acc.iter_mut().zip(row) {
            *a += v;
        }
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::embed::fused::tests::{compare, max_diff, random, widened};
    use crate::rng::Rng;

    #[test]
    fn linear_matches_composed_ops_with_gradients() {
        let mut rng = Rng::new(5);
        for (lead, inp, out) in [(vec![7], 5, 3), (vec![2, 9], 24, 40)] {
            let x = random(&[lead.clone(), vec![inp]].concat(), &mut rng, 1.0);
            let w = random(&[out, inp], &mut rng, 0.5);
            let b = random(&[out], &mut rng, 0.5);
            let composed = |t: &[Tensor]| {
                let x2 = t[0].reshape(((), inp))?;
                let y = x2.matmul(&t[1].t()?)?.broadcast_add(&t[2])?;
                y.reshape([lead.clone(), vec![out]].concat())
            };
            compare(&[x, w, b], |t| linear(&t[0], &t[1], &t[2]), composed, 1e-5);
        }
    }

    #[test]
    fn the_composed_path_of_other_devices_gives_the_same_output() {
        // f64 tensors take the composed path (as CUDA and Metal do).
        let mut rng = Rng::new(6);
        let t: Vec<Tensor> = [vec![2, 3, 8], vec![5, 8], vec![5]]
            .iter()
            .map(|s| random(s, &mut rng, 1.0))
            .collect();
        let fused = linear(&t[0], &t[1], &t[2]).unwrap();
        let w = widened(&t);
        let composed = linear(&w[0], &w[1], &w[2]).unwrap();
        assert_eq!(composed.dims(), &[2, 3, 5]);
        let d = max_diff(&fused, &composed);
        assert!(d < 1e-5, "{d}");
    }
}
