//! Fused CPU self-attention on the packed token layout: `softmax(scale Q K^T)` (with dropout)
//! times `V`, per text and head, reading the heads straight out of the (real tokens, hidden)
//! projections; and the composed, padded form other devices run.
//!
//! Composed from Candle ops this is about a dozen graph nodes per layer (head reshapes and
//! transposes with their copies, two batched products of tiny per-head matrices each threaded
//! on its own, the softmax, a dropout mask the size of the score tensor), and Candle's backward
//! adds a zeroed full-size gradient for each. Here it is one node: (text, head) items are spread
//! over the thread pool, each multiplies its own small matrices single-threaded over its text's
//! own tokens (no padding, so no mask), the probabilities are kept for the backward and dropout
//! masks are regenerated there from a seed.

use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use super::dropout::{dropout_factors, Dropout};
use super::fused::{f32_slice, fused_for, softmax_composed, storage_f32, KeptForBackward, OutPtr};
use super::gemm::{gemm_into, Dst, Mat};
use super::kernels::dispatch;
use super::packing::Packing;

/// How the tokens of a batch are laid out.
pub(crate) enum TokenLayout {
    /// (batch, tokens, hidden), with a mask bias (batch, tokens): 0 for real tokens, a large
    /// negative number for padding.
    Padded {
        /// The mask bias.
        bias: Tensor,
    },
    /// (real tokens, hidden): the real tokens of each text, text after text (CPU, f32).
    Packed(Packing),
}

/// Multi-head attention over `q`, `k`, `v` in `layout`. Returns the context in the same layout,
/// heads side by side.
pub(crate) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    layout: &TokenLayout,
    heads: usize,
    dropout: f64,
    drop: &mut Dropout<'_>,
) -> Result<Tensor> {
    let hidden = q.dim(candle_core::D::Minus1)?;
    let scale = 1.0 / ((hidden / heads.max(1)) as f64).sqrt();
    match layout {
        TokenLayout::Packed(packing) if fused_for(q) => {
            let op = AttentionOp {
                heads,
                scale: scale as f32,
                seqs: packing.seqs().to_vec(),
                dropout: drop.seed(dropout).map(|seed| (dropout as f32, seed)),
                probs: KeptForBackward::when(q.track_op() || k.track_op() || v.track_op()),
            };
            q.contiguous()?
                .apply_op3(&k.contiguous()?, &v.contiguous()?, op)
        }
        TokenLayout::Packed(_) => {
            bail!("packed attention runs on the CPU with f32 tensors; use the padded layout")
        }
        TokenLayout::Padded { bias } => {
            attention_padded(q, k, v, bias, heads, scale, dropout, drop)
        }
    }
}

/// The composed, differentiable attention over the padded layout (any device).
#[allow(clippy::too_many_arguments)]
fn attention_padded(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
    heads: usize,
    scale: f64,
    dropout: f64,
    drop: &mut Dropout<'_>,
) -> Result<Tensor> {
    let (b, l, hidden) = q.dims3()?;
    let head_dim = hidden / heads;
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
    /// First packed row and length of each text.
    seqs: Vec<(usize, usize)>,
    /// Drop probability and mask seed, when dropout is on.
    dropout: Option<(f32, u64)>,
    /// Softmax probabilities (before dropout) of every item, kept for the backward (`None`: no
    /// gradient can flow, so each thread reuses one scratch block instead).
    probs: KeptForBackward,
}

/// One unit of work: one head of one text.
#[derive(Clone, Copy)]
struct Item {
    /// The text's first packed row.
    start: usize,
    /// The text's tokens.
    len: usize,
    /// The head.
    head: usize,
    /// Where its (len x len) probabilities start.
    probs_at: usize,
}

/// Shapes of one call.
#[derive(Clone, Copy)]
struct Dims {
    /// Packed rows.
    rows: usize,
    hidden: usize,
    head_dim: usize,
}

impl Dims {
    /// The item's head block (len x head_dim) in a (rows, hidden) buffer.
    fn head<'a>(&self, data: &'a [f32], it: Item) -> Mat<'a> {
        Mat::new(
            data,
            self.head_offset(it),
            (it.len, self.head_dim),
            (self.hidden, 1),
        )
    }

    fn head_offset(&self, it: Item) -> usize {
        it.start * self.hidden + it.head * self.head_dim
    }

    /// The destination block of the item's head in a (rows, hidden) buffer.
    fn head_dst(&self, ptr: OutPtr, it: Item) -> Dst {
        Dst {
            ptr: ptr.get(),
            len: self.rows * self.hidden,
            offset: self.head_offset(it),
            row_stride: self.hidden,
        }
    }
}

/// The first (tokens x tokens) values of a scratch buffer as a destination.
fn scratch_dst(buf: &mut [f32], tokens: usize) -> Dst {
    Dst {
        ptr: buf.as_mut_ptr(),
        len: buf.len(),
        offset: 0,
        row_stride: tokens,
    }
}

impl AttentionOp {
    fn dims(&self, l1: &Layout, l2: &Layout, l3: &Layout) -> Result<Dims> {
        let (rows, hidden) = l1.shape().dims2()?;
        let packed = self.seqs.last().map_or(0, |(s, n)| s + n);
        if l2.dims() != l1.dims() || l3.dims() != l1.dims() || hidden % self.heads != 0 {
            bail!(
                "attention: q {:?}, k {:?}, v {:?} do not fit {} heads",
                l1.dims(),
                l2.dims(),
                l3.dims(),
                self.heads
            )
        }
        if packed != rows {
            bail!("attention: the packing has {packed} tokens but q has {rows} rows")
        }
        Ok(Dims {
            rows,
            hidden,
            head_dim: hidden / self.heads,
        })
    }

    /// Every (text, head) with at least one token, with its probability offset; the size of
    /// the probabilities; the longest text.
    fn items(&self) -> (Vec<Item>, usize, usize) {
        let mut items = Vec::with_capacity(self.seqs.len() * self.heads);
        let mut probs_at = 0;
        for &(start, len) in self.seqs.iter().filter(|(_, len)| *len > 0) {
            for head in 0..self.heads {
                items.push(Item {
                    start,
                    len,
                    head,
                    probs_at,
                });
                probs_at += len * len;
            }
        }
        let longest = self.seqs.iter().map(|s| s.1).max().unwrap_or(0);
        (items, probs_at, longest)
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
        let (items, n_probs, longest) = self.items();
        let zeros = vec![0f32; longest];
        let mut out = vec![0f32; q.len()];
        let keep = self.probs.is_kept();
        let mut probs = vec![0f32; if keep { n_probs } else { 0 }];
        let (out_ptr, probs_ptr) = (OutPtr(out.as_mut_ptr()), OutPtr(probs.as_mut_ptr()));
        candle_core::utils::barrier_pool().execute_chunked(items.len(), |range| {
            let mut scores = vec![0f32; longest * longest];
            let mut own_probs = vec![0f32; if keep { 0 } else { longest * longest }];
            for i in range {
                let it = items[i];
                let n = it.len * it.len;
                let (qh, kh) = (d.head(q, it), d.head(k, it));
                // SAFETY (all blocks below): every item owns its slice of `probs` and its head
                // block of `out`; `scores` and `own_probs` are this thread's own.
                unsafe { gemm_into(scratch_dst(&mut scores, it.len), qh, kh.t(), false, false) };
                let p = if keep {
                    unsafe { probs_ptr.slice(it.probs_at, n) }
                } else {
                    &mut own_probs[..n]
                };
                dispatch!(softmax_fwd(&scores[..n], &zeros[..it.len], self.scale, p));
                let kept: &[f32] = match self.dropout {
                    Some((rate, seed)) => {
                        dropout_factors(&mut scores[..n], rate, seed, i);
                        for (s, p) in scores.iter_mut().zip(p.iter()) {
                            *s *= p;
                        }
                        &scores[..n]
                    }
                    None => p,
                };
                let pm = Mat::rows(kept, it.len, it.len);
                unsafe { gemm_into(d.head_dst(out_ptr, it), pm, d.head(v, it), false, false) };
            }
        });
        self.probs.store(probs);
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
        let Some(probs) = self.probs.lock() else {
            bail!("attention backward before its forward, or without its probabilities")
        };
        let d = self.dims(q.layout(), k.layout(), v.layout())?;
        let grad = grad.contiguous()?;
        let (items, _, longest) = self.items();
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
            probs: &probs,
        };
        let square = longest * longest;
        candle_core::utils::barrier_pool().execute_chunked(items.len(), |range| {
            let mut a = vec![0f32; square];
            let mut b = vec![0f32; square];
            let mut f = vec![0f32; if self.dropout.is_some() { square } else { 0 }];
            for i in range {
                // SAFETY: each item writes only its own head blocks.
                unsafe { self.head_bwd(&ctx, i, items[i], ptrs, [&mut a, &mut b, &mut f]) };
            }
        });
        let dev = q.device();
        let t = |data: Vec<f32>| Tensor::from_vec(data, q.shape(), dev);
        Ok((Some(t(dq)?), Some(t(dk)?), Some(t(dv)?)))
    }
}

/// What the backward of every item reads.
struct BwdInputs<'a> {
    d: Dims,
    g: &'a [f32],
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    probs: &'a [f32],
}

impl AttentionOp {
    /// Gradients of one item (number `index`, which seeds its dropout mask) into its blocks of
    /// dq, dk, dv (`out`), with three scratch buffers of at least len x len values (the third
    /// only with dropout).
    ///
    /// # Safety
    /// `out` must point to (rows, hidden) buffers whose item blocks no other thread touches
    /// meanwhile.
    unsafe fn head_bwd(
        &self,
        c: &BwdInputs<'_>,
        index: usize,
        it: Item,
        out: [OutPtr; 3],
        [a, b, factors]: [&mut Vec<f32>; 3],
    ) {
        let d = c.d;
        let n = it.len * it.len;
        let (a, b) = (&mut a[..n], &mut b[..n]);
        let p = &c.probs[it.probs_at..][..n];
        let gh = d.head(c.g, it);
        // The probabilities the forward multiplied V by (after dropout), in `a`.
        let kept: &[f32] = match self.dropout {
            Some((rate, seed)) => {
                let factors = &mut factors[..n];
                dropout_factors(factors, rate, seed, index);
                for ((a, p), f) in a.iter_mut().zip(p).zip(factors.iter()) {
                    *a = p * f;
                }
                a
            }
            None => p,
        };
        // dV = P_kept^T dO
        let pm = Mat::rows(kept, it.len, it.len);
        gemm_into(d.head_dst(out[2], it), pm.t(), gh, false, false);
        // dP_kept = dO V^T, then through the dropout factors, in `b`.
        gemm_into(
            scratch_dst(b, it.len),
            gh,
            d.head(c.v, it).t(),
            false,
            false,
        );
        if self.dropout.is_some() {
            for (b, f) in b.iter_mut().zip(factors.iter()) {
                *b *= f;
            }
        }
        // dS = scale * P * (dP - <dP, P>), in `a`.
        dispatch!(softmax_bwd(p, b, self.scale, it.len, a));
        let ds = Mat::rows(a, it.len, it.len);
        gemm_into(d.head_dst(out[0], it), ds, d.head(c.k, it), false, false);
        gemm_into(
            d.head_dst(out[1], it),
            ds.t(),
            d.head(c.q, it),
            false,
            false,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::embed::fused::tests::{compare, max_diff, random};
    use crate::rng::Rng;
    use candle_core::Device;

    /// Batch, tokens, hidden, heads of the test inputs.
    const B: usize = 3;
    const L: usize = 7;
    const H: usize = 12;
    const HEADS: usize = 3;

    /// Random q, k, v (B, L, H) and a mask: the first text pads its last three tokens, the
    /// second has none, the third only padding.
    fn inputs(seed: u64) -> (Vec<Tensor>, Tensor) {
        let mut rng = Rng::new(seed);
        let qkv = (0..3).map(|_| random(&[B, L, H], &mut rng, 1.0)).collect();
        let m: Vec<f32> = (0..B * L)
            .map(|i| {
                if (4..L).contains(&i) || i >= 2 * L {
                    0.0
                } else {
                    1.0
                }
            })
            .collect();
        (qkv, Tensor::from_vec(m, (B, L), &Device::Cpu).unwrap())
    }

    #[test]
    fn packed_attention_matches_the_padded_composed_ops_with_gradients() {
        let (inputs, mask) = inputs(9);
        let packing = Packing::from_mask(&mask).unwrap();
        let bias = mask.affine(10000.0, -10000.0).unwrap();
        let real = mask.unsqueeze(2).unwrap();
        let composed = |t: &[Tensor]| {
            let layout = TokenLayout::Padded { bias: bias.clone() };
            let ctx = attention(
                &t[0],
                &t[1],
                &t[2],
                &layout,
                HEADS,
                0.0,
                &mut Dropout::off(),
            )?;
            // Padding rows are zero in the packed result.
            ctx.broadcast_mul(&real)
        };
        let fused = |t: &[Tensor]| {
            let [q, k, v] = [0, 1, 2].map(|i| packing.gather(&t[i]).unwrap());
            let layout = TokenLayout::Packed(packing.clone());
            let ctx = attention(&q, &k, &v, &layout, HEADS, 0.0, &mut Dropout::off())?;
            packing.unpack(&ctx)
        };
        compare(&inputs, fused, composed, 1e-5);
    }

    #[test]
    fn packed_attention_refuses_other_dtypes() {
        let (inputs, mask) = inputs(12);
        let packing = Packing::from_mask(&mask).unwrap();
        let q = packing
            .gather(&inputs[0])
            .unwrap()
            .to_dtype(candle_core::DType::F64)
            .unwrap();
        let layout = TokenLayout::Packed(packing);
        let err = attention(&q, &q, &q, &layout, HEADS, 0.0, &mut Dropout::off()).unwrap_err();
        assert!(err.to_string().contains("padded layout"), "{err}");
    }

    #[test]
    fn dropout_masks_are_seeded_and_replayed_in_the_backward() {
        let (padded, mask) = inputs(10);
        let packing = Packing::from_mask(&mask).unwrap();
        let inputs: Vec<Tensor> = padded.iter().map(|t| packing.gather(t).unwrap()).collect();
        let (rows, h) = inputs[0].dims2().unwrap();
        let layout = TokenLayout::Packed(packing);
        // The same seed gives the same output, another seed another one.
        let run = |seed: u64, t: &[Tensor]| {
            let mut r = Rng::new(seed);
            attention(
                &t[0],
                &t[1],
                &t[2],
                &layout,
                HEADS,
                0.3,
                &mut Dropout(Some(&mut r)),
            )
        };
        let a = run(1, &inputs).unwrap();
        assert_eq!(max_diff(&a, &run(1, &inputs).unwrap()), 0.0);
        assert!(max_diff(&a, &run(2, &inputs).unwrap()) > 1e-3);
        // The backward replays the forward's masks: with the same seed, the analytic gradient
        // matches a finite difference on one input element.
        let w = random(&[rows, h], &mut Rng::new(11), 1.0);
        let loss = |t: &[Tensor]| -> f32 {
            (run(1, t).unwrap() * &w)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar()
                .unwrap()
        };
        let var = candle_core::Var::from_tensor(&inputs[1]).unwrap();
        let with_var = [
            inputs[0].clone(),
            var.as_tensor().clone(),
            inputs[2].clone(),
        ];
        let y = run(1, &with_var).unwrap();
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
            let t = Tensor::from_vec(flat.clone(), (rows, h), &Device::Cpu).unwrap();
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
