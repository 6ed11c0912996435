//! Fused CPU ops with their own backward pass: layer normalisation and GELU (erf); shared helpers
//! of the fused linear and attention ops.
//!
//! Built from Candle's element-wise ops, each of these is five to ten passes over memory and as
//! many fresh buffers, forward and again backward; here each is one Candle custom op whose
//! backward is another (see `shared/notes/candle.md`: candle-nn's fused layer norm and softmax
//! have no backward). On other devices or dtypes the composed, differentiable form runs instead.

use std::ops::Range;
use std::sync::{Mutex, MutexGuard};

use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, D,
};

use super::kernels::dispatch;

/// Whether the fused CPU kernels serve `t`.
pub(crate) fn fused_for(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32
}

/// The contiguous `f32` data of a CPU tensor.
pub(crate) fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        bail!("{op}: expected f32 data")
    };
    let Some((start, end)) = l.contiguous_offsets() else {
        bail!("{op}: expected a contiguous tensor")
    };
    Ok(&v[start..end])
}

/// The contiguous `f32` data behind a CPU tensor's storage guard (from `storage_and_layout`).
pub(crate) fn storage_f32<'a>(
    storage: &'a candle_core::Storage,
    layout: &Layout,
    op: &str,
) -> Result<&'a [f32]> {
    let candle_core::Storage::Cpu(cpu) = storage else {
        bail!("{op}: expected a CPU tensor")
    };
    f32_slice(cpu, layout, op)
}

/// A buffer a fused op's forward keeps for its backward, held only when a gradient can flow
/// (inference keeps nothing).
pub(crate) struct KeptForBackward(Option<Mutex<Option<Vec<f32>>>>);

impl KeptForBackward {
    /// A slot that keeps its buffer when `keep` (some input tracks gradients).
    pub(crate) fn when(keep: bool) -> Self {
        Self(keep.then(|| Mutex::new(None)))
    }

    /// Whether the forward must produce the buffer.
    pub(crate) fn is_kept(&self) -> bool {
        self.0.is_some()
    }

    /// Keeps `buffer` for the backward (dropped when nothing is kept).
    pub(crate) fn store(&self, buffer: Vec<f32>) {
        if let Some(slot) = &self.0 {
            *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(buffer);
        }
    }

    /// The kept buffer, locked, or `None` when nothing was kept or stored.
    pub(crate) fn lock(&self) -> Option<KeptGuard<'_>> {
        let guard = self.0.as_ref()?.lock().unwrap_or_else(|e| e.into_inner());
        guard.is_some().then_some(KeptGuard(guard))
    }
}

/// The locked buffer of a [`KeptForBackward`].
pub(crate) struct KeptGuard<'a>(MutexGuard<'a, Option<Vec<f32>>>);

impl std::ops::Deref for KeptGuard<'_> {
    type Target = [f32];

    fn deref(&self) -> &[f32] {
        self.0.as_deref().unwrap_or_default()
    }
}

/// A raw pointer into an output buffer that pool threads write disjoint parts of.
#[derive(Clone, Copy)]
pub(crate) struct OutPtr(pub(crate) *mut f32);
// SAFETY: every user hands each thread a disjoint range of the buffer (see `par_rows`).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// The pointer (a method, so that closures capture the whole `Sync` wrapper).
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }

    /// The `len` values from `start`.
    ///
    /// # Safety
    /// The range must lie in the buffer and no other live slice may overlap it.
    pub(crate) unsafe fn slice(self, start: usize, len: usize) -> &'static mut [f32] {
        std::slice::from_raw_parts_mut(self.0.add(start), len)
    }
}

/// Calls `f(rows, out_rows)` for chunks of the `width`-wide rows of `out` on Candle's CPU thread
/// pool, each chunk with its own part of `out`.
pub(crate) fn par_rows(out: &mut [f32], width: usize, f: impl Fn(Range<usize>, &mut [f32]) + Sync) {
    let rows = out.len() / width;
    let ptr = OutPtr(out.as_mut_ptr());
    candle_core::utils::barrier_pool().execute_chunked(rows, |r| {
        // SAFETY: the pool hands out disjoint row ranges of `out`, which outlives the call.
        let part = unsafe { ptr.slice(r.start * width, r.len() * width) };
        f(r, part)
    });
}

/// Layer normalisation of `x` over its last dimension with weight `gamma` and bias `beta`.
pub(crate) fn layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    if fused_for(x) {
        return x
            .contiguous()?
            .apply_op3(gamma, beta, LayerNormOp { eps: eps as f32 });
    }
    layer_norm_composed(x, gamma, beta, eps)
}

/// Layer normalisation from differentiable element-wise ops (any device).
pub(crate) fn layer_norm_composed(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let xn = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
    xn.broadcast_mul(gamma)?.broadcast_add(beta)
}

/// GELU with the exact erf form (BERT's `gelu`).
pub(crate) fn gelu(x: &Tensor) -> Result<Tensor> {
    if fused_for(x) {
        return x.contiguous()?.apply_op1(GeluOp);
    }
    x.gelu_erf()
}

/// Softmax over the last dimension from differentiable ops (the max shift is a constant).
pub(crate) fn softmax_composed(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let s = e.sum_keepdim(D::Minus1)?;
    e.broadcast_div(&s)
}

struct LayerNormOp {
    eps: f32,
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "ragd-layer-norm"
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
        let gamma = f32_slice(s2, l2, self.name())?;
        let beta = f32_slice(s3, l3, self.name())?;
        let h = gamma.len();
        if beta.len() != h || l1.dims().last() != Some(&h) {
            bail!("layer norm: width {h} does not fit input {:?}", l1.dims())
        }
        let mut y = vec![0f32; x.len()];
        par_rows(&mut y, h, |r, y| {
            let x = &x[r.start * h..r.end * h];
            dispatch!(layer_norm_fwd(x, gamma, beta, self.eps, y))
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let h = gamma.elem_count();
        let n = x.elem_count() / h;
        // One pass gives all three: rows 0..n are dx, row n is dgamma, row n + 1 is dbeta.
        let packed = x.apply_op3_no_bwd(
            gamma,
            &grad.contiguous()?,
            &LayerNormBwdOp { eps: self.eps },
        )?;
        let dx = packed.narrow(0, 0, n)?.reshape(x.shape())?;
        let dgamma = packed.narrow(0, n, 1)?.reshape(h)?;
        let dbeta = packed.narrow(0, n + 1, 1)?.reshape(h)?;
        Ok((Some(dx), Some(dgamma), Some(dbeta)))
    }
}

/// Row blocks whose weight-gradient partial sums are added in a fixed order, so that results do
/// not depend on the number of threads.
const LN_BWD_BLOCKS: usize = 32;

struct LayerNormBwdOp {
    eps: f32,
}

impl CustomOp3 for LayerNormBwdOp {
    fn name(&self) -> &'static str {
        "ragd-layer-norm-bwd"
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
        let gamma = f32_slice(s2, l2, self.name())?;
        let g = f32_slice(s3, l3, self.name())?;
        let h = gamma.len();
        let n = x.len() / h;
        let blocks = LN_BWD_BLOCKS.min(n.max(1));
        let mut out = vec![0f32; (n + 2) * h];
        let mut partial = vec![0f32; blocks * 2 * h];
        let (dx_ptr, part_ptr) = (OutPtr(out.as_mut_ptr()), OutPtr(partial.as_mut_ptr()));
        candle_core::utils::barrier_pool().execute_chunked(blocks, |bs| {
            for k in bs {
                let rows = k * n / blocks..(k + 1) * n / blocks;
                let span = rows.start * h..rows.end * h;
                // SAFETY: blocks cover disjoint rows of `out` and own slot k of `partial`.
                let dx = unsafe { dx_ptr.slice(span.start, span.len()) };
                let acc = unsafe { part_ptr.slice(k * 2 * h, 2 * h) };
                let (dgamma, dbeta) = acc.split_at_mut(h);
                let (x, g) = (&x[span.clone()], &g[span]);
                dispatch!(layer_norm_bwd(x, gamma, g, self.eps, dx, dgamma, dbeta));
            }
        });
        let (_, tail) = out.split_at_mut(n * h);
        for acc in partial.chunks_exact(2 * h) {
            for (t, a) in tail.iter_mut().zip(acc) {
                *t += a;
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((n + 2, h))))
    }
}

struct GeluOp;

impl CustomOp1 for GeluOp {
    fn name(&self) -> &'static str {
        "ragd-gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, self.name())?;
        let mut y = vec![0f32; x.len()];
        par_rows(&mut y, 1, |r, y| dispatch!(gelu_fwd(&x[r], y)));
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&grad.contiguous()?, &GeluBwdOp)?))
    }
}

struct GeluBwdOp;

impl CustomOp2 for GeluBwdOp {
    fn name(&self) -> &'static str {
        "ragd-gelu-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, self.name())?;
        let g = f32_slice(s2, l2, self.name())?;
        let mut dx = vec![0f32; x.len()];
        par_rows(&mut dx, 1, |r, dx| {
            dispatch!(gelu_bwd(&x[r.clone()], &g[r], dx))
        });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::rng::Rng;
    use candle_core::{Device, Var};

    pub(crate) fn random(shape: &[usize], rng: &mut Rng, scale: f64) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| (rng.normal() * scale) as f32).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// Largest absolute difference between two tensors of any float dtype.
    pub(crate) fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        let f = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
        let d: f64 = (f(a) - f(b))
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap();
        d as f32
    }

    /// The tensors in f64: CPU ops on them take the composed path, as CUDA and Metal do.
    pub(crate) fn widened(ts: &[Tensor]) -> Vec<Tensor> {
        ts.iter().map(|t| t.to_dtype(DType::F64).unwrap()).collect()
    }

    /// Forward values and the gradients of `sum(y * w)` for every input, fused vs composed.
    pub(crate) fn compare(
        inputs: &[Tensor],
        fused: impl Fn(&[Tensor]) -> Result<Tensor>,
        composed: impl Fn(&[Tensor]) -> Result<Tensor>,
        tol: f32,
    ) {
        let mut rng = Rng::new(11);
        let run = |f: &dyn Fn(&[Tensor]) -> Result<Tensor>, w: &Tensor| {
            let vars: Vec<Var> = inputs
                .iter()
                .map(|t| Var::from_tensor(t).unwrap())
                .collect();
            let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
            let y = f(&ts).unwrap();
            let grads = (&y * w).unwrap().sum_all().unwrap().backward().unwrap();
            let g: Vec<Tensor> = vars
                .iter()
                .map(|v| grads.get(v).expect("every input gets a gradient").clone())
                .collect();
            (y, g)
        };
        let shape = composed(inputs).unwrap().dims().to_vec();
        let w = random(&shape, &mut rng, 1.0);
        let (y1, g1) = run(&fused, &w);
        let (y2, g2) = run(&composed, &w);
        assert!(max_diff(&y1, &y2) < tol, "forward differs");
        for (i, (a, b)) in g1.iter().zip(&g2).enumerate() {
            let d = max_diff(a, b);
            assert!(d < tol, "gradient of input {i} differs by {d}");
        }
    }

    #[test]
    fn layer_norm_matches_composed_ops_with_gradients() {
        let mut rng = Rng::new(1);
        for (rows, h) in [(7, 13), (70, 40), (3, 384)] {
            let x = (random(&[rows, h], &mut rng, 2.0) + 0.5).unwrap();
            let gamma = (random(&[h], &mut rng, 0.3) + 1.0).unwrap();
            let beta = random(&[h], &mut rng, 0.3);
            compare(
                &[x, gamma, beta],
                |t| layer_norm(&t[0], &t[1], &t[2], 1e-12),
                |t| layer_norm_composed(&t[0], &t[1], &t[2], 1e-12),
                2e-5,
            );
        }
    }

    #[test]
    fn gelu_matches_erf_gelu_with_gradient() {
        let x = random(&[5, 37], &mut Rng::new(2), 3.0);
        compare(&[x], |t| gelu(&t[0]), |t| t[0].gelu_erf(), 1e-6);
    }

    #[test]
    fn non_contiguous_inputs_are_accepted() {
        let x = random(&[6, 4], &mut Rng::new(4), 1.0).t().unwrap();
        let (gamma, beta) = (
            Tensor::ones(6, DType::F32, &Device::Cpu).unwrap(),
            Tensor::zeros(6, DType::F32, &Device::Cpu).unwrap(),
        );
        let a = layer_norm(&x, &gamma, &beta, 1e-12).unwrap();
        let b = layer_norm_composed(&x, &gamma, &beta, 1e-12).unwrap();
        assert!(max_diff(&a, &b) < 1e-5);
        assert!(max_diff(&gelu(&x).unwrap(), &x.gelu_erf().unwrap()) < 1e-6);
    }
}
