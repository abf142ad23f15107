//! A linear layer's bias with the activation that follows it: each expert's
//! bias on the rows of its product, and a dense layer's on every row.
//!
//! On the CPU backend without autodiff (inference) this is one in-place pass
//! over the rows each expert computed. Written as ops it is, for the
//! experts, a copy of the bias down every row (`broadcast_middle`), an add
//! and the activation: three passes over the `[n_experts, slots, width]`
//! activations, the padding rows of the threshold modes included (and two
//! for a dense layer, whose bias broadcasts over the leading axis). On the
//! S-E16 bench shapes the pass took the DiffMoE inference forward from
//! 1.19-1.22x to 1.12-1.15x the dense one (docs/benchmarks.md, 2026-12-07).
//! In training on the CPU backend (`Autodiff<Flex>`) it is an op of its own:
//! the sum written in place (and kept for GELU's derivative), the
//! activation into a new buffer, and one backward pass giving the input's
//! gradient and the bias gradient's row sums together. Elsewhere (GPU
//! backends, which fuse elementwise chains themselves) it is those ops.

use core::any::TypeId;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::nn::Linear;
use burn::tensor::{backend::Backend, DType, Shape, Tensor, TensorPrimitive};
use burn_flex::{Flex, FlexTensor};

use crate::activation::gelu_tanh;
use crate::broadcast::broadcast_middle;
use crate::cpu_kernels;
use crate::fused::{cast, flex_contiguous, flex_f32, flex_from_vec, from_flex, is_cpu};
use crate::matmul::matmul;
use crate::row_groups::{filled, RowGroups};

type Ad = Autodiff<Flex>;

/// What follows the bias.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AfterBias {
    /// Nothing: an output projection.
    Nothing,
    /// GELU with the tanh approximation: the hidden layer of a GELU MLP.
    GeluTanh,
}

impl AfterBias {
    fn apply<B: Backend, const D: usize>(self, x: Tensor<B, D>) -> Tensor<B, D> {
        match self {
            Self::Nothing => x,
            Self::GeluTanh => gelu_tanh(x),
        }
    }
}

/// `after(x @ weight + bias)` of a burn [`Linear`] layer, the bias and
/// `after` in one in-place pass on the CPU backend in inference, and
/// [`linear`] then `after` elsewhere.
///
/// # Shapes
/// - `x`: `[rows, d_input]` -> `[rows, d_output]`
pub(crate) fn linear_then<B: Backend>(x: Tensor<B, 2>, layer: &Linear<B>, after: AfterBias) -> Tensor<B, 2> {
    if !is_cpu::<B>() {
        return after.apply(layer.forward(x));
    }
    let y = matmul(x, layer.weight.val());
    match &layer.bias {
        Some(bias) => add_bias_then(y, bias.val(), after),
        None => after.apply(y),
    }
}

/// `after(x + bias)` on every row: [`add_expert_bias`] with one group.
fn add_bias_then<B: Backend>(x: Tensor<B, 2>, bias: Tensor<B, 1>, after: AfterBias) -> Tensor<B, 2> {
    add_expert_bias(x.unsqueeze_dim::<3>(0), bias.unsqueeze_dim(0), None, after).squeeze_dim(0)
}

/// `x + bias` on every row: one in-place pass on the CPU backend (an op
/// with its own backward step in training), burn's broadcast add elsewhere.
///
/// # Shapes
/// - `x`: `[rows, width]`, `bias`: `[width]` -> `[rows, width]`
pub fn add_bias<B: Backend>(x: Tensor<B, 2>, bias: Tensor<B, 1>) -> Tensor<B, 2> {
    add_bias_then(x, bias, AfterBias::Nothing)
}

/// `after(x + bias[e])` on the rows of expert `e`: on the CPU backend in
/// inference only on its first `filled[e]` rows (all of them without
/// `filled`), the rows below left as they are (the padding of
/// `matmul_filled_rows`, zeros); elsewhere on every row.
///
/// # Shapes
/// - `x`: `[n_experts, slots, width]`, `bias`: `[n_experts, width]`,
///   `filled`: `n_experts` counts `<= slots` -> `[n_experts, slots, width]`
pub(crate) fn add_expert_bias<B: Backend>(
    x: Tensor<B, 3>,
    bias: Tensor<B, 2>,
    filled: Option<&[usize]>,
    after: AfterBias,
) -> Tensor<B, 3> {
    let [experts, slots, width] = x.dims();
    if let Some(filled) = filled {
        assert!(
            filled.len() == experts && filled.iter().all(|&f| f <= slots),
            "{filled:?} filled of {experts} x {slots}"
        );
    }
    let x = match flex_f32(x) {
        Ok(x) if bias.dtype() == DType::F32 && width > 0 => {
            let bias = flex_f32(bias).unwrap_or_else(|_| unreachable!("an f32 bias on the backend of x"));
            let (mut x, bias) = (flex_contiguous(x), flex_contiguous(bias));
            // In place when `x` is the only holder of its buffer, on a copy otherwise.
            let data = x.storage_mut::<f32>();
            let bias = bias.storage::<f32>();
            for e in 0..experts {
                let rows = filled.map_or(slots, |f| f[e]);
                let start = e * slots * width;
                let (block, b) = (&mut data[start..start + rows * width], &bias[e * width..(e + 1) * width]);
                match after {
                    AfterBias::Nothing => cpu_kernels::add_bias_rows(block, b),
                    AfterBias::GeluTanh => cpu_kernels::add_bias_rows_gelu_tanh(block, b),
                }
            }
            return from_flex(x);
        }
        Ok(x) => from_flex(x),
        Err(x) => x,
    };
    let training_cpu = TypeId::of::<B>() == TypeId::of::<Ad>();
    if training_cpu && filled.is_none() && x.dtype() == DType::F32 && bias.dtype() == DType::F32 && width > 0 {
        // Moved, not cloned: the op adds the bias in place when it holds
        // the only reference to `x`'s buffer.
        return cast(autodiff_expert_bias(cast(x), cast(bias), after));
    }
    after.apply(x + broadcast_middle(bias, slots))
}

/// Backward step of a bias and its activation in training: keeps the
/// pre-activation when there is an activation.
#[derive(Debug)]
struct ExpertBiasBackward {
    shape: RowGroups,
    after: AfterBias,
}

impl Backward<Flex, 2> for ExpertBiasBackward {
    /// The pre-activation `x + bias`, for GELU.
    type State = Option<FlexTensor>;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let shape = self.shape;
        let g = flex_contiguous(grads.consume::<Flex>(&ops.node));
        let d = shape.width;
        let (dz, d_bias) = match (self.after, ops.state) {
            (AfterBias::GeluTanh, Some(z)) => {
                let mut d_bias = Vec::new();
                let dz = filled(shape.len(), |dz| {
                    d_bias = shape.chunk_sums(d, shape.chunks_of(dz, d), |e, rows, dz, sums| {
                        let span = shape.span(e, &rows, d);
                        cpu_kernels::gelu_tanh_backward_row_sums(
                            &z.storage()[span.clone()],
                            &g.storage()[span],
                            dz,
                            sums,
                        );
                    });
                });
                (flex_from_vec(dz, g.layout().shape().clone()), d_bias)
            }
            _ => {
                let d_bias = shape.chunk_sums(d, shape.no_outputs(), |e, rows, (), sums| {
                    cpu_kernels::add_row_sums(&g.storage()[shape.span(e, &rows, d)], sums);
                });
                (g, d_bias)
            }
        };
        let [x_node, bias_node] = ops.parents;
        if let Some(node) = bias_node {
            grads.register::<Flex>(node.id, flex_from_vec(d_bias, Shape::new([shape.groups, d])));
        }
        if let Some(node) = x_node {
            grads.register::<Flex>(node.id, dz);
        }
    }
}

/// `after(x + bias[e])` under autodiff on the CPU backend: one pass
/// forward (the sum in place, kept for GELU's backward step) and one
/// backward (the activation's derivative with the bias gradient's row sums).
fn autodiff_expert_bias(x: Tensor<Ad, 3>, bias: Tensor<Ad, 2>, after: AfterBias) -> Tensor<Ad, 3> {
    let [groups, rows, width] = x.dims();
    let shape = RowGroups { groups, rows, width };
    let (x, bias) = (x.into_primitive().tensor(), bias.into_primitive().tensor());
    let nodes = [x.node.clone(), bias.node.clone()];
    // `x + bias` in place, and `after` of it: `(z, y)`.
    let forward = |x: FlexTensor, bias: FlexTensor| {
        let (mut z, bias) = (flex_contiguous(x), flex_contiguous(bias));
        let (data, bias) = (z.storage_mut::<f32>(), bias.storage::<f32>());
        match after {
            AfterBias::Nothing => {
                shape.for_each_chunk(shape.chunks_of(data, width), |e, _, z| {
                    cpu_kernels::add_bias_rows_serial(z, &bias[e * width..][..width])
                });
                (None, z)
            }
            AfterBias::GeluTanh => {
                let y = filled(shape.len(), |y| {
                    let outs = shape.chunks_of(data, width).into_iter().zip(shape.chunks_of(y, width)).collect();
                    shape.for_each_chunk(outs, |e, _, (z, y)| {
                        cpu_kernels::add_bias_gelu_tanh_keep(z, y, &bias[e * width..][..width])
                    });
                });
                let y = flex_from_vec(y, z.layout().shape().clone());
                (Some(z), y)
            }
        }
    };
    let out = match (ExpertBiasBackward { shape, after }).prepare::<NoCheckpointing>(nodes).compute_bound().stateful() {
        OpsKind::Tracked(prep) => {
            let (z, y) = forward(x.primitive, bias.primitive);
            prep.finish(z, y)
        }
        OpsKind::UnTracked(prep) => prep.finish(forward(x.primitive, bias.primitive).1),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accuracy::{assert_as_accurate, in_f64};
    use burn::backend::{Autodiff, Flex};
    use burn::tensor::{Distribution, Tolerance};

    fn rand<B: Backend, const D: usize>(shape: [usize; D]) -> Tensor<B, D> {
        Tensor::random(shape, Distribution::Normal(0.0, 2.0), &Default::default())
    }

    #[test]
    fn the_cpu_pass_equals_the_ops_on_the_filled_rows_bit_for_bit() {
        let (x, bias) = (rand::<Flex, 3>([4, 7, 40]), rand::<Flex, 2>([4, 40]));
        let filled = [7, 0, 3, 1];
        for after in [AfterBias::Nothing, AfterBias::GeluTanh] {
            let ops: Vec<f32> =
                after.apply(x.clone() + broadcast_middle(bias.clone(), 7)).into_data().to_vec().unwrap();
            let kept: Vec<f32> = x.clone().into_data().to_vec().unwrap();
            // All rows, and the filled rows only (x is shared here: the pass
            // works on a copy and leaves x as it was).
            let all: Vec<f32> = add_expert_bias(x.clone(), bias.clone(), None, after).into_data().to_vec().unwrap();
            assert_eq!(all, ops, "{after:?}");
            let ours: Vec<f32> =
                add_expert_bias(x.clone(), bias.clone(), Some(&filled), after).into_data().to_vec().unwrap();
            for (e, &f) in filled.iter().enumerate() {
                let (start, split, end) = (e * 7 * 40, (e * 7 + f) * 40, (e + 1) * 7 * 40);
                assert_eq!(ours[start..split], ops[start..split], "{after:?}, expert {e}");
                assert_eq!(ours[split..end], kept[split..end], "{after:?}, expert {e}: padding untouched");
            }
            assert_eq!(x.clone().into_data().to_vec::<f32>().unwrap(), kept);
        }
    }

    #[test]
    fn under_autodiff_it_equals_the_ops_and_their_gradients() {
        type Ad = Autodiff<Flex>;
        // Groups of several row chunks (the bias gradient's partial sums), and
        // a single group as a dense layer's.
        for [experts, slots, width] in [[3, 5, 8], [2, 700, 48], [1, 9, 5]] {
            let x = rand::<Ad, 3>([experts, slots, width]).require_grad();
            let bias = rand::<Ad, 2>([experts, width]).require_grad();
            let w = rand::<Ad, 3>([experts, slots, width]);
            for after in [AfterBias::Nothing, AfterBias::GeluTanh] {
                let run = |op: &dyn Fn(Tensor<Ad, 3>, Tensor<Ad, 2>) -> Tensor<Ad, 3>| {
                    // `x` as a product's output would be: its own buffer.
                    let y = op(x.clone() * 1.0, bias.clone());
                    let grads = (y.clone() * w.clone().cast(y.dtype())).sum().backward();
                    [y.inner(), x.grad(&grads).unwrap(), bias.grad(&grads).unwrap().unsqueeze_dim(0)]
                        .map(Tensor::into_data)
                };
                let ops = |x, b| after.apply(x + broadcast_middle(b, slots));
                let [y, dx, db] = run(&|x, b| add_expert_bias(x, b, None, after));
                let [y_ops, dx_ops, db_ops] = run(&ops);
                y.assert_eq(&y_ops, true);
                dx.assert_eq(&dx_ops, true);
                // The bias gradient: a sum over the rows, in another order than burn's.
                let [.., db_exact] = run(&|x, b| ops(in_f64(x), in_f64(b)));
                assert_as_accurate("bias gradient", &db, &db_ops, &db_exact);
            }
        }
    }

    #[test]
    fn add_bias_is_the_broadcast_add() {
        type Ad = Autodiff<Flex>;
        let x = rand::<Ad, 2>([700, 24]).require_grad();
        let bias = rand::<Ad, 1>([24]).require_grad();
        let w = rand::<Ad, 2>([700, 24]);
        let run = |op: &dyn Fn(Tensor<Ad, 2>, Tensor<Ad, 1>) -> Tensor<Ad, 2>| {
            let y = op(x.clone() * 1.0, bias.clone());
            let grads = (y.clone() * w.clone().cast(y.dtype())).sum().backward();
            (y.inner().into_data(), x.grad(&grads).unwrap().into_data(), bias.grad(&grads).unwrap().into_data())
        };
        let ops = |x: Tensor<Ad, 2>, b: Tensor<Ad, 1>| x + b.unsqueeze_dim(0);
        let (y, dx, db) = run(&|x, b| add_bias(x, b));
        let (y_ops, dx_ops, db_ops) = run(&ops);
        y.assert_eq(&y_ops, true);
        dx.assert_eq(&dx_ops, true);
        let (.., db_exact) = run(&|x, b| ops(in_f64(x), in_f64(b)));
        assert_as_accurate("bias gradient", &db, &db_ops, &db_exact);
        let plain = add_bias(x.clone().inner(), bias.clone().inner());
        plain.into_data().assert_eq(&(x.inner() + bias.inner().unsqueeze_dim(0)).into_data(), true);
    }

    #[test]
    fn a_dense_layer_is_its_product_bias_and_activation() {
        let device = Default::default();
        let mut layer = crate::init::linear::<Flex>(24, 40, true, &device);
        layer.bias = Some(burn::module::Param::from_tensor(rand([40])));
        let x = rand::<Flex, 2>([9, 24]);
        let unbiased = Linear { bias: None, ..layer.clone() };
        for layer in [layer, unbiased] {
            for after in [AfterBias::Nothing, AfterBias::GeluTanh] {
                let ours = linear_then(x.clone(), &layer, after);
                let ops = after.apply(layer.forward(x.clone()));
                ours.into_data().assert_approx_eq::<f32>(&ops.into_data(), Tolerance::absolute(1e-5));
            }
        }
    }
}
