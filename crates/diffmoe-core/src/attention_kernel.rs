//! Multi-head self-attention on the CPU, forward and backward, one
//! `(image, head)` at a time with its scores in a scratch buffer.
//!
//! The composition of burn ops writes the `[images, heads, T, T]` scores and
//! probabilities to memory (33.5 MB per layer at 32 images of 256 tokens and
//! 4 heads) and reads them back, and keeps the probabilities for the
//! backward pass; at a head width of 32 those passes cost as much as the
//! products. Here each head's scores live in a buffer of at most
//! [`SCRATCH_ELEMS`] elements (a block of query rows against all keys), and
//! the backward pass recomputes them from `q` and `k` (FlashAttention's
//! trade: one more `T x T x head_dim` product, no stored probabilities).
//! `q`, `k` and `v` are read in place from the qkv projection's rows and the
//! result is written in place into rows of `heads x head_dim`, so no head is
//! ever copied out or stacked.
//!
//! The products are `gemm`'s (burn's CPU backend's kernels) on strided
//! operands, and the softmax is [`crate::cpu_kernels`]'s, so the results
//! match the composition up to summation order.

use rayon::prelude::*;

use crate::cpu_kernels;
use crate::matmul::OutPtr;

/// Elements of one score block (256 KiB of f32): a block of query rows
/// against every key stays in L2 between the two products that use it.
const SCRATCH_ELEMS: usize = 64 * 1024;

/// The shape of a self-attention over packed projections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct HeadsShape {
    /// Independent sequences (images).
    pub images: usize,
    /// Tokens per sequence.
    pub tokens: usize,
    /// Heads.
    pub heads: usize,
    /// Width of each head.
    pub head_dim: usize,
}

impl HeadsShape {
    /// Width of a qkv row: columns `(q | k | v, head, head_dim)`.
    pub fn qkv_width(&self) -> usize {
        3 * self.heads * self.head_dim
    }

    /// Width of an output row: columns `(head, head_dim)`.
    pub fn out_width(&self) -> usize {
        self.heads * self.head_dim
    }

    /// Query rows per score block.
    fn block_rows(&self) -> usize {
        (SCRATCH_ELEMS / self.tokens.max(1)).clamp(1, self.tokens.max(1))
    }

    /// Offset in the qkv rows of image `n`'s first row, column `part`
    /// (0 for q, 1 for k, 2 for v) of head `h`.
    fn qkv_at(&self, n: usize, part: usize, h: usize) -> usize {
        n * self.tokens * self.qkv_width() + (part * self.heads + h) * self.head_dim
    }

    /// Offset in the output rows of image `n`'s first row, head `h`.
    fn out_at(&self, n: usize, h: usize) -> usize {
        n * self.tokens * self.out_width() + h * self.head_dim
    }
}

/// A strided matrix: element `(r, c)` at `ptr + r * row + c * col`.
#[derive(Clone, Copy)]
struct Strided<P> {
    ptr: P,
    row: isize,
    col: isize,
}

impl<P: Copy> Strided<P> {
    /// The transposed matrix (the same memory).
    fn t(self) -> Self {
        Self { ptr: self.ptr, row: self.col, col: self.row }
    }
}

/// Row-major with rows `row` elements apart.
fn rows_of<P>(ptr: P, row: usize) -> Strided<P> {
    Strided { ptr, row: row as isize, col: 1 }
}

/// How a product meets its destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DstUpdate {
    /// `dst = beta * lhs @ rhs`.
    Overwrite,
    /// `dst += beta * lhs @ rhs`.
    Accumulate,
}

/// `beta * lhs @ rhs` (`m x k` by `k x n`) into `dst`.
///
/// # Safety
/// Every element addressed through the three strided matrices lies within
/// its buffer, and no other thread touches `dst`'s elements meanwhile.
#[allow(clippy::too_many_arguments)]
unsafe fn product(
    m: usize,
    n: usize,
    k: usize,
    dst: Strided<*mut f32>,
    update: DstUpdate,
    lhs: Strided<*const f32>,
    rhs: Strided<*const f32>,
    beta: f32,
) {
    // SAFETY: forwarded from the caller.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.ptr,
            dst.col,
            dst.row,
            update == DstUpdate::Accumulate,
            lhs.ptr,
            lhs.col,
            lhs.row,
            rhs.ptr,
            rhs.col,
            rhs.row,
            1.0f32,
            beta,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// Rows `q0..q0 + rows` of `softmax(scale q k^T)` for image `n`, head `h`,
/// into `probs` (`rows x tokens`, row-major).
fn probabilities(shape: &HeadsShape, scale: f32, qkv: &[f32], n: usize, h: usize, q0: usize, probs: &mut [f32]) {
    let (t, width) = (shape.tokens, shape.qkv_width());
    let rows = probs.len() / t;
    let q = rows_of(qkv[shape.qkv_at(n, 0, h) + q0 * width..].as_ptr(), width);
    let k = rows_of(qkv[shape.qkv_at(n, 1, h)..].as_ptr(), width);
    // SAFETY: `q` spans rows `q0..q0 + rows` and `k` rows `0..tokens` of
    // image `n` (within `qkv`, whose length the callers check), each
    // `head_dim` columns from the given column; `probs` holds `rows x tokens`.
    unsafe { product(rows, t, shape.head_dim, rows_of(probs.as_mut_ptr(), t), DstUpdate::Overwrite, q, k.t(), scale) };
    cpu_kernels::softmax_rows_serial(probs, t);
}

/// Self-attention of every head: `softmax(scale q k^T) v`.
///
/// # Shapes
/// - `qkv`: `[images * tokens, 3 * heads * head_dim]`, columns
///   `(q | k | v, head, head_dim)` -> `[images * tokens, heads * head_dim]`,
///   columns `(head, head_dim)`
pub(crate) fn forward(shape: HeadsShape, scale: f32, qkv: &[f32]) -> Vec<f32> {
    let HeadsShape { images, tokens: t, heads, head_dim } = shape;
    assert_eq!(qkv.len(), images * t * shape.qkv_width(), "attention: qkv of {} for {shape:?}", qkv.len());
    let len = images * t * shape.out_width();
    let mut out = Vec::<f32>::with_capacity(len);
    let block = shape.block_rows();
    let blocks = t.div_ceil(block);
    let dst = OutPtr(out.as_mut_ptr());
    (0..images * heads * blocks).into_par_iter().for_each_init(
        || vec![0.0f32; block * t],
        |scratch, task| {
            let (n, h, b) = (task / (heads * blocks), task / blocks % heads, task % blocks);
            let q0 = b * block;
            let rows = block.min(t - q0);
            let probs = &mut scratch[..rows * t];
            probabilities(&shape, scale, qkv, n, h, q0, probs);
            let v = rows_of(qkv[shape.qkv_at(n, 2, h)..].as_ptr(), shape.qkv_width());
            // SAFETY: the offset of row `q0` of head `h` of image `n` lies
            // within the output.
            let dst = unsafe { dst.at(shape.out_at(n, h) + q0 * shape.out_width()) };
            // SAFETY: rows `q0..q0 + rows` of head `h` of image `n` are this
            // task's alone and lie within the output's capacity; `v` spans
            // the image's `tokens` rows.
            unsafe {
                product(
                    rows,
                    head_dim,
                    t,
                    rows_of(dst, shape.out_width()),
                    DstUpdate::Overwrite,
                    rows_of(probs.as_ptr(), t),
                    v,
                    1.0,
                )
            };
        },
    );
    // SAFETY: the tasks wrote every row of every head.
    unsafe { out.set_len(len) };
    out
}

/// The gradient of [`forward`] with respect to `qkv`, given the output's
/// gradient `d_out`. The probabilities are recomputed as the forward pass
/// computed them.
///
/// # Shapes
/// - `qkv`: `[images * tokens, 3 * heads * head_dim]`, `d_out`:
///   `[images * tokens, heads * head_dim]` -> `[images * tokens, 3 * heads *
///   head_dim]`
pub(crate) fn backward(shape: HeadsShape, scale: f32, qkv: &[f32], d_out: &[f32]) -> Vec<f32> {
    let HeadsShape { images, tokens: t, heads, head_dim } = shape;
    let (width, out_width) = (shape.qkv_width(), shape.out_width());
    assert!(
        qkv.len() == images * t * width && d_out.len() == images * t * out_width,
        "attention backward: qkv of {} and gradient of {} for {shape:?}",
        qkv.len(),
        d_out.len()
    );
    let len = qkv.len();
    let mut d_qkv = Vec::<f32>::with_capacity(len);
    let block = shape.block_rows();
    let dst = OutPtr(d_qkv.as_mut_ptr());
    (0..images * heads).into_par_iter().for_each_init(
        || (vec![0.0f32; block * t], vec![0.0f32; block * t]),
        |(p_scratch, dp_scratch), task| {
            let (n, h) = (task / heads, task % heads);
            let (k, v) = (
                rows_of(qkv[shape.qkv_at(n, 1, h)..].as_ptr(), width),
                rows_of(qkv[shape.qkv_at(n, 2, h)..].as_ptr(), width),
            );
            // SAFETY: the offset of row `q0` of a head of image `n` lies within
            // the gradient's buffer.
            let at = |part: usize, q0: usize| rows_of(unsafe { dst.at(shape.qkv_at(n, part, h) + q0 * width) }, width);
            for q0 in (0..t).step_by(block) {
                let rows = block.min(t - q0);
                let (p, dp) = (&mut p_scratch[..rows * t], &mut dp_scratch[..rows * t]);
                probabilities(&shape, scale, qkv, n, h, q0, p);
                let q = rows_of(qkv[shape.qkv_at(n, 0, h) + q0 * width..].as_ptr(), width);
                let g = rows_of(d_out[shape.out_at(n, h) + q0 * out_width..].as_ptr(), out_width);
                let (p_mat, dp_mat) = (rows_of(p.as_ptr(), t), rows_of(dp.as_mut_ptr(), t));
                // The first block writes d_k and d_v, the others add to them.
                let sum = if q0 == 0 { DstUpdate::Overwrite } else { DstUpdate::Accumulate };
                // SAFETY: every operand spans rows of image `n` within its
                // buffer (`q`, `g` the block's rows, `k`, `v` and the d_k,
                // d_v destinations all `tokens` rows), `head_dim` columns
                // wide; the destinations in `d_qkv` are the columns of head
                // `h` of image `n`, this task's alone, and the scratch
                // matrices hold `rows x tokens`.
                unsafe {
                    // d_v (+)= p^T g.
                    product(t, head_dim, rows, at(2, 0), sum, p_mat.t(), g, 1.0);
                    // d_p = g v^T, then d_s = p * (d_p - rowsum(p * d_p)) in place.
                    product(rows, t, head_dim, dp_mat, DstUpdate::Overwrite, g, v.t(), 1.0);
                    cpu_kernels::softmax_backward_rows_in_place(p, dp, t);
                    let ds = rows_of(dp.as_ptr(), t);
                    // d_q = scale d_s k; d_k (+)= scale d_s^T q.
                    product(rows, head_dim, t, at(0, q0), DstUpdate::Overwrite, ds, k, scale);
                    product(t, head_dim, rows, at(1, 0), sum, ds.t(), q, scale);
                }
            }
        },
    );
    // SAFETY: each task wrote every row of its head's q, k and v columns.
    unsafe { d_qkv.set_len(len) };
    d_qkv
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic pseudo-random vector in `[-amp, amp)`.
    fn noise(len: usize, seed: u64, amp: f32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * amp
            })
            .collect()
    }

    /// The attention of one head in f64, written out: `(out, d_q, d_k, d_v)`
    /// for output gradient `g`, with `d_out` taken from `g`.
    #[allow(clippy::type_complexity)]
    fn reference(
        shape: HeadsShape,
        scale: f64,
        qkv: &[f32],
        g: &[f32],
        n: usize,
        h: usize,
    ) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
        let (t, hd, w, ow) = (shape.tokens, shape.head_dim, shape.qkv_width(), shape.out_width());
        let get = |part: usize, i: usize, c: usize| qkv[shape.qkv_at(n, part, h) + i * w + c] as f64;
        let gd = |i: usize, c: usize| g[shape.out_at(n, h) + i * ow + c] as f64;
        let mut p = vec![0.0f64; t * t];
        for i in 0..t {
            let s: Vec<f64> =
                (0..t).map(|j| scale * (0..hd).map(|c| get(0, i, c) * get(1, j, c)).sum::<f64>()).collect();
            let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
            let sum: f64 = e.iter().sum();
            for j in 0..t {
                p[i * t + j] = e[j] / sum;
            }
        }
        let mut out = vec![0.0; t * hd];
        let (mut dq, mut dk, mut dv) = (vec![0.0; t * hd], vec![0.0; t * hd], vec![0.0; t * hd]);
        for i in 0..t {
            for c in 0..hd {
                out[i * hd + c] = (0..t).map(|j| p[i * t + j] * get(2, j, c)).sum();
            }
            let dp: Vec<f64> = (0..t).map(|j| (0..hd).map(|c| gd(i, c) * get(2, j, c)).sum()).collect();
            let dot: f64 = (0..t).map(|j| p[i * t + j] * dp[j]).sum();
            for j in 0..t {
                let ds = p[i * t + j] * (dp[j] - dot) * scale;
                for c in 0..hd {
                    dq[i * hd + c] += ds * get(1, j, c);
                    dk[j * hd + c] += ds * get(0, i, c);
                    dv[j * hd + c] += p[i * t + j] * gd(i, c);
                }
            }
        }
        (out, dq, dk, dv)
    }

    fn check(shape: HeadsShape) {
        let scale = (shape.head_dim as f64).powf(-0.5);
        let rows = shape.images * shape.tokens;
        let qkv = noise(rows * shape.qkv_width(), 1, 2.0);
        let g = noise(rows * shape.out_width(), 2, 1.0);
        let out = forward(shape, scale as f32, &qkv);
        let d_qkv = backward(shape, scale as f32, &qkv, &g);
        let (hd, w, ow) = (shape.head_dim, shape.qkv_width(), shape.out_width());
        for n in 0..shape.images {
            for h in 0..shape.heads {
                let (r_out, dq, dk, dv) = reference(shape, scale, &qkv, &g, n, h);
                for i in 0..shape.tokens {
                    for c in 0..hd {
                        let close = |ours: f32, theirs: f64, what: &str| {
                            assert!(
                                (ours as f64 - theirs).abs() <= 1e-5 * (1.0 + theirs.abs()),
                                "{what} of image {n} head {h} at ({i}, {c}) in {shape:?}: {ours} vs {theirs}"
                            )
                        };
                        close(out[shape.out_at(n, h) + i * ow + c], r_out[i * hd + c], "output");
                        for (part, what, r) in [(0, "d_q", &dq), (1, "d_k", &dk), (2, "d_v", &dv)] {
                            close(d_qkv[shape.qkv_at(n, part, h) + i * w + c], r[i * hd + c], what);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn forward_and_backward_equal_the_written_out_attention() {
        // One block per head; several blocks, the last one short (the
        // accumulation of d_k and d_v across blocks); one token; odd widths.
        check(HeadsShape { images: 3, tokens: 16, heads: 2, head_dim: 8 });
        check(HeadsShape { images: 2, tokens: 300, heads: 3, head_dim: 5 });
        check(HeadsShape { images: 2, tokens: 1, heads: 2, head_dim: 4 });
        assert!(HeadsShape { images: 2, tokens: 300, heads: 3, head_dim: 5 }.block_rows() < 300);
    }

    #[test]
    fn empty_batches_give_empty_results() {
        let shape = HeadsShape { images: 0, tokens: 4, heads: 2, head_dim: 3 };
        assert!(forward(shape, 1.0, &[]).is_empty());
        assert!(backward(shape, 1.0, &[], &[]).is_empty());
    }
}
