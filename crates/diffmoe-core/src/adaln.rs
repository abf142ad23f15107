//! adaLN conditioning of a DiT block (DiT Sec. 3.2; official `DiTBlock` and
//! `FinalLayer`): the modulated LayerNorm `layer_norm(x) * (1 + scale) +
//! shift` in front of attention, the MLP and the final projection, and the
//! gated residual `x + gate * h` after attention and the MLP, with `shift`,
//! `scale` and `gate` one row per image.
//!
//! On the CPU backend (`Flex`, and `Autodiff<Flex>` in training) each is one
//! op with its own backward step ([`crate::adaln_kernel`]); elsewhere the
//! composition of burn ops ([`layer_norm`], [`modulate`]).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::tensor::{backend::Backend, Shape, Tensor, TensorPrimitive};
use burn_flex::{Flex, FlexTensor};

use crate::adaln_kernel::{self, LAYER_NORM_EPS};
use crate::broadcast_middle;
use crate::fused::{flex_contiguous, flex_from_vec, on_cpu3};
use crate::row_groups::RowGroups;

type Ad = Autodiff<Flex>;

/// LayerNorm without affine parameters, eps 1e-6, over the last axis
/// (official `nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)`).
///
/// # Shapes
/// - `x`: `[batch, tokens, d_model]` -> same
pub fn layer_norm<B: Backend>(x: Tensor<B, 3>) -> Tensor<B, 3> {
    let (var, mean) = x.clone().var_mean_bias(2);
    (x - mean).div(var.add_scalar(f64::from(LAYER_NORM_EPS)).sqrt())
}

/// `x * (1 + scale) + shift`, the conditioning broadcast over tokens.
///
/// # Shapes
/// - `x`: `[batch, tokens, d_model]`, `shift`, `scale`: `[batch, d_model]`
///   -> `[batch, tokens, d_model]`
pub fn modulate<B: Backend>(x: Tensor<B, 3>, shift: Tensor<B, 2>, scale: Tensor<B, 2>) -> Tensor<B, 3> {
    let tokens = x.dims()[1];
    x * broadcast_middle(scale.add_scalar(1.0), tokens) + broadcast_middle(shift, tokens)
}

/// `modulate(layer_norm(x), shift, scale)`: one pass forward and one
/// backward on the CPU backend.
///
/// # Shapes
/// - `x`: `[batch, tokens, d_model]`, `shift`, `scale`: `[batch, d_model]`
///   -> `[batch, tokens, d_model]`
pub fn modulated_layer_norm<B: Backend>(x: Tensor<B, 3>, shift: Tensor<B, 2>, scale: Tensor<B, 2>) -> Tensor<B, 3> {
    let shape = rows_shape(&x);
    on_cpu3(
        x,
        shift,
        scale,
        |x, shift, scale| flex_modulated_layer_norm(shape, x, shift, scale).0,
        |x, shift, scale| autodiff_modulated_layer_norm(shape, x, shift, scale),
    )
    .unwrap_or_else(|(x, shift, scale)| modulate(layer_norm(x), shift, scale))
}

/// `x + gate * h`, `gate` broadcast over tokens: one pass forward and one
/// backward on the CPU backend.
///
/// # Shapes
/// - `x`, `h`: `[batch, tokens, d_model]`, `gate`: `[batch, d_model]` ->
///   `[batch, tokens, d_model]`
pub fn gated_residual<B: Backend>(x: Tensor<B, 3>, gate: Tensor<B, 2>, h: Tensor<B, 3>) -> Tensor<B, 3> {
    let shape = rows_shape(&x);
    on_cpu3(
        x,
        gate,
        h,
        |x, gate, h| flex_gated_residual(shape, x, gate, h),
        |x, gate, h| autodiff_gated_residual(shape, x, gate, h),
    )
    .unwrap_or_else(|(x, gate, h)| x + broadcast_middle(gate, shape.rows) * h)
}

fn rows_shape<B: Backend>(x: &Tensor<B, 3>) -> RowGroups {
    let [groups, rows, width] = x.dims();
    RowGroups { groups, rows, width }
}

/// The modulated LayerNorm and its rows' statistics.
fn flex_modulated_layer_norm(
    shape: RowGroups,
    x: FlexTensor,
    shift: FlexTensor,
    scale: FlexTensor,
) -> (FlexTensor, Vec<f32>) {
    let (x, shift, scale) = (flex_contiguous(x), flex_contiguous(shift), flex_contiguous(scale));
    let (y, stats) = adaln_kernel::modulated_layer_norm(shape, x.storage(), shift.storage(), scale.storage());
    (flex_from_vec(y, x.layout().shape().clone()), stats)
}

fn flex_gated_residual(shape: RowGroups, x: FlexTensor, gate: FlexTensor, h: FlexTensor) -> FlexTensor {
    let (x, gate, h) = (flex_contiguous(x), flex_contiguous(gate), flex_contiguous(h));
    let y = adaln_kernel::gated_residual(shape, x.storage(), gate.storage(), h.storage());
    flex_from_vec(y, x.layout().shape().clone())
}

/// Backward step of the modulated LayerNorm: keeps `x`, `scale` and the
/// rows' `(mean, rstd)`.
#[derive(Debug)]
struct ModulatedLayerNormBackward(RowGroups);

impl Backward<Flex, 3> for ModulatedLayerNormBackward {
    type State = (FlexTensor, FlexTensor, Vec<f32>);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let shape = self.0;
        let (x, scale, stats) = ops.state;
        let g = flex_contiguous(grads.consume::<Flex>(&ops.node));
        let (dx, d_shift, d_scale) =
            adaln_kernel::modulated_layer_norm_backward(shape, x.storage(), g.storage(), scale.storage(), &stats);
        let rows = Shape::new([shape.groups, shape.width]);
        let [x_node, shift_node, scale_node] = ops.parents;
        for (node, grad) in [
            (x_node, flex_from_vec(dx, x.layout().shape().clone())),
            (shift_node, flex_from_vec(d_shift, rows.clone())),
            (scale_node, flex_from_vec(d_scale, rows)),
        ] {
            if let Some(node) = node {
                grads.register::<Flex>(node.id, grad);
            }
        }
    }
}

fn autodiff_modulated_layer_norm(
    shape: RowGroups,
    x: Tensor<Ad, 3>,
    shift: Tensor<Ad, 2>,
    scale: Tensor<Ad, 2>,
) -> Tensor<Ad, 3> {
    let (x, shift, scale) =
        (x.into_primitive().tensor(), shift.into_primitive().tensor(), scale.into_primitive().tensor());
    let nodes = [x.node.clone(), shift.node.clone(), scale.node.clone()];
    let out = match ModulatedLayerNormBackward(shape).prepare::<NoCheckpointing>(nodes).compute_bound().stateful() {
        OpsKind::Tracked(prep) => {
            let (x, scale) = (flex_contiguous(x.primitive), flex_contiguous(scale.primitive));
            let (y, stats) = flex_modulated_layer_norm(shape, x.clone(), shift.primitive, scale.clone());
            prep.finish((x, scale, stats), y)
        }
        OpsKind::UnTracked(prep) => {
            prep.finish(flex_modulated_layer_norm(shape, x.primitive, shift.primitive, scale.primitive).0)
        }
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

/// Backward step of the gated residual: keeps `gate` and `h`.
#[derive(Debug)]
struct GatedResidualBackward(RowGroups);

impl Backward<Flex, 3> for GatedResidualBackward {
    type State = (FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let shape = self.0;
        let (gate, h) = ops.state;
        let g = flex_contiguous(grads.consume::<Flex>(&ops.node));
        let [x_node, gate_node, h_node] = ops.parents;
        if gate_node.is_some() || h_node.is_some() {
            let (dh, d_gate) = adaln_kernel::gated_residual_backward(shape, h.storage(), g.storage(), gate.storage());
            if let Some(node) = gate_node {
                grads.register::<Flex>(node.id, flex_from_vec(d_gate, Shape::new([shape.groups, shape.width])));
            }
            if let Some(node) = h_node {
                grads.register::<Flex>(node.id, flex_from_vec(dh, h.layout().shape().clone()));
            }
        }
        if let Some(node) = x_node {
            grads.register::<Flex>(node.id, g);
        }
    }
}

fn autodiff_gated_residual(shape: RowGroups, x: Tensor<Ad, 3>, gate: Tensor<Ad, 2>, h: Tensor<Ad, 3>) -> Tensor<Ad, 3> {
    let (x, gate, h) = (x.into_primitive().tensor(), gate.into_primitive().tensor(), h.into_primitive().tensor());
    let nodes = [x.node.clone(), gate.node.clone(), h.node.clone()];
    let out = match GatedResidualBackward(shape).prepare::<NoCheckpointing>(nodes).compute_bound().stateful() {
        OpsKind::Tracked(prep) => {
            let (gate, h) = (flex_contiguous(gate.primitive), flex_contiguous(h.primitive));
            let y = flex_gated_residual(shape, x.primitive, gate.clone(), h.clone());
            prep.finish((gate, h), y)
        }
        OpsKind::UnTracked(prep) => prep.finish(flex_gated_residual(shape, x.primitive, gate.primitive, h.primitive)),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accuracy::{assert_as_accurate, assert_each_as_accurate, in_f64};
    use burn::tensor::Distribution;

    fn rand<B: Backend, const D: usize>(shape: [usize; D], std: f64) -> Tensor<B, D> {
        Tensor::random(shape, Distribution::Normal(0.5, std), &Default::default())
    }

    /// Output and gradients of `op(a, b, c)` weighted by `w`, for the CPU op
    /// and the composition of burn ops.
    fn equal_to_composition<const D: usize>(
        fused: &dyn Fn(Tensor<Ad, 3>, Tensor<Ad, 2>, Tensor<Ad, D>) -> Tensor<Ad, 3>,
        composed: &dyn Fn(Tensor<Ad, 3>, Tensor<Ad, 2>, Tensor<Ad, D>) -> Tensor<Ad, 3>,
        c_shape: [usize; D],
        [n, t, d]: [usize; 3],
    ) {
        let a = rand::<Ad, 3>([n, t, d], 2.0).require_grad();
        let b = rand::<Ad, 2>([n, d], 0.5).require_grad();
        let c = rand::<Ad, D>(c_shape, 0.5).require_grad();
        let w = rand::<Ad, 3>([n, t, d], 1.0);
        let run = |op: &dyn Fn(Tensor<Ad, 3>, Tensor<Ad, 2>, Tensor<Ad, D>) -> Tensor<Ad, 3>| {
            // `b` as a strided view (the adaLN chunks are), `c` as given.
            let b2 = Tensor::cat(vec![b.clone(), b.clone()], 1).narrow(1, d, d);
            let y = op(a.clone(), b2, c.clone());
            let grads = (y.clone() * w.clone().cast(y.dtype())).sum().backward();
            [y.inner().into_data(), a.grad(&grads).unwrap().into_data(), b.grad(&grads).unwrap().into_data()]
                .into_iter()
                .chain([c.grad(&grads).unwrap().into_data()])
                .collect::<Vec<_>>()
        };
        let exact = run(&|a, b, c| composed(in_f64(a), in_f64(b), in_f64(c)));
        assert_each_as_accurate(&["y", "da", "db", "dc"], &run(fused), &run(composed), &exact);
        // Untracked inputs.
        let (a, b, c) = (a.detach(), b.detach(), c.detach());
        let untracked = fused(a.clone(), b.clone(), c.clone()).into_data();
        let exact = composed(in_f64(a.clone()), in_f64(b.clone()), in_f64(c.clone())).into_data();
        assert_as_accurate("untracked y", &untracked, &composed(a, b, c).into_data(), &exact);
    }

    #[test]
    fn the_cpu_ops_equal_the_compositions_forward_and_backward() {
        // Token chunks within an image (tokens x width beyond one task),
        // widths off the vector lanes, one token.
        for dims in [[3, 5, 16], [2, 300, 96], [2, 1, 13], [1, 7, 37]] {
            let [n, _, d] = dims;
            equal_to_composition(
                &|x, shift, scale: Tensor<Ad, 2>| modulated_layer_norm(x, shift, scale),
                &|x, shift, scale| modulate(layer_norm(x), shift, scale),
                [n, d],
                dims,
            );
            equal_to_composition(
                &|x, gate, h: Tensor<Ad, 3>| gated_residual(x, gate, h),
                &|x, gate, h| x + broadcast_middle(gate, dims[1]) * h,
                dims,
                dims,
            );
            // Without autodiff.
            let [x, h] = [rand::<Flex, 3>(dims, 2.0), rand::<Flex, 3>(dims, 1.0)];
            let [shift, scale] = [rand::<Flex, 2>([n, d], 0.5), rand::<Flex, 2>([n, d], 0.5)];
            assert_as_accurate(
                "modulated LayerNorm",
                &modulated_layer_norm(x.clone(), shift.clone(), scale.clone()).into_data(),
                &modulate(layer_norm(x.clone()), shift.clone(), scale.clone()).into_data(),
                &modulate(layer_norm(in_f64(x.clone())), in_f64(shift.clone()), in_f64(scale)).into_data(),
            );
            let residual =
                |x: Tensor<Flex, 3>, gate: Tensor<Flex, 2>, h: Tensor<Flex, 3>| x + broadcast_middle(gate, dims[1]) * h;
            assert_as_accurate(
                "gated residual",
                &gated_residual(x.clone(), shift.clone(), h.clone()).into_data(),
                &residual(x.clone(), shift.clone(), h.clone()).into_data(),
                &residual(in_f64(x), in_f64(shift), in_f64(h)).into_data(),
            );
        }
    }

    #[test]
    fn gradient_sums_do_not_depend_on_the_thread_count() {
        let (x, g) = (rand::<Flex, 3>([2, 700, 64], 1.0), rand::<Flex, 3>([2, 700, 64], 1.0));
        let scale = rand::<Flex, 2>([2, 64], 1.0);
        let values = |t: Tensor<Flex, 3>| t.into_data().to_vec::<f32>().unwrap();
        let (x, g, scale) = (values(x), values(g), scale.into_data().to_vec::<f32>().unwrap());
        let shape = RowGroups { groups: 2, rows: 700, width: 64 };
        let run = || {
            let (_, stats) = adaln_kernel::modulated_layer_norm(shape, &x, &scale, &scale);
            adaln_kernel::modulated_layer_norm_backward(shape, &x, &g, &scale, &stats)
        };
        let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap().install(run);
        let three = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap().install(run);
        assert!(one == three, "the same bits on 1 and 3 threads");
    }
}
