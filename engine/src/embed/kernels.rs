//! Row kernels for the fused CPU ops of [`super::fused`]: layer normalisation, GELU (erf) and
//! the masked, scaled attention softmax, forward and backward, on plain `f32` slices.
//!
//! They are written so that LLVM vectorises them: reductions keep eight independent lanes (a
//! fixed order, so results do not depend on the thread count), and `exp` / `erf` are branch-free
//! polynomial approximations instead of libm calls. [`dispatch!`] compiles each kernel three
//! times, for the baseline target, with AVX2 + FMA and with AVX-512, and picks at run time. The
//! builds give the same bits: element-wise code does the same operations at any vector width and
//! the reductions' lane order is written out.

/// Runs `$kernel(args)` compiled for the widest vectors the CPU has (AVX-512, else AVX2 + FMA),
/// else the baseline build.
macro_rules! dispatch {
    ($kernel:ident($($arg:expr),* $(,)?)) => {{
        #[cfg(target_arch = "x86_64")]
        {
            if $crate::embed::kernels::has_avx512() {
                // SAFETY: the CPU supports the features the function is compiled for.
                unsafe { $crate::embed::kernels::avx512::$kernel($($arg),*) }
            } else if $crate::embed::kernels::has_avx2_fma() {
                // SAFETY: the CPU supports the features the function is compiled for.
                unsafe { $crate::embed::kernels::avx2::$kernel($($arg),*) }
            } else {
                $crate::embed::kernels::$kernel($($arg),*)
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            $crate::embed::kernels::$kernel($($arg),*)
        }
    }};
}
pub(crate) use dispatch;

/// Whether this x86-64 CPU has AVX2 and FMA (cached by the standard library).
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx2_fma() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

/// Whether this x86-64 CPU has AVX-512 (foundation, byte/word and double/quad, vector length) on
/// top of AVX2 and FMA (cached by the standard library).
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx512() -> bool {
    has_avx2_fma()
        && std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512dq")
        && std::arch::is_x86_feature_detected!("avx512vl")
}

const LANES: usize = 8;

#[inline(always)]
fn sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            acc[i] += c[i];
        }
    }
    acc.iter().sum::<f32>() + rest.iter().sum::<f32>()
}

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let ca = a.chunks_exact(LANES);
    let cb = b.chunks_exact(LANES);
    let rest: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + rest
}

#[inline(always)]
fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            acc[i] = if c[i] > acc[i] { c[i] } else { acc[i] };
        }
    }
    acc.iter()
        .chain(rest)
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v))
}

/// `e^x` to about 2 ulp (Cephes' polynomial after reduction by ln 2); flushes below e^-87.3.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let xc = x.clamp(-87.3, 88.3);
    let n = (xc * LOG2E + 0.5).floor();
    let r = xc - n * LN2_HI - n * LN2_LO;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    // 2^n through the float's bits: adding 1.5 * 2^23 leaves the integer `n` (|n| <= 127 after
    // the clamp) in the low mantissa bits. `n as i32` would give the same number, but its
    // saturating NaN-checked conversion is done lane by lane, and it dominated GELU and softmax.
    let n_int = (n + 12_582_912.0).to_bits() as i32 - 0x4B40_0000;
    let y = (p * r * r + r + 1.0) * f32::from_bits(((n_int + 127) as u32) << 23);
    if x < -87.3 {
        0.0
    } else {
        y
    }
}

/// `erf(x)` to 1.5e-7 absolute (Abramowitz & Stegun 7.1.26, as PyTorch's vectorised CPU erf).
#[inline(always)]
pub(crate) fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = ((((1.061_405_4 * t - 1.453_152_1) * t + 1.421_413_8) * t - 0.284_496_72) * t
        + 0.254_829_6)
        * t;
    (1.0 - poly * exp(-a * a)).copysign(x)
}

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// 1 / sqrt(2 pi).
const INV_SQRT_2PI: f32 = 0.398_942_3;

/// `y = x * Phi(x)` element-wise (GELU with the exact erf form, as BERT's "gelu").
#[inline(always)]
pub(crate) fn gelu_fwd(x: &[f32], y: &mut [f32]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y = 0.5 * x * (1.0 + erf(x * FRAC_1_SQRT_2));
    }
}

/// `y = gelu(y + bias)` over each `bias.len()`-wide row of `y`, in place.
#[inline(always)]
pub(crate) fn bias_gelu_inplace(y: &mut [f32], bias: &[f32]) {
    for row in y.chunks_exact_mut(bias.len()) {
        for (v, &b) in row.iter_mut().zip(bias) {
            let x = *v + b;
            *v = 0.5 * x * (1.0 + erf(x * FRAC_1_SQRT_2));
        }
    }
}

/// `dx = g * (Phi(x) + x phi(x))` element-wise.
#[inline(always)]
pub(crate) fn gelu_bwd(x: &[f32], g: &[f32], dx: &mut [f32]) {
    for ((d, &x), &g) in dx.iter_mut().zip(x).zip(g) {
        let cdf = 0.5 * (1.0 + erf(x * FRAC_1_SQRT_2));
        let pdf = INV_SQRT_2PI * exp(-0.5 * x * x);
        *d = g * (cdf + x * pdf);
    }
}

/// Mean and 1 / standard deviation of one row (two passes, as PyTorch).
#[inline(always)]
fn row_stats(x: &[f32], eps: f32) -> (f32, f32) {
    let h = x.len() as f32;
    let mean = sum(x) / h;
    let mut acc = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest: f32 = chunks
        .remainder()
        .iter()
        .map(|v| (v - mean) * (v - mean))
        .sum();
    for c in chunks {
        for i in 0..LANES {
            let d = c[i] - mean;
            acc[i] += d * d;
        }
    }
    let var = (acc.iter().sum::<f32>() + rest) / h;
    (mean, 1.0 / (var + eps).sqrt())
}

/// Layer normalisation of each `h`-wide row of `x` into `y`.
#[inline(always)]
pub(crate) fn layer_norm_fwd(x: &[f32], gamma: &[f32], beta: &[f32], eps: f32, y: &mut [f32]) {
    let h = gamma.len();
    for (xr, yr) in x.chunks_exact(h).zip(y.chunks_exact_mut(h)) {
        let (mean, rstd) = row_stats(xr, eps);
        for i in 0..h {
            yr[i] = (xr[i] - mean) * rstd * gamma[i] + beta[i];
        }
    }
}

/// Layer-norm backward for the rows of `x`: writes `dx` and adds the rows' contributions to
/// `dgamma` and `dbeta`.
#[inline(always)]
pub(crate) fn layer_norm_bwd(
    x: &[f32],
    gamma: &[f32],
    g: &[f32],
    eps: f32,
    dx: &mut [f32],
    dgamma: &mut [f32],
    dbeta: &mut [f32],
) {
    let h = gamma.len();
    let inv_h = 1.0 / h as f32;
    let mut gg = vec![0f32; h];
    let mut xhat = vec![0f32; h];
    for ((xr, gr), dr) in x
        .chunks_exact(h)
        .zip(g.chunks_exact(h))
        .zip(dx.chunks_exact_mut(h))
    {
        let (mean, rstd) = row_stats(xr, eps);
        for i in 0..h {
            xhat[i] = (xr[i] - mean) * rstd;
            gg[i] = gr[i] * gamma[i];
            dgamma[i] += gr[i] * xhat[i];
            dbeta[i] += gr[i];
        }
        let mean_gg = sum(&gg) * inv_h;
        let mean_ggx = dot(&gg, &xhat) * inv_h;
        for i in 0..h {
            dr[i] = rstd * (gg[i] - mean_gg - xhat[i] * mean_ggx);
        }
    }
}

/// Softmax of `scale * s + bias` over each `bias.len()`-wide row of `s`, into `p`.
#[inline(always)]
pub(crate) fn softmax_fwd(s: &[f32], bias: &[f32], scale: f32, p: &mut [f32]) {
    let n = bias.len();
    for (sr, pr) in s.chunks_exact(n).zip(p.chunks_exact_mut(n)) {
        for i in 0..n {
            pr[i] = sr[i] * scale + bias[i];
        }
        let m = max(pr);
        for v in pr.iter_mut() {
            *v = exp(*v - m);
        }
        let inv = 1.0 / sum(pr);
        for v in pr.iter_mut() {
            *v *= inv;
        }
    }
}

/// Softmax backward: `ds = scale * p * (g - <g, p>)` per `n`-wide row.
#[inline(always)]
pub(crate) fn softmax_bwd(p: &[f32], g: &[f32], scale: f32, n: usize, ds: &mut [f32]) {
    for ((pr, gr), dr) in p
        .chunks_exact(n)
        .zip(g.chunks_exact(n))
        .zip(ds.chunks_exact_mut(n))
    {
        let gp = dot(gr, pr);
        for i in 0..n {
            dr[i] = scale * pr[i] * (gr[i] - gp);
        }
    }
}

/// `unsafe` copies of the kernels named in the braces, compiled with `$features`.
#[cfg(target_arch = "x86_64")]
macro_rules! compiled_with {
    ($features:literal, { $($name:ident($($arg:ident: $ty:ty),*);)* }) => {$(
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn $name($($arg: $ty),*) {
            super::$name($($arg),*)
        }
    )*};
}

/// One module per instruction set, each with every kernel of the list.
#[cfg(target_arch = "x86_64")]
macro_rules! kernel_modules {
    ([$(($module:ident, $features:literal, $doc:literal)),*], $kernels:tt) => {$(
        #[doc = $doc]
        pub(crate) mod $module {
            compiled_with!($features, $kernels);
        }
    )*};
}

#[cfg(target_arch = "x86_64")]
kernel_modules!(
    [
        (avx2, "avx2,fma", "The kernels above compiled with AVX2 + FMA."),
        (
            avx512,
            "avx2,fma,avx512f,avx512bw,avx512dq,avx512vl",
            "The kernels above compiled with AVX-512."
        )
    ],
    {
        gelu_fwd(x: &[f32], y: &mut [f32]);
        bias_gelu_inplace(y: &mut [f32], bias: &[f32]);
        gelu_bwd(x: &[f32], g: &[f32], dx: &mut [f32]);
        layer_norm_fwd(x: &[f32], gamma: &[f32], beta: &[f32], eps: f32, y: &mut [f32]);
        layer_norm_bwd(x: &[f32], gamma: &[f32], g: &[f32], eps: f32, dx: &mut [f32],
            dgamma: &mut [f32], dbeta: &mut [f32]);
        softmax_fwd(s: &[f32], bias: &[f32], scale: f32, p: &mut [f32]);
        softmax_bwd(p: &[f32], g: &[f32], scale: f32, n: usize, ds: &mut [f32]);
    }
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_and_erf_match_libm() {
        let mut worst_exp = 0f64;
        let mut worst_erf = 0f64;
        for i in -20_000..=20_000 {
            let x = i as f32 * 0.004;
            let rel = ((exp(x) as f64 - (x as f64).exp()) / (x as f64).exp()).abs();
            worst_exp = worst_exp.max(rel);
            let e = (erf(x) as f64 - libm_erf(x as f64)).abs();
            worst_erf = worst_erf.max(e);
        }
        assert!(worst_exp < 5e-7, "exp relative error {worst_exp}");
        assert!(worst_erf < 5e-7, "erf absolute error {worst_erf}");
        assert_eq!(exp(-100.0), 0.0);
        assert!(exp(100.0).is_finite());
        assert!(erf(0.0).abs() < 1e-6);
        assert!((erf(-10.0) + 1.0).abs() < 1e-7);
    }

    /// erf from its Taylor series (|x| < 3) or the complement's continued fraction, in f64.
    fn libm_erf(x: f64) -> f64 {
        if x.abs() < 3.0 {
            let (mut term, mut total, mut n) = (x, x, 0.0);
            while term.abs() > 1e-17 {
                n += 1.0;
                term *= -x * x / n;
                total += term / (2.0 * n + 1.0);
            }
            total * 2.0 / std::f64::consts::PI.sqrt()
        } else {
            let a = x.abs();
            let mut f = 0.0;
            for k in (1..60).rev() {
                f = (k as f64 / 2.0) / (a + f);
            }
            let erfc = (-a * a).exp() / std::f64::consts::PI.sqrt() / (a + f);
            (1.0 - erfc).copysign(x)
        }
    }

    /// Every kernel's output from one build, on fixed pseudo-random inputs of awkward widths.
    #[cfg(target_arch = "x86_64")]
    fn outputs(build: &str) -> Vec<Vec<u32>> {
        let mut state = 0x2545_f491_u32;
        let mut random = |n: usize, spread: f32| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                    ((state >> 8) as f32 / (1u32 << 24) as f32 - 0.5) * spread
                })
                .collect()
        };
        let (rows, h) = (7, 45);
        let x = random(rows * h, 12.0);
        let g = random(rows * h, 2.0);
        let gamma = random(h, 2.0);
        let beta = random(h, 1.0);
        let mut bias = random(h, 1.0);
        bias[3] = -10_000.0;
        let (mut y, mut dx, mut dg, mut db) = (
            vec![0f32; x.len()],
            vec![0f32; x.len()],
            vec![0f32; h],
            vec![0f32; h],
        );
        let mut out = Vec::new();
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<u32>>();
        macro_rules! run {
            ($kernel:ident($($arg:expr),*)) => {
                // SAFETY: each build is called only when the CPU has its features (the caller).
                unsafe {
                    match build {
                        "avx512" => avx512::$kernel($($arg),*),
                        "avx2" => avx2::$kernel($($arg),*),
                        _ => $kernel($($arg),*),
                    }
                }
            };
        }
        run!(gelu_fwd(&x, &mut y));
        out.push(bits(&y));
        run!(bias_gelu_inplace(&mut y, &beta));
        out.push(bits(&y));
        run!(gelu_bwd(&x, &g, &mut dx));
        out.push(bits(&dx));
        run!(layer_norm_fwd(&x, &gamma, &beta, 1e-12, &mut y));
        out.push(bits(&y));
        run!(layer_norm_bwd(
            &x, &gamma, &g, 1e-12, &mut dx, &mut dg, &mut db
        ));
        out.extend([bits(&dx), bits(&dg), bits(&db)]);
        run!(softmax_fwd(&x, &bias, 0.125, &mut y));
        out.push(bits(&y));
        let p = y.clone();
        run!(softmax_bwd(&p, &g, 0.125, h, &mut dx));
        out.push(bits(&dx));
        out
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn every_instruction_set_build_gives_the_same_bits() {
        let baseline = outputs("baseline");
        let mut compared = vec!["baseline"];
        if has_avx2_fma() {
            assert!(
                outputs("avx2") == baseline,
                "the AVX2 build differs from the baseline"
            );
            compared.push("avx2");
        }
        if has_avx512() {
            assert!(
                outputs("avx512") == baseline,
                "the AVX-512 build differs from the baseline"
            );
            compared.push("avx512");
        }
        eprintln!("kernel builds compared on this CPU: {compared:?}");
    }

    #[test]
    fn softmax_rows_sum_to_one_and_respect_the_mask() {
        let s = [1.0f32, 2.0, 3.0, 4.0, 0.5, 0.5, 0.5, 0.5];
        let bias = [0.0f32, 0.0, 0.0, -10000.0];
        let mut p = [0f32; 8];
        softmax_fwd(&s, &bias, 0.5, &mut p);
        let z: f32 = [0.5f32, 1.0, 1.5].iter().map(|v| v.exp()).sum();
        assert!((p[2] - 1.5f32.exp() / z).abs() < 1e-6, "{p:?}");
        assert_eq!(p[3], 0.0);
        assert!((p[4..8].iter().sum::<f32>() - 1.0).abs() < 1e-6);
    }
}
