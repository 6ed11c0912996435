//! A bounds-checked front to the `gemm` crate (the matrix multiply Candle's CPU backend uses),
//! for fused ops that multiply strided views of their inputs without copying them.

use std::mem::MaybeUninit;

use gemm::Parallelism;

/// A strided, read-only view of a `rows` x `cols` matrix inside `data`.
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a> {
    data: &'a [f32],
    offset: usize,
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<'a> Mat<'a> {
    /// The view of element `(r, c)` at `data[offset + r * row_stride + c * col_stride]`.
    /// Panics when the view reaches past `data`.
    pub(crate) fn new(
        data: &'a [f32],
        offset: usize,
        (rows, cols): (usize, usize),
        (row_stride, col_stride): (usize, usize),
    ) -> Self {
        let last =
            offset + rows.saturating_sub(1) * row_stride + cols.saturating_sub(1) * col_stride;
        assert!(
            rows == 0 || cols == 0 || last < data.len(),
            "matrix view past its buffer"
        );
        Self {
            data,
            offset,
            rows,
            cols,
            row_stride,
            col_stride,
        }
    }

    /// A contiguous row-major matrix.
    pub(crate) fn rows(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self::new(data, 0, (rows, cols), (cols, 1))
    }

    /// The transposed view (no copy).
    pub(crate) fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }
}

/// A destination `rows` x `cols` block at `offset` with row stride `row_stride` (unit column
/// stride) inside a buffer of `len` values starting at `ptr`.
#[derive(Clone, Copy)]
pub(crate) struct Dst {
    pub(crate) ptr: *mut f32,
    pub(crate) len: usize,
    pub(crate) offset: usize,
    pub(crate) row_stride: usize,
}

/// Candle's CPU thread count, read once (Candle's own call asks the OS each time: it reads
/// cgroup files, which costs more than a small product).
fn pool_threads() -> usize {
    static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *THREADS.get_or_init(candle_core::utils::get_num_threads)
}

/// Blocks of rows per pool thread in a parallel product. The pool's threads take blocks from a
/// shared cursor, so a thread that starts late (woken from its park) or is preempted leaves its
/// remaining blocks to the others instead of making them spin at the barrier; each block packs
/// the right-hand matrix again, which is what keeps the count small.
const BLOCKS_PER_THREAD: usize = 4;
/// The fewest rows a block has (below this a product is not split further).
const MIN_BLOCK_ROWS: usize = 16;

/// How many blocks of rows a product of `m` rows is split into over `threads` threads: one when
/// it is too small to share, else up to [`BLOCKS_PER_THREAD`] per thread of at least
/// [`MIN_BLOCK_ROWS`] rows each.
fn row_blocks(m: usize, threads: usize) -> usize {
    if threads <= 1 || m < MIN_BLOCK_ROWS * threads {
        return 1;
    }
    (threads * BLOCKS_PER_THREAD).min(m / MIN_BLOCK_ROWS)
}

/// The rows of block `p` of `blocks` over `m` rows (the blocks cover them once, in order).
fn block_rows(p: usize, m: usize, blocks: usize) -> std::ops::Range<usize> {
    p * m / blocks..(p + 1) * m / blocks
}

/// `dst = a @ b`, or `dst += a @ b` when `accumulate`; `parallel` spreads blocks of destination
/// rows over Candle's CPU thread pool (for one large product; leave it off inside work that is
/// already spread over the pool).
///
/// # Safety
/// `dst.ptr` must be valid for `dst.len` values, and no other thread may read or write the
/// destination block while this runs.
pub(crate) unsafe fn gemm_into(dst: Dst, a: Mat<'_>, b: Mat<'_>, accumulate: bool, parallel: bool) {
    assert_eq!(a.cols, b.rows, "inner dimensions differ");
    let (m, n) = (a.rows, b.cols);
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        dst.offset + (m - 1) * dst.row_stride + n <= dst.len,
        "destination block past its buffer"
    );
    let blocks = row_blocks(m, if parallel { pool_threads() } else { 1 });
    if blocks > 1 {
        // Blocks of destination rows over Candle's pool (where the fused ops' other kernels
        // run), rather than gemm's own rayon threads competing with it.
        let ptr = super::fused::OutPtr(dst.ptr);
        candle_core::utils::barrier_pool().execute_chunked(blocks, |parts| {
            for p in parts {
                let rows = block_rows(p, m, blocks);
                let sub_a = Mat {
                    offset: a.offset + rows.start * a.row_stride,
                    rows: rows.len(),
                    ..a
                };
                let sub_dst = Dst {
                    ptr: ptr.get(),
                    offset: dst.offset + rows.start * dst.row_stride,
                    ..dst
                };
                // SAFETY: the blocks cover disjoint destination rows.
                unsafe { gemm_serial(sub_dst, sub_a, b, accumulate) };
            }
        });
        return;
    }
    gemm_serial(dst, a, b, accumulate);
}

/// `out = a @ b` for a contiguous row-major `out` (`a.rows` x `b.cols`), then `finish(first
/// row, rows)` over each block of rows, all inside one parallel region: the threads of Candle's
/// pool each write blocks of rows ([`row_blocks`]) and finish them while they are warm (GELU
/// for BERT's intermediate layer, the residual layer norm after an output product). With
/// `start_from: Some(bias)` each row starts as the bias and the product is accumulated onto it;
/// with `None` the product overwrites the rows and `finish` adds any bias (one pass over the
/// output fewer). Either way no thread waits while another fills.
pub(crate) fn gemm_rows(
    out: &mut [MaybeUninit<f32>],
    a: Mat<'_>,
    b: Mat<'_>,
    start_from: Option<&[f32]>,
    finish: impl Fn(usize, &mut [f32]) + Sync,
) {
    assert_eq!(a.cols, b.rows, "inner dimensions differ");
    let (m, n) = (a.rows, b.cols);
    assert_eq!(out.len(), m * n, "output is not rows x cols");
    if let Some(bias) = start_from {
        assert_eq!(bias.len(), n, "bias is not one value per column");
    }
    if m == 0 || n == 0 {
        return;
    }
    let blocks = row_blocks(m, pool_threads());
    let ptr = super::fused::OutPtr(out.as_mut_ptr().cast::<f32>());
    let block = |p: usize| {
        let rows = block_rows(p, m, blocks);
        let (start, len) = (rows.start * n, rows.len() * n);
        // SAFETY: the blocks cover disjoint rows of `out`, which outlives the call.
        let first = unsafe { ptr.get().add(start) };
        if let Some(bias) = start_from {
            for r in 0..rows.len() {
                // SAFETY: row `r` of this block lies inside it.
                unsafe { std::ptr::copy_nonoverlapping(bias.as_ptr(), first.add(r * n), n) };
            }
        }
        let sub_a = Mat {
            offset: a.offset + rows.start * a.row_stride,
            rows: rows.len(),
            ..a
        };
        let dst = Dst {
            ptr: first,
            len,
            offset: 0,
            row_stride: n,
        };
        // SAFETY: `dst` is this block's own rows; without a starting bias gemm only writes
        // them (no accumulation, so it never reads the uninitialised values).
        unsafe { gemm_serial(dst, sub_a, b, start_from.is_some()) };
        // SAFETY: every value of the block is written now.
        finish(rows.start, unsafe { ptr.slice(start, len) });
    };
    if blocks == 1 {
        block(0);
    } else {
        candle_core::utils::barrier_pool().execute_chunked(blocks, |parts| parts.for_each(block));
    }
}

/// One single-threaded gemm call; same contract as [`gemm_into`].
unsafe fn gemm_serial(dst: Dst, a: Mat<'_>, b: Mat<'_>, accumulate: bool) {
    let (m, n, k) = (a.rows, b.cols, a.cols);
    let s = |v: usize| v as isize;
    gemm::gemm(
        m,
        n,
        k,
        dst.ptr.add(dst.offset),
        1,
        s(dst.row_stride),
        accumulate,
        a.data.as_ptr().add(a.offset),
        s(a.col_stride),
        s(a.row_stride),
        b.data.as_ptr().add(b.offset),
        s(b.col_stride),
        s(b.row_stride),
        if accumulate { 1.0 } else { 0.0 },
        1.0,
        false,
        false,
        false,
        Parallelism::None,
    );
}

/// `a @ b` into a new row-major buffer.
pub(crate) fn matmul(a: Mat<'_>, b: Mat<'_>, parallel: bool) -> Vec<f32> {
    let mut out = vec![0f32; a.rows * b.cols];
    let dst = Dst {
        ptr: out.as_mut_ptr(),
        len: out.len(),
        offset: 0,
        row_stride: b.cols,
    };
    // SAFETY: `out` is owned here and sized for the product.
    unsafe { gemm_into(dst, a, b, false, parallel) };
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strided_products_match_the_definition() {
        // a: 2x3 row-major; b^T stored as 2x3 (so b is 3x2).
        let a = [1f32, 2., 3., 4., 5., 6.];
        let bt = [1f32, 0., -1., 2., 1., 0.];
        let c = matmul(Mat::rows(&a, 2, 3), Mat::rows(&bt, 2, 3).t(), false);
        assert_eq!(c, vec![-2., 4., -2., 13.]);
        // a^T (3x2) @ a (2x3)
        let c = matmul(Mat::rows(&a, 2, 3).t(), Mat::rows(&a, 2, 3), true);
        assert_eq!(c[0], 17.0);
        assert_eq!(c[8], 45.0);
    }

    #[test]
    fn products_are_split_into_blocks_of_enough_rows() {
        assert_eq!(row_blocks(10_000, 1), 1);
        assert_eq!(row_blocks(31, 2), 1);
        assert_eq!(row_blocks(32, 2), 2);
        assert_eq!(row_blocks(100, 2), 6);
        assert_eq!(row_blocks(4_096, 2), 2 * BLOCKS_PER_THREAD);
    }

    #[test]
    fn a_product_split_into_blocks_gives_the_rows_a_single_block_gives() {
        let (m, k, n) = (200, 24, 40);
        let a: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7 % 13) as f32 - 6.0) / 8.0)
            .collect();
        let b: Vec<f32> = (0..k * n)
            .map(|i| ((i * 5 % 11) as f32 - 5.0) / 4.0)
            .collect();
        let whole = matmul(Mat::rows(&a, m, k), Mat::rows(&b, k, n), false);
        let split = matmul(Mat::rows(&a, m, k), Mat::rows(&b, k, n), true);
        let mut rows = vec![MaybeUninit::new(f32::NAN); m * n];
        gemm_rows(
            &mut rows,
            Mat::rows(&a, m, k),
            Mat::rows(&b, k, n),
            None,
            |_, _| {},
        );
        // SAFETY: gemm_rows wrote every value.
        let rows: Vec<f32> = rows.iter().map(|v| unsafe { v.assume_init() }).collect();
        let naive: Vec<f32> = (0..m * n)
            .map(|i| (0..k).map(|j| a[i / n * k + j] * b[j * n + i % n]).sum())
            .collect();
        for (got, want) in [(&split, &whole), (&rows, &whole)] {
            assert_eq!(got, want);
        }
        for (w, x) in whole.iter().zip(&naive) {
            assert!((w - x).abs() < 1e-3, "{w} vs {x}");
        }
    }

    #[test]
    #[should_panic(expected = "past its buffer")]
    fn views_past_the_buffer_are_refused() {
        Mat::new(&[0f32; 4], 1, (2, 2), (2, 1));
    }
}
