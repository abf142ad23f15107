//! Matrix products, and linear layers, on the CPU backend without burn-flex's
//! output copy.
//!
//! burn-flex 0.21 allocates a product's output as a zeroed byte vector and
//! then copies it into a 16-byte-aligned buffer (`Bytes::from_bytes_vec`):
//! two extra passes over every output, and for the experts' weight gradients
//! (`n_experts x d_model x hidden`, 38 MB per matrix at DiffMoE-S-E16) fresh
//! pages on every step. Here the same `gemm` kernels write straight into an
//! f32 buffer that burn takes over as it is; the backward step registers
//! products of the same kind. Any other backend, float type or shape takes
//! burn's `matmul`, a single-row product as two rows ([`device_matmul`]).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{binary, Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::nn::Linear;
use burn::tensor::ops::FloatTensorOps;
use burn::tensor::{backend::Backend, Shape, Tensor, TensorPrimitive};
use burn_flex::{Flex, FlexTensor};
use rayon::prelude::*;

use crate::bias::{linear_then, AfterBias};
use crate::fused::{flex_from_vec, is_cpu, on_cpu_pair};

/// Products of at least this many multiply-adds split one matrix across
/// threads (burn-flex's threshold).
const PARALLEL_MATRIX: usize = 192 * 192 * 192;
/// Batches of at least this many multiply-adds in all run their matrices on
/// separate threads (burn-flex's threshold).
const PARALLEL_BATCH: usize = 128 * 128 * 128;

/// `lhs @ rhs`, as [`Tensor::matmul`]; written by `gemm` straight into its
/// output on the CPU backend when both operands have the same batch axes
/// (no broadcasting), by burn's `matmul` otherwise.
///
/// # Shapes
/// - `lhs`: `[..., m, k]`, `rhs`: `[..., k, n]` -> `[..., m, n]`
pub fn matmul<B: Backend, const D: usize>(lhs: Tensor<B, D>, rhs: Tensor<B, D>) -> Tensor<B, D> {
    let (ld, rd) = (lhs.dims(), rhs.dims());
    if D < 2 || ld[..D - 2] != rd[..D - 2] || ld[D - 1] != rd[D - 2] {
        return device_matmul(lhs, rhs);
    }
    on_cpu_pair(lhs, rhs, flex_matmul, autodiff_matmul::<D>).unwrap_or_else(|(lhs, rhs)| device_matmul(lhs, rhs))
}

/// burn's `lhs @ rhs`; on backends other than the CPU one, a product of
/// single rows (`m = 1`) is computed as one of two rows, the second zero,
/// and the first row kept.
///
/// burn 0.21's GPU backends (burn-cubecl-fusion's fused matmul, with
/// autotuning) give wrong results for some batched single-row products
/// (cubek's vector-matrix kernels, `MatmulKind::VecMat`), depending on the
/// kernel the autotuner picks. On `wgpu` over lavapipe, `[8, 1, 32] @ [8,
/// 32, 32]` followed by an elementwise op was off by up to 10 in one run,
/// `[8, 1, 96] @ [8, 96, 96]` in another, while two or more rows were
/// always right. Single rows arise in the experts' products when an expert
/// batch (or the last chunk of one) has one slot, and in attention over a
/// single token; the second row costs one row's products.
///
/// Under autodiff, the product is also reshaped to its own shape and back,
/// which ends burn's fused block at the product. burn 0.21's fusion
/// otherwise writes the ops that follow into the matmul's output kernel,
/// and under autodiff, which keeps their intermediates, that kernel gave
/// wrong results for some narrow products. On `wgpu` over lavapipe,
/// `[5, 4, 40] @ [5, 40, 160]`, plus a bias, then the tanh GELU, was off by
/// 0.2 to 0.5, and so was the EC-DiT training forward at `d_model` 24, 40
/// or 56 (`docs/benchmarks.md`, 2026-12-07, fourth session). Without
/// autodiff, without fusion, or with the reshape, the product was right.
///
/// # Shapes
/// - `lhs`: `[..., m, k]`, `rhs`: `[..., k, n]` (batch axes broadcast) -> `[..., m, n]`
fn device_matmul<B: Backend, const D: usize>(lhs: Tensor<B, D>, rhs: Tensor<B, D>) -> Tensor<B, D> {
    if D < 2 || is_cpu::<B>() {
        return lhs.matmul(rhs);
    }
    let product = if lhs.dims()[D - 2] == 1 { single_row_as_two(lhs, rhs) } else { lhs.matmul(rhs) };
    if B::ad_enabled(&product.device()) {
        let shape = product.shape();
        let elements = shape.num_elements();
        product.reshape([elements]).reshape(shape)
    } else {
        product
    }
}

/// `lhs @ rhs` for `lhs` of one row, computed on `[lhs; 0]` and the first
/// row kept (see [`device_matmul`]).
///
/// # Shapes
/// - `lhs`: `[..., 1, k]`, `rhs`: `[..., k, n]` -> `[..., 1, n]`
fn single_row_as_two<B: Backend, const D: usize>(lhs: Tensor<B, D>, rhs: Tensor<B, D>) -> Tensor<B, D> {
    let two_rows = Tensor::cat(vec![lhs.clone(), lhs.zeros_like()], D - 2);
    two_rows.matmul(rhs).narrow(D - 2, 0, 1)
}

/// `lhs @ rhs` where only the first `filled[i]` rows of matrix `i` are
/// needed: the products of experts over padded slots, in inference. On the
/// CPU backend (`Flex`, f32) only those rows are computed, and the rows below
/// them are zeros; elsewhere (GPU backends, autodiff) it is [`matmul`], and
/// they hold the product of whatever the padding holds. Callers weight those
/// rows by zero.
///
/// # Shapes
/// - `lhs`: `[batch, m, k]`, `rhs`: `[batch, k, n]`, `filled`: `batch`
///   counts, each at most `m` -> `[batch, m, n]`
pub fn matmul_filled_rows<B: Backend>(lhs: Tensor<B, 3>, rhs: Tensor<B, 3>, filled: &[usize]) -> Tensor<B, 3> {
    let [batch, m, _] = lhs.dims();
    assert!(filled.len() == batch && filled.iter().all(|&f| f <= m), "{filled:?} filled rows of {batch} x {m}");
    on_cpu_pair(lhs, rhs, |lhs, rhs| flex_product(lhs, rhs, Some(filled)), autodiff_matmul::<3>)
        .unwrap_or_else(|(lhs, rhs)| device_matmul(lhs, rhs))
}

/// `x @ weight + bias` of a burn [`Linear`] layer, its products by
/// [`matmul`] on the CPU backend (the layer's own forward elsewhere).
///
/// # Shapes
/// - `x`: `[rows, d_input]` -> `[rows, d_output]`
pub fn linear<B: Backend>(x: Tensor<B, 2>, layer: &Linear<B>) -> Tensor<B, 2> {
    linear_then(x, layer, AfterBias::Nothing)
}

/// A strided matrix operand: element `(r, c)` of batch item `b` at
/// `offset + b * batch + r * row + c * col`.
#[derive(Debug, Clone, Copy)]
struct Operand {
    offset: isize,
    batch: isize,
    row: isize,
    col: isize,
}

impl Operand {
    /// The operand's strides, when its batch axes (all but the last two)
    /// step through memory as one axis.
    fn of(t: &FlexTensor) -> Option<Self> {
        let layout = t.layout();
        let (shape, s) = (layout.shape(), layout.strides());
        let d = s.len();
        let axes: Vec<usize> = (0..d - 2).filter(|&i| shape[i] > 1).collect();
        let collapsible = axes.windows(2).all(|w| s[w[0]] == s[w[1]] * shape[w[1]] as isize);
        let batch = axes.last().map_or(0, |&i| s[i]);
        collapsible.then(|| Self { offset: layout.start_offset() as isize, batch, row: s[d - 2], col: s[d - 1] })
    }
}

/// Raw pointer to an output buffer shared by tasks on rayon's threads,
/// each writing its own elements (a batch's matrices here, attention's
/// heads and query blocks in `attention_kernel`).
#[derive(Clone, Copy)]
pub(crate) struct OutPtr(pub(crate) *mut f32);
// SAFETY: its users' tasks write disjoint elements of the output.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// The element `offset` past the start (a method, so that closures
    /// capture the whole `OutPtr`).
    ///
    /// # Safety
    /// `offset` lies within the output's allocation.
    pub(crate) unsafe fn at(self, offset: usize) -> *mut f32 {
        unsafe { self.0.add(offset) }
    }
}

/// `lhs @ rhs` on f32 CPU tensors with the same batch axes, read through
/// their strides (transposed views are not copied); burn-flex's product when
/// a batch layout does not step as one axis.
///
/// # Shapes
/// - `lhs`: `[..., m, k]`, `rhs`: `[..., k, n]` -> `[..., m, n]`
pub(crate) fn flex_matmul(lhs: FlexTensor, rhs: FlexTensor) -> FlexTensor {
    flex_product(lhs, rhs, None)
}

/// [`flex_matmul`], computing only the first `filled[i]` rows of matrix `i`
/// when `filled` is given and zeroing the rest.
fn flex_product(lhs: FlexTensor, rhs: FlexTensor, filled: Option<&[usize]>) -> FlexTensor {
    let (ls, rs) = (lhs.layout().shape().clone(), rhs.layout().shape().clone());
    let d = ls.num_dims();
    let (m, k, n) = (ls[d - 2], ls[d - 1], rs[d - 1]);
    assert!(
        d >= 2 && rs.num_dims() == d && rs[d - 2] == k && (0..d - 2).all(|i| ls[i] == rs[i]),
        "flex_matmul: shapes {ls:?} @ {rs:?}"
    );
    let (Some(a), Some(b)) = (Operand::of(&lhs), Operand::of(&rhs)) else {
        // (All rows; the experts' gathered inputs never come this way.)
        return <Flex as FloatTensorOps<Flex>>::float_matmul(lhs, rhs);
    };
    let batch: usize = (0..d - 2).map(|i| ls[i]).product();
    // The rows computed of each matrix.
    let rows = |i: usize| filled.map_or(m, |f| f[i]);
    let mut dims: Vec<usize> = ls.iter().copied().collect();
    dims[d - 1] = n;
    let len = batch * m * n;
    let mut out = Vec::<f32>::with_capacity(len);
    if k == 0 {
        out.resize(len, 0.0);
    } else if len > 0 {
        let (a_data, b_data) = (lhs.storage::<f32>(), rhs.storage::<f32>());
        let dst = OutPtr(out.as_mut_ptr());
        // The first `rows` rows of matrix `i` of the product into `out`,
        // element `(r, c)` at `r * out_row + c * out_col`: gemm writes all
        // `rows x n` entries (`read_dst` is false), so the buffer needs no
        // initialisation.
        let product =
            |out: *mut f32, out_row: isize, out_col: isize, i: usize, rows: usize, parallelism: gemm::Parallelism| {
                let i_ = i as isize;
                // SAFETY: the offsets address elements of the operands' buffers
                // (their layouts describe views into them), `rows <= m`, and the
                // caller's `out` holds `rows x n` elements at the given strides.
                unsafe {
                    gemm::gemm(
                        rows,
                        n,
                        k,
                        out,
                        out_col,
                        out_row,
                        false,
                        a_data.as_ptr().offset(a.offset + i_ * a.batch),
                        a.col,
                        a.row,
                        b_data.as_ptr().offset(b.offset + i_ * b.batch),
                        b.col,
                        b.row,
                        0.0f32,
                        1.0f32,
                        false,
                        false,
                        false,
                        parallelism,
                    )
                }
            };
        // Matrix `i`: its first `rows` rows, then zeros down to `m`. A
        // matrix on a thread of its own goes column-major where that pays.
        let matrix = |i: usize, parallelism: Option<gemm::Parallelism>| {
            let rows = rows(i);
            if rows > 0 {
                // SAFETY: matrix `i` of the output lies within its capacity.
                let out = unsafe { dst.at(i * m * n) };
                if parallelism.is_none() && b.row == 1 && column_major_pays(rows, k, n) {
                    // Through a column-major scratch buffer, transposed into place.
                    let mut scratch = Vec::<f32>::with_capacity(rows * n);
                    product(scratch.as_mut_ptr(), 1, rows as isize, i, rows, gemm::Parallelism::None);
                    // SAFETY: gemm wrote all `rows x n` elements.
                    unsafe { scratch.set_len(rows * n) };
                    // SAFETY: the first `rows` rows of matrix `i` lie within the capacity.
                    transpose_into(&scratch, rows, n, unsafe { core::slice::from_raw_parts_mut(out, rows * n) });
                } else {
                    product(out, n as isize, 1, i, rows, parallelism.unwrap_or(gemm::Parallelism::None));
                }
            }
            // SAFETY: rows `rows..m` of matrix `i` lie within the capacity.
            unsafe { dst.at(i * m * n + rows * n).write_bytes(0, (m - rows) * n) };
        };
        let work = filled.map_or(batch * m, |f| f.iter().sum()) * n * k;
        if batch >= 4 && work >= PARALLEL_BATCH {
            (0..batch).into_par_iter().for_each(|i| matrix(i, None));
        } else {
            (0..batch).for_each(|i| {
                let parallelism = if rows(i) * n * k >= PARALLEL_MATRIX {
                    gemm::Parallelism::Rayon(0)
                } else {
                    gemm::Parallelism::None
                };
                matrix(i, Some(parallelism))
            });
        }
        // SAFETY: every element was written above.
        unsafe { out.set_len(len) };
    }
    flex_from_vec(out, Shape::from(dims))
}

/// Whether a product with a column-major right operand (`m x k` by
/// `k x n`: the experts' `x @ w^T` with their weights stored
/// `[d_output, d_input]`, in training and inference) is faster written
/// column-major and transposed than written row-major.
///
/// gemm packs the left operand of the product it computes into panels (one
/// pass over it) and reads a column-major right operand in place. For a
/// row-major result it computes the transposed product, so the right
/// operand, all `k x n` of it, is packed; for a column-major result only the
/// left one, `m x k`, is, at the price of transposing the `m x n` result.
/// That pays while `m (k + n) < k n` and the rows are few enough: beyond 128
/// rows gemm's in-place reads of the right operand lose to its packed ones
/// (single-thread measurements on the 2-core x86-64 machine of
/// docs/benchmarks.md, `k x n` of `384 x 1536` to `4096 x 1024`: the
/// column-major product 5-20% faster at 64 to 128 rows, up to 10% slower
/// at 192 and 256).
fn column_major_pays(m: usize, k: usize, n: usize) -> bool {
    m <= 128 && m * (k + n) < k * n
}

/// `out` (row-major `rows x cols`) = the column-major `col_major`, in
/// bands of rows so that each read is a short contiguous run.
fn transpose_into(col_major: &[f32], rows: usize, cols: usize, out: &mut [f32]) {
    const BAND: usize = 16;
    for r0 in (0..rows).step_by(BAND) {
        let r1 = (r0 + BAND).min(rows);
        for c in 0..cols {
            let column = &col_major[c * rows + r0..c * rows + r1];
            for (r, &v) in (r0..r1).zip(column) {
                out[r * cols + c] = v;
            }
        }
    }
}

/// Backward step of a product: keeps the operand each gradient needs (the
/// right one for the left's gradient and the other way round).
#[derive(Debug)]
struct MatmulBackward;

/// How the right operand of a product lies in memory, which its gradient
/// follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RhsLayout {
    /// Row-major, or any layout other than the one below.
    RowMajor,
    /// Column-major: the transposed view of a row-major matrix, as the
    /// experts' `w^T` of a weight stored `[d_output, d_input]`.
    ColumnMajor,
}

impl RhsLayout {
    fn of(t: &FlexTensor) -> Self {
        match Operand::of(t) {
            Some(o) if o.row == 1 && o.col != 1 => Self::ColumnMajor,
            _ => Self::RowMajor,
        }
    }
}

impl Backward<Flex, 2> for MatmulBackward {
    /// `(lhs, rhs, rhs layout)`, each operand kept when the other one is
    /// tracked.
    type State = (Option<FlexTensor>, Option<FlexTensor>, RhsLayout);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let (lhs, rhs, rhs_layout) = ops.state;
        let transposed = |t: FlexTensor| {
            let d = t.layout().shape().num_dims();
            t.transpose(d - 2, d - 1)
        };
        binary::<Flex, _, _>(
            ops.parents,
            ops.node,
            grads,
            |g| flex_matmul(g, transposed(rhs.expect("kept for the left operand's gradient"))),
            |g| {
                let lhs = lhs.expect("kept for the right operand's gradient");
                match rhs_layout {
                    RhsLayout::RowMajor => flex_matmul(transposed(lhs), g),
                    // `(g^T @ lhs)^T`: written in the memory order of the
                    // matrix the operand views, so that the view's own
                    // backward step hands that matrix a contiguous gradient.
                    RhsLayout::ColumnMajor => transposed(flex_matmul(transposed(g), lhs)),
                }
            },
        );
    }
}

fn autodiff_matmul<const D: usize>(
    lhs: Tensor<Autodiff<Flex>, D>,
    rhs: Tensor<Autodiff<Flex>, D>,
) -> Tensor<Autodiff<Flex>, D> {
    let (lhs, rhs) = (lhs.into_primitive().tensor(), rhs.into_primitive().tensor());
    let (lhs_tracked, rhs_tracked) = (lhs.is_tracked(), rhs.is_tracked());
    let rhs_layout = RhsLayout::of(&rhs.primitive);
    let out = match MatmulBackward
        .prepare::<NoCheckpointing>([lhs.node.clone(), rhs.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let y = flex_matmul(lhs.primitive.clone(), rhs.primitive.clone());
            prep.finish((rhs_tracked.then_some(lhs.primitive), lhs_tracked.then_some(rhs.primitive), rhs_layout), y)
        }
        OpsKind::UnTracked(prep) => prep.finish(flex_matmul(lhs.primitive, rhs.primitive)),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accuracy::{assert_each_as_accurate, in_f64};
    use burn::tensor::{Distribution, TensorData, Tolerance};

    type Ad = Autodiff<Flex>;

    fn rand<B: Backend, const D: usize>(shape: [usize; D]) -> Tensor<B, D> {
        Tensor::random(shape, Distribution::Normal(0.0, 1.0), &Default::default())
    }

    /// Output and both gradients of `op(lhs, rhs)` weighted by `w`, on
    /// transposed views of `lhs` and `rhs` (the layouts of backward passes).
    #[allow(clippy::type_complexity)]
    fn run<const D: usize>(
        op: &dyn Fn(Tensor<Ad, D>, Tensor<Ad, D>) -> Tensor<Ad, D>,
        lhs_t: &Tensor<Ad, D>,
        rhs: &Tensor<Ad, D>,
        w: &Tensor<Ad, D>,
    ) -> [TensorData; 3] {
        let y = op(lhs_t.clone().swap_dims(D - 2, D - 1), rhs.clone());
        let grads = (y.clone() * w.clone().cast(y.dtype())).sum().backward();
        [y.inner(), lhs_t.grad(&grads).expect("lhs tracked"), rhs.grad(&grads).expect("rhs tracked")]
            .map(Tensor::into_data)
    }

    fn equals_burn<const D: usize>(lhs_t: [usize; D], rhs: [usize; D], out: [usize; D]) {
        let (lhs_t, rhs) = (rand::<Ad, D>(lhs_t).require_grad(), rand::<Ad, D>(rhs).require_grad());
        let w = rand::<Ad, D>(out);
        let ours = run(&|a, b| matmul(a, b), &lhs_t, &rhs, &w);
        let burns = run(&|a, b| a.matmul(b), &lhs_t, &rhs, &w);
        let exact = run(&|a, b| in_f64(a).matmul(in_f64(b)), &lhs_t, &rhs, &w);
        assert_each_as_accurate(&["product", "dlhs", "drhs"], &ours, &burns, &exact);
    }

    /// The GPU backends' single-row fallback has burn's values and
    /// gradients, broadcast batch axes included.
    #[test]
    fn single_row_as_two_equals_burns_product() {
        fn check<const D: usize>(lhs: [usize; D], rhs: [usize; D], out: [usize; D]) {
            let (lhs, rhs) = (rand::<Ad, D>(lhs).require_grad(), rand::<Ad, D>(rhs).require_grad());
            let w = rand::<Ad, D>(out);
            let grads_of = |y: Tensor<Ad, D>| {
                let grads = (y.clone() * w.clone()).sum().backward();
                [y.inner(), lhs.grad(&grads).expect("lhs tracked"), rhs.grad(&grads).expect("rhs tracked")]
            };
            let ours = grads_of(single_row_as_two(lhs.clone(), rhs.clone()));
            let burns = grads_of(lhs.clone().matmul(rhs.clone()));
            for (a, b) in ours.into_iter().zip(burns) {
                assert_eq!(a.dims(), b.dims());
                a.into_data().assert_approx_eq::<f32>(&b.into_data(), Tolerance::rel_abs(1e-5, 1e-5));
            }
        }
        check([1, 7], [7, 5], [1, 5]);
        check([8, 1, 96], [8, 96, 96], [8, 1, 96]);
        check([2, 3, 1, 16], [2, 3, 16, 4], [2, 3, 1, 4]);
        check([2, 3, 1, 16], [1, 1, 16, 4], [2, 3, 1, 4]);
    }

    #[test]
    fn products_and_gradients_equal_burns() {
        // One matrix; one large enough to split across threads; a small batch.
        equals_burn([7, 5], [7, 300], [5, 300]);
        equals_burn([200, 230], [200, 210], [230, 210]);
        equals_burn([3, 7, 5], [3, 7, 9], [3, 5, 9]);
        // Batch items on separate threads; the left gradient, `g @ rhs^T`,
        // has a column-major right operand larger than its rows and the
        // result together (the transposing path).
        assert!(column_major_pays(32, 300, 256));
        equals_burn([6, 256, 32], [6, 256, 300], [6, 32, 300]);
        // The same with more rows than pay: written row-major.
        assert!(!column_major_pays(160, 96, 64));
        equals_burn([4, 64, 160], [4, 64, 96], [4, 160, 96]);
        equals_burn([2, 3, 16, 8], [2, 3, 16, 8], [2, 3, 8, 8]); // two batch axes, as attention's
    }

    #[test]
    fn a_transposed_weight_gets_its_gradient_in_its_own_layout() {
        // `x @ w^T` with `w` stored `[batch, n, k]`, as the experts' weights:
        // the product, both gradients, and `w`'s gradient contiguous in
        // `w`'s layout (no copy before the optimizer reads it).
        for [batch, m, k, n] in [[6, 64, 96, 160], [2, 3, 4, 5], [4, 200, 64, 48]] {
            let x = rand::<Ad, 3>([batch, m, k]).require_grad();
            let w = rand::<Ad, 3>([batch, n, k]).require_grad();
            let g = rand::<Ad, 3>([batch, m, n]);
            let run = |op: &dyn Fn(Tensor<Ad, 3>, Tensor<Ad, 3>) -> Tensor<Ad, 3>| {
                let y = op(x.clone(), w.clone().swap_dims(1, 2));
                let grads = (y.clone() * g.clone().cast(y.dtype())).sum().backward();
                [y.inner(), x.grad(&grads).unwrap(), w.grad(&grads).unwrap()]
            };
            let ours = run(&|a, b| matmul(a, b));
            let w_grad = crate::fused::flex_f32(ours[2].clone()).unwrap_or_else(|_| unreachable!("Flex"));
            assert!(w_grad.is_contiguous(), "w's gradient of {:?}", [batch, m, k, n]);
            let [ours, burns, exact] = [ours, run(&|a, b| a.matmul(b)), run(&|a, b| in_f64(a).matmul(in_f64(b)))]
                .map(|results| results.map(Tensor::into_data));
            assert_each_as_accurate(&["y", "dx", "dw"], &ours, &burns, &exact);
        }
    }

    #[test]
    fn filled_rows_are_the_products_rows_and_zeros_below() {
        // Serial (small) and batch-parallel (large) products, with empty,
        // partial and full matrices, and right operands row-major and
        // column-major (the experts' `w^T`, whose products may go through a
        // column-major scratch buffer).
        let cases = [
            ([3, 5, 4, 6], vec![0, 5, 2]),
            ([5, 64, 96, 128], vec![64, 0, 1, 40, 63]),
            ([2, 300, 200, 210], vec![300, 17]),
            ([4, 256, 96, 384], vec![256, 100, 0, 3]),
        ];
        for ((shape, filled), column_major) in cases.iter().flat_map(|c| [(c, false), (c, true)]) {
            let [batch, m, k, n] = *shape;
            let rhs = match column_major {
                false => rand::<Flex, 3>([batch, k, n]),
                true => rand::<Flex, 3>([batch, n, k]).swap_dims(1, 2),
            };
            let (lhs, rhs) = (rand::<Flex, 3>([batch, m, k]), rhs);
            let full: Vec<f32> = matmul(lhs.clone(), rhs.clone()).into_data().to_vec().unwrap();
            let ours: Vec<f32> = matmul_filled_rows(lhs, rhs, filled).into_data().to_vec().unwrap();
            for (i, &f) in filled.iter().enumerate() {
                let (start, split, end) = (i * m * n, (i * m + f) * n, (i + 1) * m * n);
                if column_major {
                    // gemm's kernels for few rows (one row is a matrix-vector
                    // product) sum in another order than the full product's.
                    let close = ours[start..split]
                        .iter()
                        .zip(&full[start..split])
                        .all(|(a, b)| (a - b).abs() <= 1e-5 * (1.0 + b.abs()) * (k as f32).sqrt());
                    assert!(close, "matrix {i} of {shape:?}, column-major");
                } else {
                    assert_eq!(ours[start..split], full[start..split], "matrix {i} of {shape:?}");
                }
                assert!(ours[split..end].iter().all(|&v| v == 0.0), "matrix {i} of {shape:?}");
            }
        }
        // Elsewhere it is the whole product.
        let (lhs, rhs) = (rand::<Ad, 3>([2, 3, 4]), rand::<Ad, 3>([2, 4, 5]));
        matmul_filled_rows(lhs.clone(), rhs.clone(), &[1, 0])
            .into_data()
            .assert_eq(&matmul(lhs, rhs).into_data(), true);
    }

    #[test]
    #[should_panic(expected = "filled rows")]
    fn filled_rows_beyond_the_matrix_are_refused() {
        matmul_filled_rows(rand::<Flex, 3>([1, 2, 3]), rand::<Flex, 3>([1, 3, 4]), &[3]);
    }

    #[test]
    fn empty_and_unsupported_shapes() {
        let zero_k = matmul(rand::<Flex, 2>([3, 0]), rand::<Flex, 2>([0, 4]));
        zero_k.into_data().assert_eq(&Tensor::<Flex, 2>::zeros([3, 4], &Default::default()).into_data(), true);
        assert_eq!(matmul(rand::<Flex, 3>([2, 0, 3]), rand::<Flex, 3>([2, 3, 4])).dims(), [2, 0, 4]);
        // Batch axes that do not step as one take burn-flex's product.
        let (a, b) = (rand::<Flex, 4>([3, 2, 4, 5]).swap_dims(0, 1), rand::<Flex, 4>([2, 3, 5, 6]));
        matmul(a.clone(), b.clone()).into_data().assert_eq(&a.matmul(b).into_data(), true);
        // A broadcast batch takes burn's matmul.
        let (a, b) = (rand::<Flex, 3>([1, 2, 3]), rand::<Flex, 3>([4, 3, 5]));
        matmul(a.clone(), b.clone()).into_data().assert_eq(&a.matmul(b).into_data(), true);
    }

    #[test]
    fn linear_equals_the_layer() {
        let device = Default::default();
        for bias in [true, false] {
            let layer = burn::nn::LinearConfig::new(6, 4).with_bias(bias).init::<Ad>(&device);
            let x = rand::<Ad, 2>([5, 6]);
            linear(x.clone(), &layer)
                .into_data()
                .assert_approx_eq::<f32>(&layer.forward(x).into_data(), Tolerance::absolute(1e-6));
        }
    }
}
