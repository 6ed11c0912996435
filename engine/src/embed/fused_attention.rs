//! Fused CPU self-attention: `softmax(scale Q K^T + mask)` (with dropout) times `V`, per head,
//! reading the heads straight out of the (batch, tokens, hidden) projections.
//!
//! Composed from Candle ops this is about a dozen graph nodes per layer (head reshapes and
//! transposes with their copies, two batched products of tiny per-head matrices each threaded
//! on its own, the softmax, a dropout mask the size of the score tensor), and Candle's backward
//! adds a zeroed full-size gradient for each. Here it is one node: heads are spread over the
//! thread pool, each multiplies its own small matrices single-threaded, the probabilities are
//! kept for the backward and dropout masks are regenerated there from a seed.

use std::sync::Mutex;

use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use super::dropout::Dropout;
use super::fused::{f32_slice, fused_for, softmax_composed, storage_f32, OutPtr};
use super::gemm::{gemm_into, Dst, Mat};
use super::kernels::dispatch;
use crate::rng::Rng;

/// Multi-head attention over `q`, `k`, `v` (batch, tokens, hidden) with `bias` (batch, tokens):
/// 0 for real tokens, a large negative number for padding. Returns the context (batch, tokens,
/// hidden), heads side by side.
pub(crate) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
    heads: usize,
    dropout: f64,
    drop: &mut Dropout<'_>,
) -> Result<Tensor> {
    let (b, l, hidden) = q.dims3()?;
    let head_dim = hidden / heads;
    let scale = 1.0 / (head_dim as f64).sqrt();
    if fused_for(q) {
        let op = AttentionOp {
            heads,
            scale: scale as f32,
            bias: bias.flatten_all()?.to_vec1()?,
            dropout: drop.seed(dropout).map(|seed| (dropout as f32, seed)),
            probs: Mutex::new(None),
        };
        return q
            .contiguous()?
            .apply_op3(&k.contiguous()?, &v.contiguous()?, op);
    }
    let split = |t: &Tensor| {
        t.reshape((b, l, heads, head_dim))?
            .transpose(1, 2)?
            .contiguous()
    };
    let (q, k, v) = (split(q)?, split(k)?, split(v)?);
    let scores = q.matmul(&k.t()?)?;
    let logits = (scores * scale)?.broadcast_add(&bias.reshape((b, 1, 1, l))?)?;
    let probs = drop.apply(&softmax_composed(&logits)?, dropout)?;
    probs
        .matmul(&v)?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((b, l, hidden))
}

struct AttentionOp {
    heads: usize,
    scale: f32,
    /// Mask bias, batch x tokens.
    bias: Vec<f32>,
    /// Drop probability and mask seed, when dropout is on.
    dropout: Option<(f32, u64)>,
    /// Softmax probabilities (before dropout) of every head, kept for the backward.
    probs: Mutex<Option<Vec<f32>>>,
}

/// Shapes of one call: batch, tokens, hidden, heads, head width.
#[derive(Clone, Copy)]
struct Dims {
    batch: usize,
    tokens: usize,
    hidden: usize,
    heads: usize,
    head_dim: usize,
}

impl Dims {
    /// Head `item % heads` of batch row `item / heads` in a (batch, tokens, hidden) buffer.
    fn head<'a>(&self, data: &'a [f32], item: usize) -> Mat<'a> {
        Mat::new(
            data,
            self.head_offset(item),
            (self.tokens, self.head_dim),
            (self.hidden, 1),
        )
    }

    fn head_offset(&self, item: usize) -> usize {
        let (i, h) = (item / self.heads, item % self.heads);
        i * self.tokens * self.hidden + h * self.head_dim
    }

    /// The destination block of one head in a (batch, tokens, hidden) buffer.
    fn head_dst(&self, ptr: OutPtr, item: usize) -> Dst {
        Dst {
            ptr: ptr.get(),
            len: self.batch * self.tokens * self.hidden,
            offset: self.head_offset(item),
            row_stride: self.hidden,
        }
    }

    fn square(&self) -> usize {
        self.tokens * self.tokens
    }
}

/// A (tokens x tokens) scratch matrix as a destination.
fn scratch_dst(buf: &mut [f32], tokens: usize) -> Dst {
    Dst {
        ptr: buf.as_mut_ptr(),
        len: buf.len(),
        offset: 0,
        row_stride: tokens,
    }
}

/// The inverted-dropout factors (0 or 1 / (1 - rate)) of one head's probabilities.
fn dropout_factors(out: &mut [f32], rate: f32, seed: u64, item: usize) {
    let mut rng = Rng::new(seed ^ (item as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let keep = 1.0 / (1.0 - rate);
    let threshold = (rate as f64 * (1u64 << 32) as f64) as u64;
    for pair in out.chunks_mut(2) {
        let r = rng.next_u64();
        for (v, half) in pair.iter_mut().zip([r & 0xFFFF_FFFF, r >> 32]) {
            *v = if half < threshold { 0.0 } else { keep };
        }
    }
}

impl AttentionOp {
    fn dims(&self, l1: &Layout, l2: &Layout, l3: &Layout) -> Result<Dims> {
        let (batch, tokens, hidden) = l1.shape().dims3()?;
        if l2.dims() != l1.dims() || l3.dims() != l1.dims() || hidden % self.heads != 0 {
            bail!(
                "attention: q {:?}, k {:?}, v {:?} do not fit {} heads",
                l1.dims(),
                l2.dims(),
                l3.dims(),
                self.heads
            )
        }
        if self.bias.len() != batch * tokens {
            bail!(
                "attention: mask has {} values for {batch} x {tokens}",
                self.bias.len()
            )
        }
        Ok(Dims {
            batch,
            tokens,
            hidden,
            heads: self.heads,
            head_dim: hidden / self.heads,
        })
    }
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "ragd-attention"
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
        let d = self.dims(l1, l2, l3)?;
        let (q, k, v) = (
            f32_slice(s1, l1, self.name())?,
            f32_slice(s2, l2, self.name())?,
            f32_slice(s3, l3, self.name())?,
        );
        let n = d.square();
        let mut out = vec![0f32; q.len()];
        let mut probs = vec![0f32; d.batch * d.heads * n];
        let (out_ptr, probs_ptr) = (OutPtr(out.as_mut_ptr()), OutPtr(probs.as_mut_ptr()));
        candle_core::utils::barrier_pool().execute_chunked(d.batch * d.heads, |items| {
            let mut scores = vec![0f32; n];
            for item in items {
                let bias = &self.bias[(item / d.heads) * d.tokens..][..d.tokens];
                let (qh, kh) = (d.head(q, item), d.head(k, item));
                // SAFETY (all blocks below): every item owns its slice of `probs` and its head
                // block of `out`; `scores` is this thread's own.
                unsafe { gemm_into(scratch_dst(&mut scores, d.tokens), qh, kh.t(), false, false) };
                let p = unsafe { probs_ptr.slice(item * n, n) };
                dispatch!(softmax_fwd(&scores, bias, self.scale, p));
                let kept: &[f32] = match self.dropout {
                    Some((rate, seed)) => {
                        dropout_factors(&mut scores, rate, seed, item);
                        for (s, p) in scores.iter_mut().zip(p.iter()) {
                            *s *= p;
                        }
                        &scores
                    }
                    None => p,
                };
                let pm = Mat::rows(kept, d.tokens, d.tokens);
                unsafe { gemm_into(d.head_dst(out_ptr, item), pm, d.head(v, item), false, false) };
            }
        });
        *self.probs.lock().unwrap_or_else(|e| e.into_inner()) = Some(probs);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let guard = self.probs.lock().unwrap_or_else(|e| e.into_inner());
        let Some(probs) = guard.as_ref() else {
            bail!("attention backward before its forward")
        };
        let d = self.dims(q.layout(), k.layout(), v.layout())?;
        let grad = grad.contiguous()?;
        let n = d.square();
        let mut dq = vec![0f32; q.elem_count()];
        let mut dk = vec![0f32; q.elem_count()];
        let mut dv = vec![0f32; q.elem_count()];
        let ptrs = [dq.as_mut_ptr(), dk.as_mut_ptr(), dv.as_mut_ptr()].map(OutPtr);
        let (gs, gl) = grad.storage_and_layout();
        let (qs, ql) = q.storage_and_layout();
        let (ks, kl) = k.storage_and_layout();
        let (vs, vl) = v.storage_and_layout();
        let ctx = BwdInputs {
            d,
            g: storage_f32(&gs, gl, self.name())?,
            q: storage_f32(&qs, ql, self.name())?,
            k: storage_f32(&ks, kl, self.name())?,
            v: storage_f32(&vs, vl, self.name())?,
            probs,
        };
        candle_core::utils::barrier_pool().execute_chunked(d.batch * d.heads, |items| {
            let mut a = vec![0f32; n];
            let mut b = vec![0f32; n];
            let mut f = vec![0f32; if self.dropout.is_some() { n } else { 0 }];
            for item in items {
                // SAFETY: each item writes only its own head blocks.
                unsafe { self.head_bwd(&ctx, item, ptrs, [&mut a, &mut b, &mut f]) };
            }
        });
        let dev = q.device();
        let t = |data: Vec<f32>| Tensor::from_vec(data, q.shape(), dev);
        Ok((Some(t(dq)?), Some(t(dk)?), Some(t(dv)?)))
    }
}

/// What the backward of every head reads.
struct BwdInputs<'a> {
    d: Dims,
    g: &'a [f32],
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    probs: &'a [f32],
}

impl AttentionOp {
    /// Gradients of one head into its blocks of dq, dk, dv (`out`), with three scratch
    /// (tokens x tokens) buffers (the third only with dropout).
    ///
    /// # Safety
    /// `out` must point to (batch, tokens, hidden) buffers whose head `item` blocks no other
    /// thread touches meanwhile.
    unsafe fn head_bwd(
        &self,
        c: &BwdInputs<'_>,
        item: usize,
        out: [OutPtr; 3],
        [a, b, factors]: [&mut Vec<f32>; 3],
    ) {
        let d = c.d;
        let n = d.square();
        let p = &c.probs[item * n..][..n];
        let gh = d.head(c.g, item);
        // The probabilities the forward multiplied V by (after dropout), in `a`.
        let kept: &[f32] = match self.dropout {
            Some((rate, seed)) => {
                dropout_factors(factors, rate, seed, item);
                for ((a, p), f) in a.iter_mut().zip(p).zip(factors.iter()) {
                    *a = p * f;
                }
                a
            }
            None => p,
        };
        // dV = P_kept^T dO
        let pm = Mat::rows(kept, d.tokens, d.tokens);
        gemm_into(d.head_dst(out[2], item), pm.t(), gh, false, false);
        // dP_kept = dO V^T, then through the dropout factors, in `b`.
        gemm_into(
            scratch_dst(b, d.tokens),
            gh,
            d.head(c.v, item).t(),
            false,
            false,
        );
        if self.dropout.is_some() {
            for (b, f) in b.iter_mut().zip(factors.iter()) {
                *b *= f;
            }
        }
        // dS = scale * P * (dP - <dP, P>), in `a`.
        dispatch!(softmax_bwd(p, b, self.scale, d.tokens, a));
        let ds = Mat::rows(a, d.tokens, d.tokens);
        gemm_into(
            d.head_dst(out[0], item),
            ds,
            d.head(c.k, item),
            false,
            false,
        );
        gemm_into(
            d.head_dst(out[1], item),
            ds.t(),
            d.head(c.q, item),
            false,
            false,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::embed::fused::tests::{compare, max_diff, random, widened};
    use candle_core::Device;

    /// Batch, tokens, hidden, heads of the test inputs.
    const B: usize = 2;
    const L: usize = 7;
    const H: usize = 12;
    const HEADS: usize = 3;

    /// Random q, k, v (B, L, H) and a mask bias whose first row pads its last three tokens.
    fn inputs(seed: u64) -> (Vec<Tensor>, Tensor) {
        let mut rng = Rng::new(seed);
        let qkv = (0..3).map(|_| random(&[B, L, H], &mut rng, 1.0)).collect();
        let mut m = vec![0f32; B * L];
        for v in &mut m[4..L] {
            *v = -10000.0;
        }
        (qkv, Tensor::from_vec(m, (B, L), &Device::Cpu).unwrap())
    }

    #[test]
    fn attention_matches_composed_ops_with_gradients() {
        let (inputs, bias) = inputs(9);
        let (b, l, h, heads) = (B, L, H, HEADS);
        let composed = |t: &[Tensor]| {
            let split = |x: &Tensor| {
                x.reshape((b, l, heads, h / heads))?
                    .transpose(1, 2)?
                    .contiguous()
            };
            let (q, k, v) = (split(&t[0])?, split(&t[1])?, split(&t[2])?);
            let s = (q.matmul(&k.t()?)? * 0.5)?.broadcast_add(&bias.reshape((b, 1, 1, l))?)?;
            let p = crate::embed::fused::softmax_composed(&s)?;
            p.matmul(&v)?
                .transpose(1, 2)?
                .contiguous()?
                .reshape((b, l, h))
        };
        let fused =
            |t: &[Tensor]| attention(&t[0], &t[1], &t[2], &bias, heads, 0.0, &mut Dropout::off());
        compare(&inputs, fused, composed, 1e-5);
    }

    #[test]
    fn the_composed_path_of_other_devices_gives_the_same_context() {
        // f64 tensors take the composed path (as CUDA and Metal do); f32 on CPU the fused one.
        let (inputs, bias) = inputs(12);
        let heads = HEADS;
        let run = |t: &[Tensor], bias: &Tensor| {
            attention(&t[0], &t[1], &t[2], bias, heads, 0.0, &mut Dropout::off()).unwrap()
        };
        let fused = run(&inputs, &bias);
        let wide = widened(&[bias]);
        let composed = run(&widened(&inputs), &wide[0]);
        let d = max_diff(&fused, &composed);
        assert!(d < 1e-5, "{d}");
    }

    #[test]
    fn dropout_masks_are_seeded_and_replayed_in_the_backward() {
        let (inputs, bias) = inputs(10);
        let (b, l, h, heads) = (B, L, H, HEADS);
        // The same seed gives the same output, another seed another one.
        let run = |seed: u64, t: &[Tensor]| {
            let mut r = Rng::new(seed);
            attention(
                &t[0],
                &t[1],
                &t[2],
                &bias,
                heads,
                0.3,
                &mut Dropout(Some(&mut r)),
            )
        };
        let a = run(1, &inputs).unwrap();
        assert_eq!(max_diff(&a, &run(1, &inputs).unwrap()), 0.0);
        assert!(max_diff(&a, &run(2, &inputs).unwrap()) > 1e-3);
        // The backward replays the forward's masks: with the same seed, the analytic gradient
        // matches a finite difference on one input element.
        let w = random(&[b, l, h], &mut Rng::new(11), 1.0);
        let loss = |t: &[Tensor]| -> f32 {
            (run(1, t).unwrap() * &w)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar()
                .unwrap()
        };
        let var = candle_core::Var::from_tensor(&inputs[1]).unwrap();
        let y = run(
            1,
            &[
                inputs[0].clone(),
                var.as_tensor().clone(),
                inputs[2].clone(),
            ],
        )
        .unwrap();
        let grads = (y * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let gk: Vec<f32> = grads
            .get(&var)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let mut flat: Vec<f32> = inputs[1].flatten_all().unwrap().to_vec1().unwrap();
        let idx = 5;
        let eps = 1e-2;
        let mut at = |delta: f32| {
            flat[idx] += delta;
            let t = Tensor::from_vec(flat.clone(), (b, l, h), &Device::Cpu).unwrap();
            flat[idx] -= delta;
            loss(&[inputs[0].clone(), t, inputs[2].clone()])
        };
        let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
        assert!(
            (numeric - gk[idx]).abs() < 2e-2 * (1.0 + numeric.abs()),
            "{numeric} vs {}",
            gk[idx]
        );
    }
}
