//! The end of each half of a BERT block as one fused CPU op: `layer_norm(dropout(a + b) + x)`,
//! where `b` is an optional bias on `a` (the half-block's output bias, when its product was
//! computed without one: adding it here costs nothing, as every value of the row is read anyway).
//!
//! Composed, that is a dropout mask drawn on one thread and multiplied in, a residual add and the
//! layer norm: three fresh buffers of the activations' size forward, and again backward. Here the
//! dropout factors come from a seed per row (regenerated in the backward, on any thread), the sum
//! lives one row at a time in a scratch row, and the backward recomputes it from the inputs: one
//! output buffer forward; `d(dropout(a))` and `dx` from one pass backward.

use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use super::dropout::{dropout_factors, Dropout};
use super::fused::{f32_slice, fused_for, layer_norm, storage_f32, OutPtr};
use super::gemm::{gemm_rows, Mat};
use super::kernels::dispatch;

/// Row blocks whose weight-gradient partial sums are added in a fixed order, so that results do
/// not depend on the number of threads.
const BWD_BLOCKS: usize = 32;

/// `layer_norm(dropout(a + a_bias, p) + x)` over the last dimension, with weight `gamma` and
/// bias `beta`; without `a_bias`, `layer_norm(dropout(a, p) + x)`.
pub(crate) fn residual_layer_norm(
    (a, a_bias): (&Tensor, Option<&Tensor>),
    x: &Tensor,
    (gamma, beta): (&Tensor, &Tensor),
    eps: f64,
    p: f64,
    drop: &mut Dropout<'_>,
) -> Result<Tensor> {
    if fused_for(a) {
        let op = ResidualNormOp {
            eps: eps as f32,
            dropout: drop.seed(p).map(|seed| (p as f32, seed)),
        };
        let params = match a_bias {
            Some(b) => Tensor::stack(&[gamma, beta, b], 0)?,
            None => Tensor::stack(&[gamma, beta], 0)?,
        };
        return a.contiguous()?.apply_op3(&x.contiguous()?, &params, op);
    }
    let a = match a_bias {
        Some(b) => a.broadcast_add(b)?,
        None => a.clone(),
    };
    layer_norm(&(drop.apply(&a, p)? + x)?, gamma, beta, eps)
}

/// `layer_norm(a W^T + b + x)` for inference (no dropout, no gradient): the output product,
/// its bias, the residual and the layer norm in one parallel region, each thread finishing its
/// block of rows while they are warm, in place. Where a gradient can flow, or off the CPU, it is
/// the composed [`super::fused_linear::product`] and [`residual_layer_norm`].
pub(crate) fn product_residual_layer_norm(
    a: &Tensor,
    (weight, bias): (&Tensor, &Tensor),
    x: &Tensor,
    (gamma, beta): (&Tensor, &Tensor),
    eps: f64,
) -> Result<Tensor> {
    let tracked = [a, weight, bias, x, gamma, beta]
        .iter()
        .any(|t| t.track_op());
    if tracked || !fused_for(a) {
        let y = super::fused_linear::product(a, weight)?;
        let params = (gamma, beta);
        return residual_layer_norm((&y, Some(bias)), x, params, eps, 0.0, &mut Dropout::off());
    }
    let (out, inp) = weight.dims2()?;
    let rows = a.elem_count() / inp.max(1);
    let fits = a.dims().last() == Some(&inp)
        && x.dims().last() == Some(&out)
        && x.elem_count() == rows * out
        && [bias, gamma, beta].iter().all(|t| t.dims() == [out]);
    if !fits {
        bail!(
            "product + residual layer norm: a {:?}, weight {:?}, bias {:?}, x {:?} and gamma {:?} do not fit",
            a.dims(),
            weight.dims(),
            bias.dims(),
            x.dims(),
            gamma.dims()
        )
    }
    let name = "ragd-product-residual-layer-norm";
    let [a, weight, bias, x, gamma, beta] =
        [a, weight, bias, x, gamma, beta].map(|t| t.contiguous());
    let (a, weight, bias, x, gamma, beta) = (a?, weight?, bias?, x?, gamma?, beta?);
    let (sa, la) = a.storage_and_layout();
    let (sw, lw) = weight.storage_and_layout();
    let (sb, lb) = bias.storage_and_layout();
    let (sx, lx) = x.storage_and_layout();
    let (sg, lg) = gamma.storage_and_layout();
    let (sbe, lbe) = beta.storage_and_layout();
    let av = storage_f32(&sa, la, name)?;
    let wv = storage_f32(&sw, lw, name)?;
    let bv = storage_f32(&sb, lb, name)?;
    let xv = storage_f32(&sx, lx, name)?;
    let gv = storage_f32(&sg, lg, name)?;
    let bev = storage_f32(&sbe, lbe, name)?;
    let eps = eps as f32;
    let mut y: Vec<f32> = Vec::with_capacity(rows * out);
    let spare = &mut y.spare_capacity_mut()[..rows * out];
    let (am, wm) = (Mat::rows(av, rows, inp), Mat::rows(wv, out, inp).t());
    let sum = ResidualNormOp { eps, dropout: None };
    gemm_rows(spare, am, wm, None, |first, block: &mut [f32]| {
        let mut s = vec![0f32; out];
        for (i, yr) in block.chunks_exact_mut(out).enumerate() {
            let (r, xr) = (first + i, &xv[(first + i) * out..(first + i + 1) * out]);
            sum.sum_row(r, (yr, bv), xr, &mut [], &mut s);
            dispatch!(layer_norm_fwd(&s, gv, bev, eps, yr));
        }
    });
    // SAFETY: `gemm_rows` wrote every one of the rows x out values.
    unsafe { y.set_len(rows * out) };
    Tensor::from_vec(y, x.shape(), x.device())
}

struct ResidualNormOp {
    eps: f32,
    /// Drop probability and mask seed, when dropout is on.
    dropout: Option<(f32, u64)>,
}

impl ResidualNormOp {
    /// `dropout(a + b) + x` of one row into `s` (`b` empty: no bias on `a`), the row's dropout
    /// factors into `f` (when on).
    fn sum_row(
        &self,
        row: usize,
        (a, b): (&[f32], &[f32]),
        x: &[f32],
        f: &mut [f32],
        s: &mut [f32],
    ) {
        s.copy_from_slice(a);
        for (s, b) in s.iter_mut().zip(b) {
            *s += b;
        }
        match self.dropout {
            Some((rate, seed)) => {
                dropout_factors(f, rate, seed, row);
                for i in 0..s.len() {
                    s[i] = s[i] * f[i] + x[i];
                }
            }
            None => {
                for (s, x) in s.iter_mut().zip(x) {
                    *s += x;
                }
            }
        }
    }

    /// The row width and whether the parameters carry a bias on `a` (`[gamma; beta]` or
    /// `[gamma; beta; bias]`), checked against the inputs.
    fn width(&self, l1: &Layout, l2: &Layout, l3: &Layout) -> Result<(usize, bool)> {
        let h = l3.dims().last().copied().unwrap_or(0);
        let params_fit = l3.dims() == [2, h] || l3.dims() == [3, h];
        if l1.dims() != l2.dims() || !params_fit || l1.dims().last() != Some(&h) {
            bail!(
                "residual layer norm: a {:?}, x {:?} and [gamma; beta(; bias)] {:?} do not fit",
                l1.dims(),
                l2.dims(),
                l3.dims()
            )
        }
        Ok((h, l3.dims()[0] == 3))
    }
}

impl CustomOp3 for ResidualNormOp {
    fn name(&self) -> &'static str {
        "ragd-residual-layer-norm"
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
        let (h, _) = self.width(l1, l2, l3)?;
        let a = f32_slice(s1, l1, self.name())?;
        let x = f32_slice(s2, l2, self.name())?;
        let (gamma, rest) = f32_slice(s3, l3, self.name())?.split_at(h);
        let (beta, bias) = rest.split_at(h);
        let mut y = vec![0f32; a.len()];
        let ptr = OutPtr(y.as_mut_ptr());
        candle_core::utils::barrier_pool().execute_chunked(a.len() / h, |rows| {
            let (mut s, mut f) = (vec![0f32; h], vec![0f32; h]);
            for r in rows {
                let span = r * h..(r + 1) * h;
                self.sum_row(
                    r,
                    (&a[span.clone()], bias),
                    &x[span.clone()],
                    &mut f,
                    &mut s,
                );
                // SAFETY: every row is written by one thread only.
                let out = unsafe { ptr.slice(span.start, h) };
                dispatch!(layer_norm_fwd(&s, gamma, beta, self.eps, out));
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        a: &Tensor,
        x: &Tensor,
        params: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (h, with_bias) = self.width(a.layout(), x.layout(), params.layout())?;
        let np = if with_bias { 3 } else { 2 };
        let grad = grad.contiguous()?;
        let (gs, gl) = grad.storage_and_layout();
        let (as_, al) = a.storage_and_layout();
        let (xs, xl) = x.storage_and_layout();
        let (ps, pl) = params.storage_and_layout();
        let g = storage_f32(&gs, gl, self.name())?;
        let av = storage_f32(&as_, al, self.name())?;
        let xv = storage_f32(&xs, xl, self.name())?;
        let pv = storage_f32(&ps, pl, self.name())?;
        let (gamma, bias) = (&pv[..h], &pv[2 * h..]);
        let n = av.len() / h;
        let blocks = BWD_BLOCKS.min(n.max(1));
        // The sum's gradient (dx) and, with dropout, the same through the factors (da).
        let mut dx = vec![0f32; av.len()];
        let mut da = vec![0f32; if self.dropout.is_some() { av.len() } else { 0 }];
        // Per block: dgamma, dbeta (and the bias's gradient), summed in block order below.
        let mut partial = vec![0f32; blocks * np * h];
        let ptrs = [dx.as_mut_ptr(), da.as_mut_ptr(), partial.as_mut_ptr()].map(OutPtr);
        candle_core::utils::barrier_pool().execute_chunked(blocks, |bs| {
            let (mut s, mut f) = (Vec::new(), Vec::new());
            for k in bs {
                let rows = k * n / blocks..(k + 1) * n / blocks;
                let span = rows.start * h..rows.end * h;
                // The block's sums (and dropout factors), recomputed from the inputs.
                s.resize(span.len(), 0f32);
                f.resize(span.len(), 0f32);
                for (i, r) in rows.enumerate() {
                    let (row, local) = (r * h..(r + 1) * h, i * h..(i + 1) * h);
                    let (fr, sr) = (&mut f[local.clone()], &mut s[local]);
                    self.sum_row(r, (&av[row.clone()], bias), &xv[row], fr, sr);
                }
                // SAFETY: block k owns its rows of dx and da and slot k of `partial`.
                let acc = unsafe { ptrs[2].slice(k * np * h, np * h) };
                let (dgamma, rest) = acc.split_at_mut(h);
                let (dbeta, dbias) = rest.split_at_mut(h);
                let ds = unsafe { ptrs[0].slice(span.start, span.len()) };
                let gr = &g[span.clone()];
                dispatch!(layer_norm_bwd(&s, gamma, gr, self.eps, ds, dgamma, dbeta));
                let da_block: &[f32] = if self.dropout.is_some() {
                    let dab = unsafe { ptrs[1].slice(span.start, span.len()) };
                    for ((d, s), f) in dab.iter_mut().zip(ds.iter()).zip(&f) {
                        *d = s * f;
                    }
                    dab
                } else {
                    ds
                };
                // The bias on `a` gets the column sums of `a`'s gradient.
                if with_bias {
                    for row in da_block.chunks_exact(h) {
                        for (t, v) in dbias.iter_mut().zip(row) {
                            *t += v;
                        }
                    }
                }
            }
        });
        let mut dgb = vec![0f32; np * h];
        for acc in partial.chunks_exact(np * h) {
            for (t, v) in dgb.iter_mut().zip(acc) {
                *t += v;
            }
        }
        let dev = a.device();
        let dx = Tensor::from_vec(dx, a.shape(), dev)?;
        let da = if self.dropout.is_some() {
            Tensor::from_vec(da, a.shape(), dev)?
        } else {
            dx.clone()
        };
        let dgb = Tensor::from_vec(dgb, (np, h), dev)?;
        Ok((Some(da), Some(dx), Some(dgb)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::embed::fused::layer_norm_composed;
    use crate::embed::fused::tests::{compare, max_diff, random};
    use crate::rng::Rng;

    fn inputs(rows: usize, h: usize, seed: u64) -> Vec<Tensor> {
        let mut rng = Rng::new(seed);
        vec![
            random(&[rows, h], &mut rng, 1.0),
            random(&[rows, h], &mut rng, 1.0),
            (random(&[h], &mut rng, 0.3) + 1.0).unwrap(),
            random(&[h], &mut rng, 0.3),
        ]
    }

    #[test]
    fn residual_layer_norm_matches_composed_ops_with_gradients() {
        for (rows, h) in [(5, 12), (70, 40)] {
            let fused = |t: &[Tensor]| {
                residual_layer_norm(
                    (&t[0], None),
                    &t[1],
                    (&t[2], &t[3]),
                    1e-12,
                    0.1,
                    &mut Dropout::off(),
                )
            };
            let composed =
                |t: &[Tensor]| layer_norm_composed(&(&t[0] + &t[1])?, &t[2], &t[3], 1e-12);
            compare(&inputs(rows, h, 3), fused, composed, 2e-5);
        }
    }

    #[test]
    fn a_bias_on_a_matches_composed_ops_with_gradients() {
        for (rows, h) in [(5, 12), (70, 40)] {
            let mut t = inputs(rows, h, 8);
            t.push(random(&[h], &mut Rng::new(9), 0.5));
            let fused = |t: &[Tensor]| {
                residual_layer_norm(
                    (&t[0], Some(&t[4])),
                    &t[1],
                    (&t[2], &t[3]),
                    1e-12,
                    0.1,
                    &mut Dropout::off(),
                )
            };
            let composed = |t: &[Tensor]| {
                let a = t[0].broadcast_add(&t[4])?;
                layer_norm_composed(&(&a + &t[1])?, &t[2], &t[3], 1e-12)
            };
            compare(&t, fused, composed, 2e-5);
        }
    }

    #[test]
    fn the_fused_output_product_matches_its_composed_ops() {
        let mut rng = Rng::new(14);
        for (rows, inp, out) in [(3, 8, 12), (70, 48, 40)] {
            let a = random(&[rows, inp], &mut rng, 1.0);
            let w = random(&[out, inp], &mut rng, 0.5);
            let b = random(&[out], &mut rng, 0.5);
            let x = random(&[rows, out], &mut rng, 1.0);
            let gamma = (random(&[out], &mut rng, 0.3) + 1.0).unwrap();
            let beta = random(&[out], &mut rng, 0.3);
            let fused =
                product_residual_layer_norm(&a, (&w, &b), &x, (&gamma, &beta), 1e-12).unwrap();
            let y = a
                .matmul(&w.t().unwrap())
                .unwrap()
                .broadcast_add(&b)
                .unwrap();
            let composed = layer_norm_composed(&(y + &x).unwrap(), &gamma, &beta, 1e-12).unwrap();
            assert!(max_diff(&fused, &composed) < 2e-5);
            // A tracked input takes the composed ops, which carry a gradient.
            let var = candle_core::Var::from_tensor(&a).unwrap();
            let tracked =
                product_residual_layer_norm(var.as_tensor(), (&w, &b), &x, (&gamma, &beta), 1e-12)
                    .unwrap();
            assert!(max_diff(&tracked, &composed) < 2e-5);
            let grads = tracked.sum_all().unwrap().backward().unwrap();
            assert!(grads.get(&var).is_some());
        }
        // Misfitting shapes are refused with their names.
        let a = random(&[4, 8], &mut rng, 1.0);
        let w = random(&[6, 8], &mut rng, 1.0);
        let b = random(&[6], &mut rng, 1.0);
        let x = random(&[4, 5], &mut rng, 1.0);
        let g = random(&[6], &mut rng, 1.0);
        let err = product_residual_layer_norm(&a, (&w, &b), &x, (&g, &g), 1e-12).unwrap_err();
        assert!(err.to_string().contains("do not fit"), "{err}");
    }

    #[test]
    fn a_bias_on_a_is_dropped_out_with_it() {
        // dropout(a + b) with one seed: the bias's gradient is the column sum of a's, so the
        // dropped elements give it nothing, as they give a nothing.
        let (rows, h) = (9, 16);
        let t = inputs(rows, h, 10);
        let b = random(&[h], &mut Rng::new(12), 0.5);
        let (va, vb) = (
            candle_core::Var::from_tensor(&t[0]).unwrap(),
            candle_core::Var::from_tensor(&b).unwrap(),
        );
        let w = random(&[rows, h], &mut Rng::new(13), 1.0);
        // Dropout 0.3 with the mask stream of seed 1 every time.
        let run = |a: &Tensor, bias: Option<&Tensor>| {
            let mut r = Rng::new(1);
            let drop = &mut Dropout(Some(&mut r));
            residual_layer_norm((a, bias), &t[1], (&t[2], &t[3]), 1e-5, 0.3, drop).unwrap()
        };
        let y = run(va.as_tensor(), Some(vb.as_tensor()));
        let grads = (y * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let ga = grads.get(&va).unwrap();
        let gb = grads.get(&vb).unwrap();
        let sums = ga.sum(0).unwrap();
        assert!(max_diff(&sums, gb) < 1e-5);
        let flat: Vec<f32> = ga.flatten_all().unwrap().to_vec1().unwrap();
        assert!(flat.contains(&0.0), "no element was dropped");
        // The same seed without the bias, on a + b: the same output.
        let ab = t[0].broadcast_add(&b).unwrap();
        let (y1, y2) = (run(&t[0], Some(&b)), run(&ab, None));
        assert!(max_diff(&y1, &y2) < 1e-5);
    }

    #[test]
    fn dropout_masks_are_seeded_and_replayed_in_the_backward() {
        let (rows, h) = (9, 16);
        let t = inputs(rows, h, 4);
        let run = |seed: u64, a: &Tensor| {
            let mut r = Rng::new(seed);
            residual_layer_norm(
                (a, None),
                &t[1],
                (&t[2], &t[3]),
                1e-5,
                0.3,
                &mut Dropout(Some(&mut r)),
            )
            .unwrap()
        };
        let y = run(1, &t[0]);
        assert_eq!(max_diff(&y, &run(1, &t[0])), 0.0);
        assert!(max_diff(&y, &run(2, &t[0])) > 1e-3);
        // The backward replays the forward's masks: the analytic gradient of a matches a finite
        // difference, and elements the mask dropped get none.
        let w = random(&[rows, h], &mut Rng::new(5), 1.0);
        let var = candle_core::Var::from_tensor(&t[0]).unwrap();
        let grads = (run(1, var.as_tensor()) * &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let ga: Vec<f32> = grads
            .get(&var)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let flat: Vec<f32> = t[0].flatten_all().unwrap().to_vec1().unwrap();
        let loss = |v: &[f32]| -> f32 {
            let a = Tensor::from_vec(v.to_vec(), (rows, h), &candle_core::Device::Cpu).unwrap();
            (run(1, &a) * &w)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar()
                .unwrap()
        };
        assert!(ga.contains(&0.0), "no element was dropped");
        for idx in [3, 17, 40] {
            let eps = 1e-2;
            let (mut up, mut down) = (flat.clone(), flat.clone());
            up[idx] += eps;
            down[idx] -= eps;
            let numeric = (loss(&up) - loss(&down)) / (2.0 * eps);
            assert!(
                (numeric - ga[idx]).abs() < 2e-2 * (1.0 + numeric.abs()),
                "element {idx}: {numeric} vs {}",
                ga[idx]
            );
        }
    }

    #[test]
    fn the_composed_path_of_other_devices_gives_the_same_output() {
        let t = inputs(4, 8, 6);
        let run = |t: &[Tensor]| {
            residual_layer_norm(
                (&t[0], None),
                &t[1],
                (&t[2], &t[3]),
                1e-12,
                0.1,
                &mut Dropout::off(),
            )
            .unwrap()
        };
        let wide = crate::embed::fused::tests::widened(&t);
        let d = max_diff(&run(&t), &run(&wide));
        assert!(d < 1e-5, "{d}");
    }
}
