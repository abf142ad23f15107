//! The two data movements of expert routing on the token pool: the tokens
//! each expert takes gathered into its rows ([`gather_rows`]), and each
//! expert row's output, scaled by its routing weight, added back into the
//! row of its token ([`combine`]; official `SparseMoEBlock`: a scatter-add of
//! `expert_output * weight`).
//!
//! As burn ops they are `select`, a broadcast multiply and `select_assign`;
//! in training their backward steps add a `select_add` into zeros, a gather
//! of the output gradient, a broadcast multiply and a product summed over the
//! width for the weights' gradient: some eight passes over the `[rows,
//! d_model]` expert rows besides the accumulator's copy and zeroing. On the
//! CPU backend (`Flex`, `Autodiff<Flex>`) each is one op over rows in
//! parallel. Where several rows come from one token they are summed into it
//! in row order, as `select_assign` and `select_add` add them, so the values
//! and the gradients of the tokens and of the expert rows have the same bits
//! as the ops; the weights' gradient is a dot product per row, summed in
//! another order than burn's. Other backends take the ops.

use core::any::TypeId;
use core::mem::MaybeUninit;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::tensor::{backend::Backend, DType, IndexingUpdateOp, Int, Shape, Tensor, TensorPrimitive};
use burn_flex::{Flex, FlexTensor};
use rayon::prelude::*;

use crate::cpu_kernels::{multiversion, row_dot};
use crate::fused::{cast, flex_contiguous, flex_from_vec, from_flex, is_cpu, on_cpu, same_type};
use crate::row_groups::filled;

type Ad = Autodiff<Flex>;

/// Elements of the output per rayon task.
const TASK_ELEMS: usize = 16 * 1024;

/// `x[indices[r]]` for every row `r`: the tokens gathered into expert rows.
///
/// # Shapes
/// - `x`: `[tokens, width]`, `indices`: `[rows]` (each `< tokens`) ->
///   `[rows, width]`
///
/// # Panics
/// If an index is not a row of `x` (as burn's `select`).
pub(crate) fn gather_rows<B: Backend>(x: Tensor<B, 2>, indices: Tensor<B, 1, Int>) -> Tensor<B, 2> {
    let [tokens, width] = x.dims();
    if !(is_cpu::<B>() && x.dtype() == DType::F32 && width > 0) {
        return x.select(0, indices);
    }
    let rows = host_indices(indices, tokens);
    on_cpu(x, |x| flex_gather_rows(x, &rows), |x| autodiff_gather_rows(x, &rows))
        .unwrap_or_else(|_| unreachable!("the CPU backend with f32 data"))
}

/// `acc[indices[r]] += weights[r] * outputs[r]` for every row `r`, in row
/// order: the expert outputs combined into their tokens.
///
/// # Shapes
/// - `acc`: `[tokens, width]`, `indices`: `[rows]` (each `< tokens`),
///   `outputs`: `[rows, width]`, `weights`: `[rows]` -> `[tokens, width]`
///
/// # Panics
/// If an index is not a row of `acc` (as burn's `select_assign`).
pub(crate) fn combine<B: Backend>(
    acc: Tensor<B, 2>,
    indices: Tensor<B, 1, Int>,
    outputs: Tensor<B, 2>,
    weights: Tensor<B, 1>,
) -> Tensor<B, 2> {
    let [tokens, width] = acc.dims();
    let f32s = [acc.dtype(), outputs.dtype(), weights.dtype()].iter().all(|&d| d == DType::F32);
    if !(is_cpu::<B>() && f32s && width > 0) {
        return acc.select_assign(0, indices, outputs * weights.unsqueeze_dim(1), IndexingUpdateOp::Add);
    }
    let rows = host_indices(indices, tokens);
    if TypeId::of::<B>() == TypeId::of::<Flex>() {
        let (acc, outputs, weights): (Tensor<Flex, 2>, Tensor<Flex, 2>, Tensor<Flex, 1>) =
            (cast(acc), cast(outputs), cast(weights));
        let prim = |t: TensorPrimitive<Flex>| t.tensor();
        let y = flex_combine(
            prim(acc.into_primitive()),
            &rows,
            prim(outputs.into_primitive()),
            prim(weights.into_primitive()),
        );
        return from_flex(y);
    }
    cast(autodiff_combine(cast(acc), rows, cast(outputs), cast(weights)))
}

/// The indices as `usize`, each checked against the `tokens` rows. On the
/// CPU backend they are in host memory already: read in place, no device
/// transfer (the top-k and compaction kernels wrote them there).
fn host_indices<B: Backend>(indices: Tensor<B, 1, Int>, tokens: usize) -> Vec<usize> {
    let t: FlexTensor = match same_type::<_, Tensor<Flex, 1, Int>>(indices) {
        Ok(t) => t.into_primitive(),
        Err(t) => cast::<_, Tensor<Ad, 1, Int>>(t).into_primitive(),
    };
    let t = if t.is_contiguous() { t } else { t.to_contiguous() };
    let offset = t.layout().start_offset();
    let len = t.layout().num_elements();
    let check = |i: i64| {
        assert!(i >= 0 && (i as usize) < tokens, "expert rows: index {i} outside a pool of {tokens} tokens");
        i as usize
    };
    match t.dtype() {
        DType::I64 => t.storage::<i64>()[offset..offset + len].iter().map(|&i| check(i)).collect(),
        DType::I32 => t.storage::<i32>()[offset..offset + len].iter().map(|&i| check(i as i64)).collect(),
        _ => Tensor::<Flex, 1, Int>::from_primitive(t).into_data().iter::<i64>().map(check).collect(),
    }
}

/// The rows of each token, in row order: token `t`'s are
/// `rows[starts[t]..starts[t + 1]]` (the inverse of `indices`).
struct TokenRows {
    starts: Vec<usize>,
    rows: Vec<usize>,
}

impl TokenRows {
    fn new(indices: &[usize], tokens: usize) -> Self {
        let mut starts = vec![0usize; tokens + 1];
        for &t in indices {
            starts[t + 1] += 1;
        }
        for t in 0..tokens {
            starts[t + 1] += starts[t];
        }
        let mut next = starts[..tokens].to_vec();
        let mut rows = vec![0usize; indices.len()];
        for (r, &t) in indices.iter().enumerate() {
            rows[next[t]] = r;
            next[t] += 1;
        }
        Self { starts, rows }
    }

    fn of(&self, token: usize) -> &[usize] {
        &self.rows[self.starts[token]..self.starts[token + 1]]
    }
}

/// `y[t] += weights[r] * outputs[r]` for the rows `r` of each token `t` of
/// `y` (tokens `first..`), in row order: the product rounded, then added, as
/// the two ops give it.
#[inline(always)]
fn add_weighted_rows(
    y: &mut [f32],
    width: usize,
    first: usize,
    token_rows: &TokenRows,
    outputs: &[f32],
    weights: &[f32],
) {
    for (i, y) in y.chunks_exact_mut(width).enumerate() {
        for &r in token_rows.of(first + i) {
            let w = weights[r];
            for (y, &o) in y.iter_mut().zip(&outputs[r * width..(r + 1) * width]) {
                *y += w * o;
            }
        }
    }
}

/// `y[i] = x[indices[i]]` for each row `i` of `y`.
#[inline(always)]
fn copy_token_rows(x: &[f32], width: usize, indices: &[usize], y: &mut [MaybeUninit<f32>]) {
    for (y, &t) in y.chunks_exact_mut(width).zip(indices) {
        for (y, &x) in y.iter_mut().zip(&x[t * width..(t + 1) * width]) {
            y.write(x);
        }
    }
}

/// `dx[t] += g[r1] + g[r2] + ...` over the rows of each token `t` of `dx`
/// (tokens `first..`), in row order: on zeros, the gradient of
/// [`gather_rows`] as `select_add` into zeros gives it.
#[inline(always)]
fn sum_token_rows(dx: &mut [f32], width: usize, first: usize, token_rows: &TokenRows, g: &[f32]) {
    for (i, dx) in dx.chunks_exact_mut(width).enumerate() {
        for &r in token_rows.of(first + i) {
            for (d, &g) in dx.iter_mut().zip(&g[r * width..(r + 1) * width]) {
                *d += g;
            }
        }
    }
}

/// `d_outputs[i] = g[indices[i]] * weights[i]` for each row `i`: the
/// gradient of `weights * outputs` for the outputs, as burn's multiply gives
/// it.
#[inline(always)]
fn scaled_token_rows(g: &[f32], width: usize, indices: &[usize], weights: &[f32], d_outputs: &mut [MaybeUninit<f32>]) {
    for ((d, &t), &w) in d_outputs.chunks_exact_mut(width).zip(indices).zip(weights) {
        for (d, &g) in d.iter_mut().zip(&g[t * width..(t + 1) * width]) {
            d.write(g * w);
        }
    }
}

/// `d_weights[i] = g[indices[i]] . outputs[i]` for each row `i`: the
/// gradient of `weights * outputs` for the weights.
#[inline(always)]
fn token_row_dots(g: &[f32], width: usize, indices: &[usize], outputs: &[f32], d_weights: &mut [f32]) {
    for ((d, &t), o) in d_weights.iter_mut().zip(indices).zip(outputs.chunks_exact(width)) {
        *d = row_dot(o, &g[t * width..(t + 1) * width]);
    }
}

multiversion!(sum_token_rows_best, sum_token_rows, (dx: &mut [f32], width: usize, first: usize, token_rows: &TokenRows, g: &[f32]));
multiversion!(add_weighted_rows_best, add_weighted_rows, (y: &mut [f32], width: usize, first: usize, token_rows: &TokenRows, outputs: &[f32], weights: &[f32]));
multiversion!(scaled_token_rows_best, scaled_token_rows, (g: &[f32], width: usize, indices: &[usize], weights: &[f32], d_outputs: &mut [MaybeUninit<f32>]));
multiversion!(token_row_dots_best, token_row_dots, (g: &[f32], width: usize, indices: &[usize], outputs: &[f32], d_weights: &mut [f32]));

/// Rows of `width` elements per rayon task.
fn task_rows(width: usize) -> usize {
    (TASK_ELEMS / width.max(1)).max(1)
}

/// The gathered rows, in a new buffer.
fn flex_gather_rows(x: FlexTensor, indices: &[usize]) -> FlexTensor {
    let x = flex_contiguous(x);
    let width = x.layout().shape()[1];
    let (xs, task) = (x.storage::<f32>(), task_rows(width));
    let y = filled(indices.len() * width, |y| {
        y.par_chunks_mut(task * width)
            .zip(indices.par_chunks(task))
            .for_each(|(y, indices)| copy_token_rows(xs, width, indices, y))
    });
    flex_from_vec(y, Shape::new([indices.len(), width]))
}

/// Backward step of [`gather_rows`] on `Autodiff<Flex>`: keeps the indices
/// and the pool's size.
#[derive(Debug)]
struct GatherRowsBackward;

impl Backward<Flex, 1> for GatherRowsBackward {
    /// `(indices, tokens)`.
    type State = (Vec<usize>, usize);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let (indices, tokens) = ops.state;
        let g = flex_contiguous(grads.consume::<Flex>(&ops.node));
        let [node] = ops.parents;
        let Some(node) = node else { return };
        let width = g.layout().shape()[1];
        let (gs, task) = (g.storage::<f32>(), task_rows(width));
        let token_rows = TokenRows::new(&indices, tokens);
        let mut dx = vec![0.0f32; tokens * width];
        dx.par_chunks_mut(task * width)
            .enumerate()
            .for_each(|(i, dx)| sum_token_rows_best(dx, width, i * task, &token_rows, gs));
        grads.register::<Flex>(node.id, flex_from_vec(dx, Shape::new([tokens, width])));
    }
}

/// [`gather_rows`] under autodiff on the CPU backend.
fn autodiff_gather_rows(x: Tensor<Ad, 2>, indices: &[usize]) -> Tensor<Ad, 2> {
    let tokens = x.dims()[0];
    let x = x.into_primitive().tensor();
    let out = match GatherRowsBackward.prepare::<NoCheckpointing>([x.node.clone()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => {
            let y = flex_gather_rows(x.primitive, indices);
            prep.finish((indices.to_vec(), tokens), y)
        }
        OpsKind::UnTracked(prep) => prep.finish(flex_gather_rows(x.primitive, indices)),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

/// The forward pass into `acc`'s buffer (in place when `acc` is its only
/// holder).
fn flex_combine(acc: FlexTensor, indices: &[usize], outputs: FlexTensor, weights: FlexTensor) -> FlexTensor {
    let mut acc = flex_contiguous(acc);
    let (outputs, weights) = (flex_contiguous(outputs), flex_contiguous(weights));
    let shape = acc.layout().shape().clone();
    let (tokens, width) = (shape[0], shape[1]);
    let (outputs, weights) = (outputs.storage::<f32>(), weights.storage::<f32>());
    assert!(
        weights.len() == indices.len() && outputs.len() == indices.len() * width,
        "combine: {} indices, {} weights and {} output elements for rows of {width}",
        indices.len(),
        weights.len(),
        outputs.len()
    );
    if indices.is_empty() {
        return acc;
    }
    let token_rows = TokenRows::new(indices, tokens);
    let task = task_rows(width);
    acc.storage_mut::<f32>()
        .par_chunks_mut(task * width)
        .enumerate()
        .for_each(|(i, y)| add_weighted_rows_best(y, width, i * task, &token_rows, outputs, weights));
    acc
}

/// Backward step of [`combine`] on `Autodiff<Flex>`.
#[derive(Debug)]
struct CombineBackward;

/// What the backward step keeps: the token of each row, the weights (for
/// the outputs' gradient) and the outputs (for the weights' gradient).
#[derive(Debug, Clone)]
struct CombineState {
    indices: Vec<usize>,
    outputs: Option<FlexTensor>,
    weights: Option<FlexTensor>,
}

impl Backward<Flex, 3> for CombineBackward {
    type State = CombineState;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let CombineState { indices, outputs, weights } = ops.state;
        let g = flex_contiguous(grads.consume::<Flex>(&ops.node));
        let width = g.layout().shape()[1];
        let [acc_node, outputs_node, weights_node] = ops.parents;
        let (rows, task) = (indices.len(), task_rows(width));
        let gs = g.storage::<f32>();
        if let (Some(node), Some(weights)) = (outputs_node, weights) {
            let weights = flex_contiguous(weights);
            let weights = weights.storage::<f32>();
            let d_outputs = filled(rows * width, |d| {
                d.par_chunks_mut(task * width)
                    .zip(indices.par_chunks(task))
                    .zip(weights.par_chunks(task))
                    .for_each(|((d, indices), weights)| scaled_token_rows_best(gs, width, indices, weights, d))
            });
            grads.register::<Flex>(node.id, flex_from_vec(d_outputs, Shape::new([rows, width])));
        }
        if let (Some(node), Some(outputs)) = (weights_node, outputs) {
            let outputs = flex_contiguous(outputs);
            let outputs = outputs.storage::<f32>();
            let mut d_weights = vec![0.0f32; rows];
            d_weights
                .par_chunks_mut(task)
                .zip(indices.par_chunks(task))
                .zip(outputs.par_chunks(task * width))
                .for_each(|((d, indices), outputs)| token_row_dots_best(gs, width, indices, outputs, d));
            grads.register::<Flex>(node.id, flex_from_vec(d_weights, Shape::new([rows])));
        }
        if let Some(node) = acc_node {
            grads.register::<Flex>(node.id, g);
        }
    }
}

/// [`combine`] under autodiff on the CPU backend.
fn autodiff_combine(
    acc: Tensor<Ad, 2>,
    indices: Vec<usize>,
    outputs: Tensor<Ad, 2>,
    weights: Tensor<Ad, 1>,
) -> Tensor<Ad, 2> {
    let (acc, outputs, weights) =
        (acc.into_primitive().tensor(), outputs.into_primitive().tensor(), weights.into_primitive().tensor());
    let (outputs_tracked, weights_tracked) = (outputs.is_tracked(), weights.is_tracked());
    let nodes = [acc.node.clone(), outputs.node.clone(), weights.node.clone()];
    let out = match CombineBackward.prepare::<NoCheckpointing>(nodes).compute_bound().stateful() {
        OpsKind::Tracked(prep) => {
            let y = flex_combine(acc.primitive, &indices, outputs.primitive.clone(), weights.primitive.clone());
            let state = CombineState {
                indices,
                outputs: weights_tracked.then_some(outputs.primitive),
                weights: outputs_tracked.then_some(weights.primitive),
            };
            prep.finish(state, y)
        }
        OpsKind::UnTracked(prep) => {
            prep.finish(flex_combine(acc.primitive, &indices, outputs.primitive, weights.primitive))
        }
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accuracy::{assert_sum_accurate, in_f64};
    use burn::tensor::{Distribution, TensorData};

    fn rand<B: Backend, const D: usize>(shape: [usize; D]) -> Tensor<B, D> {
        Tensor::random(shape, Distribution::Normal(0.0, 2.0), &Default::default())
    }

    fn index<B: Backend>(rows: &[i64]) -> Tensor<B, 1, Int> {
        Tensor::from_data(TensorData::new(rows.to_vec(), [rows.len()]), &Default::default())
    }

    /// burn's ops for [`combine`].
    fn ops<B: Backend>(acc: Tensor<B, 2>, idx: Tensor<B, 1, Int>, out: Tensor<B, 2>, w: Tensor<B, 1>) -> Tensor<B, 2> {
        acc.select_assign(0, idx, out * w.unsqueeze_dim(1), IndexingUpdateOp::Add)
    }

    /// Rows of a pool of 7 tokens: some taken by several experts, some by
    /// none. At a width of 3000 a task holds five rows, so the rows of a
    /// token fall in different tasks.
    const ROWS: [i64; 9] = [3, 0, 3, 6, 1, 3, 0, 5, 6];
    const WIDTHS: [usize; 3] = [1, 5, 3000];

    #[test]
    fn gathered_rows_and_their_gradient_equal_the_ops_bit_for_bit() {
        type Ad = Autodiff<Flex>;
        for width in WIDTHS {
            // A strided view as the pool.
            let x = rand::<Ad, 2>([width, 7]).require_grad();
            let probe = rand::<Ad, 2>([ROWS.len(), width]);
            let run = |op: &dyn Fn(Tensor<Ad, 2>, Tensor<Ad, 1, Int>) -> Tensor<Ad, 2>| {
                let y = op(x.clone().transpose(), index(&ROWS));
                let grads = (y.clone() * probe.clone()).sum().backward();
                (y.inner().into_data(), x.grad(&grads).expect("tracked").into_data())
            };
            let (y, dx) = run(&|x, i| gather_rows(x, i));
            let (y_ops, dx_ops) = run(&|x, i| x.select(0, i));
            y.assert_eq(&y_ops, true);
            dx.assert_eq(&dx_ops, true);
            let plain = gather_rows(x.clone().inner().transpose(), index(&ROWS));
            plain.into_data().assert_eq(&x.clone().inner().transpose().select(0, index(&ROWS)).into_data(), true);
        }
        // No rows: a zero gradient for every token.
        let x = rand::<Ad, 2>([3, 4]).require_grad();
        let grads = gather_rows(x.clone(), index(&[])).sum().backward();
        x.grad(&grads).expect("tracked").into_data().assert_eq(&TensorData::zeros::<f32, _>([3, 4]), true);
    }

    #[test]
    fn inference_equals_the_ops_bit_for_bit() {
        for width in WIDTHS {
            let acc = rand::<Flex, 2>([7, width]);
            let (out, w) = (rand::<Flex, 2>([ROWS.len(), width]), rand::<Flex, 1>([ROWS.len()]));
            let expected = ops(acc.clone(), index(&ROWS), out.clone(), w.clone()).into_data();
            // `acc` shared: the op works on a copy and leaves it as it was.
            let kept = acc.clone().into_data();
            combine(acc.clone(), index(&ROWS), out.clone(), w.clone()).into_data().assert_eq(&expected, true);
            acc.clone().into_data().assert_eq(&kept, true);
            // The outputs as a strided view.
            let view =
                Tensor::<Flex, 2>::from_data(out.clone().transpose().into_data(), &Default::default()).transpose();
            combine(acc, index(&ROWS), view, w).into_data().assert_eq(&expected, true);
        }
        // No rows: the accumulator as it was.
        let acc = rand::<Flex, 2>([3, 4]);
        let none = combine(
            acc.clone(),
            index(&[]),
            Tensor::zeros([0, 4], &Default::default()),
            Tensor::zeros([0], &Default::default()),
        );
        none.into_data().assert_eq(&acc.into_data(), true);
    }

    /// [`combine`] or its ops, on the autodiff backend.
    type CombineOp = dyn Fn(
        Tensor<Autodiff<Flex>, 2>,
        Tensor<Autodiff<Flex>, 1, Int>,
        Tensor<Autodiff<Flex>, 2>,
        Tensor<Autodiff<Flex>, 1>,
    ) -> Tensor<Autodiff<Flex>, 2>;

    #[test]
    fn training_equals_the_ops_and_their_gradients() {
        type Ad = Autodiff<Flex>;
        for width in WIDTHS {
            let acc = rand::<Ad, 2>([7, width]).require_grad();
            let out = rand::<Ad, 2>([ROWS.len(), width]).require_grad();
            let w = rand::<Ad, 1>([ROWS.len()]).require_grad();
            let probe = rand::<Ad, 2>([7, width]);
            let run = |op: &CombineOp, probe: Tensor<Ad, 2>| {
                // Fresh buffers, as a layer's would be.
                let y = op(acc.clone() * 1.0, index(&ROWS), out.clone() * 1.0, w.clone() * 1.0);
                let grads = (y.clone() * probe.cast(y.dtype())).sum().backward();
                let grad = |t: &Tensor<Ad, 2>| t.grad(&grads).expect("tracked").into_data();
                (y.inner().into_data(), grad(&acc), grad(&out), w.grad(&grads).expect("tracked").into_data())
            };
            let (y, d_acc, d_out, d_w) = run(&|a, i, o, w| combine(a, i, o, w), probe.clone());
            let (y_ops, d_acc_ops, d_out_ops, _) = run(&|a, i, o, w| ops(a, i, o, w), probe.clone());
            y.assert_eq(&y_ops, true);
            d_acc.assert_eq(&d_acc_ops, true);
            d_out.assert_eq(&d_out_ops, true);
            // A dot product per row, summed in another order than burn's:
            // against its exact value and the sum of its terms' magnitudes.
            let (.., d_w_exact) = run(&|a, i, o, w| ops(in_f64(a), i, in_f64(o), in_f64(w)), probe.clone());
            let (.., magnitudes) = run(&|a, i, o, w| ops(in_f64(a), i, in_f64(o).abs(), in_f64(w)), probe.abs());
            assert_sum_accurate("weight gradient", &d_w, &d_w_exact, &magnitudes);
        }
    }

    #[test]
    fn untracked_inputs_get_no_gradient() {
        type Ad = Autodiff<Flex>;
        let out = rand::<Ad, 2>([ROWS.len(), 6]).require_grad();
        let w = rand::<Ad, 1>([ROWS.len()]);
        let y = combine(Tensor::zeros([7, 6], &Default::default()), index(&ROWS), out.clone(), w.clone());
        let grads = y.sum().backward();
        assert!(w.grad(&grads).is_none());
        // d out[r] = w[r] in every column.
        let expected = Tensor::<Flex, 2>::ones([ROWS.len(), 6], &Default::default()) * w.inner().unsqueeze_dim(1);
        out.grad(&grads).expect("tracked").into_data().assert_eq(&expected.into_data(), true);
    }

    #[test]
    fn index_views_and_int_types_read_as_their_values() {
        let grid: Vec<i64> = (0..12).map(|i| (i * 5) % 7).collect();
        let grid = Tensor::<Flex, 2, Int>::from_data(TensorData::new(grid, [3, 4]), &Default::default());
        let narrow = |t: Tensor<Flex, 2, Int>, dim, start, len| t.narrow(dim, start, len).reshape([-1]);
        for view in [
            narrow(grid.clone(), 0, 1, 2),
            narrow(grid.clone(), 1, 1, 2),
            grid.clone().cast(burn::tensor::IntDType::I32).reshape([-1]),
        ] {
            let expected: Vec<usize> = view.clone().into_data().iter::<i64>().map(|i| i as usize).collect();
            assert_eq!(host_indices(view, 7), expected);
        }
    }

    #[test]
    #[should_panic(expected = "expert rows: index 7 outside a pool of 7 tokens")]
    fn an_index_outside_the_pool_is_refused() {
        let _ = combine(
            Tensor::<Flex, 2>::zeros([7, 2], &Default::default()),
            index(&[1, 7]),
            Tensor::zeros([2, 2], &Default::default()),
            Tensor::zeros([2], &Default::default()),
        );
    }
}
