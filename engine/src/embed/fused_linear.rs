//! A fused CPU linear layer `y = x W^T + b` with its own backward.
//!
//! Composed from Candle ops, a linear layer is five graph nodes (reshape, transpose, matmul,
//! broadcast add, reshape), and Candle's backward allocates, zeroes and adds one full-size
//! gradient per node. Here it is one node: the bias is written into the output and the product
//! accumulated onto it; the backward returns dx, dW and db from two products and a column sum.
//! BERT's intermediate layer and its GELU are one op too ([`linear_gelu`]).

use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use super::fused::{f32_slice, fused_for, gelu, par_rows, storage_f32, KeptForBackward};
use super::gemm::{gemm_rows, matmul, Mat};
use super::kernels::dispatch;

/// `x W^T + b` over the last dimension of `x`, for `weight` (out, in) and `bias` (out).
pub(crate) fn linear(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    if fused_for(x) {
        return x
            .contiguous()?
            .apply_op3(&weight.contiguous()?, &bias.contiguous()?, LinearOp);
    }
    product(x, weight)?.broadcast_add(bias)
}

/// `x W^T` over the last dimension of `x`, for `weight` (out, in), with no bias: the product
/// overwrites its output, so gemm neither reads back a bias fill nor needs one written first
/// (where a bias follows, the next op adds it on its own pass over the rows; see
/// `layers::Layer::folded`).
pub(crate) fn product(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    if fused_for(x) {
        return x.contiguous()?.apply_op2(&weight.contiguous()?, ProductOp);
    }
    let (out, inp) = weight.dims2()?;
    let lead: Vec<usize> = x.dims()[..x.rank() - 1].to_vec();
    let y = x.reshape(((), inp))?.matmul(&weight.t()?)?;
    y.reshape([lead, vec![out]].concat())
}

struct ProductOp;

impl CustomOp2 for ProductOp {
    fn name(&self) -> &'static str {
        "ragd-product"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (y, shape) = linear_fwd(self.name(), (s1, l1), (s2, l2), None, None)?;
        Ok((CpuStorage::F32(y), shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let (gs, gl) = grad.storage_and_layout();
        let (dx, dw, _) = linear_bwd(self.name(), x, weight, storage_f32(&gs, gl, self.name())?)?;
        Ok((dx, dw))
    }
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
        let (y, shape) = linear_fwd(self.name(), (s1, l1), (s2, l2), Some((s3, l3)), None)?;
        Ok((CpuStorage::F32(y), shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let (gs, gl) = grad.storage_and_layout();
        linear_bwd(self.name(), x, weight, storage_f32(&gs, gl, self.name())?)
    }
}

/// `gelu(x W^T + b)`, BERT's intermediate layer (erf GELU). On the CPU it is one op: GELU runs
/// over the product's output in place, and the pre-activation is kept for the backward only
/// when a gradient can flow, so inference writes one buffer where two ops wrote two.
pub(crate) fn linear_gelu(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    if fused_for(x) {
        let keep = x.track_op() || weight.track_op() || bias.track_op();
        let op = LinearGeluOp {
            pre: KeptForBackward::when(keep),
        };
        return x
            .contiguous()?
            .apply_op3(&weight.contiguous()?, &bias.contiguous()?, op);
    }
    gelu(&linear(x, weight, bias)?)
}

struct LinearGeluOp {
    /// The pre-activation `x W^T + b`, kept for the backward (`None`: no gradient can flow).
    pre: KeptForBackward,
}

impl CustomOp3 for LinearGeluOp {
    fn name(&self) -> &'static str {
        "ragd-linear-gelu"
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
        let (y, shape) = if !self.pre.is_kept() {
            // Inference: GELU adds the bias to each block of rows as soon as it is multiplied.
            let bias = f32_slice(s3, l3, self.name())?;
            let add_bias_gelu = |_: usize, y: &mut [f32]| dispatch!(bias_gelu_inplace(y, bias));
            linear_fwd(
                self.name(),
                (s1, l1),
                (s2, l2),
                Some((s3, l3)),
                Some(&add_bias_gelu),
            )?
        } else {
            // Training: the pre-activation is kept for the backward, GELU goes to a new buffer.
            let (pre, shape) = linear_fwd(self.name(), (s1, l1), (s2, l2), Some((s3, l3)), None)?;
            let mut y = vec![0f32; pre.len()];
            par_rows(&mut y, 1, |r, y| dispatch!(gelu_fwd(&pre[r], y)));
            self.pre.store(pre);
            (y, shape)
        };
        Ok((CpuStorage::F32(y), shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let Some(pre) = self.pre.lock() else {
            bail!("linear-gelu backward without its forward's pre-activation")
        };
        let grad = grad.contiguous()?;
        let (gs, gl) = grad.storage_and_layout();
        let g = storage_f32(&gs, gl, self.name())?;
        // Through the GELU first: the gradient of the pre-activation.
        let mut dy = vec![0f32; pre.len()];
        par_rows(&mut dy, 1, |r, d| {
            dispatch!(gelu_bwd(&pre[r.clone()], &g[r], d))
        });
        linear_bwd(self.name(), x, weight, &dy)
    }
}

/// Work run over a block of a product's rows (the block's first row, its values).
type RowsFinish<'a> = dyn Fn(usize, &mut [f32]) + Sync + 'a;

/// `x W^T + b` into a new buffer (the bias written first, the product accumulated onto it),
/// with the output shape; or, given `add_bias_and`, the bare product with that function run
/// over blocks of rows while they are warm (it adds the bias itself, with whatever follows).
/// Without a bias, the bare product.
fn linear_fwd(
    name: &str,
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
    bias: Option<(&CpuStorage, &Layout)>,
    add_bias_and: Option<&RowsFinish<'_>>,
) -> Result<(Vec<f32>, Shape)> {
    let x = f32_slice(s1, l1, name)?;
    let w = f32_slice(s2, l2, name)?;
    let b = match bias {
        Some((s3, l3)) => Some(f32_slice(s3, l3, name)?),
        None => None,
    };
    let (out, inp) = l2.shape().dims2()?;
    if b.is_some_and(|b| b.len() != out) || l1.dims().last() != Some(&inp) {
        bail!(
            "linear: input {:?}, weight {:?} and bias {:?} do not fit",
            l1.dims(),
            l2.dims(),
            bias.map(|(_, l3)| l3.dims())
        )
    }
    let n = x.len() / inp;
    let mut y: Vec<f32> = Vec::with_capacity(n * out);
    let (x, w) = (Mat::rows(x, n, inp), Mat::rows(w, out, inp).t());
    let spare = &mut y.spare_capacity_mut()[..n * out];
    match add_bias_and {
        Some(finish) => gemm_rows(spare, x, w, None, finish),
        None => gemm_rows(spare, x, w, b, |_, _| {}),
    }
    // SAFETY: `gemm_rows` wrote every one of the n x out values.
    unsafe { y.set_len(n * out) };
    let mut dims = l1.dims().to_vec();
    *dims.last_mut().expect("input has a last dimension") = out;
    Ok((y, Shape::from(dims)))
}

/// dx, dW and db of `x W^T + b` given `g`, the gradient of its output (row-major, n x out).
fn linear_bwd(
    name: &str,
    x: &Tensor,
    weight: &Tensor,
    g: &[f32],
) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    let (out, inp) = weight.dims2()?;
    let n = x.elem_count() / inp;
    let (ws, wl) = weight.storage_and_layout();
    let (xs, xl) = x.storage_and_layout();
    let gm = Mat::rows(g, n, out);
    let dx = matmul(gm, Mat::rows(storage_f32(&ws, wl, name)?, out, inp), true);
    let dw = matmul(gm.t(), Mat::rows(storage_f32(&xs, xl, name)?, n, inp), true);
    let db = column_sums(g, out);
    let dev = x.device();
    Ok((
        Some(Tensor::from_vec(dx, x.shape(), dev)?),
        Some(Tensor::from_vec(dw, (out, inp), dev)?),
        Some(Tensor::from_vec(db, out, dev)?),
    ))
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
    fn linear_gelu_matches_composed_ops_with_gradients_and_without_them() {
        let mut rng = Rng::new(7);
        let (lead, inp, out) = (vec![3, 5], 16, 24);
        let x = random(&[lead.clone(), vec![inp]].concat(), &mut rng, 1.0);
        let w = random(&[out, inp], &mut rng, 0.5);
        let b = random(&[out], &mut rng, 0.5);
        let composed = |t: &[Tensor]| {
            let x2 = t[0].reshape(((), inp))?;
            let y = x2.matmul(&t[1].t()?)?.broadcast_add(&t[2])?;
            y.reshape([lead.clone(), vec![out]].concat())?.gelu_erf()
        };
        let inputs = [x, w, b];
        compare(
            &inputs,
            |t| linear_gelu(&t[0], &t[1], &t[2]),
            composed,
            1e-5,
        );
        // Plain tensors (inference): GELU in place, the same values.
        let fused = linear_gelu(&inputs[0], &inputs[1], &inputs[2]).unwrap();
        let d = max_diff(&fused, &composed(&inputs).unwrap());
        assert!(d < 1e-5, "{d}");
    }

    #[test]
    fn product_matches_composed_ops_with_gradients() {
        let mut rng = Rng::new(8);
        let (lead, inp, out) = (vec![4, 6], 24, 40);
        let x = random(&[lead.clone(), vec![inp]].concat(), &mut rng, 1.0);
        let w = random(&[out, inp], &mut rng, 0.5);
        let composed = |t: &[Tensor]| {
            let y = t[0].reshape(((), inp))?.matmul(&t[1].t()?)?;
            y.reshape([lead.clone(), vec![out]].concat())
        };
        compare(&[x, w], |t| product(&t[0], &t[1]), composed, 1e-5);
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
