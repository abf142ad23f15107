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
//! Elsewhere (GPU backends, which fuse elementwise chains themselves, and
//! training) it is those ops.

use burn::nn::Linear;
use burn::tensor::{backend::Backend, DType, Tensor};

use crate::activation::gelu_tanh;
use crate::broadcast::broadcast_middle;
use crate::cpu_kernels;
use crate::fused::{flex_contiguous, flex_f32, from_flex, is_flex};
use crate::matmul::{linear, matmul};

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
    match &layer.bias {
        Some(bias) if is_flex::<B>() => {
            let y = matmul(x, layer.weight.val()).unsqueeze_dim::<3>(0);
            add_expert_bias(y, bias.val().unsqueeze_dim(0), None, after).squeeze_dim(0)
        }
        _ => after.apply(linear(x, layer)),
    }
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
    after.apply(x + broadcast_middle(bias, slots))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Flex};
    use burn::tensor::Distribution;

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
    fn under_autodiff_it_is_the_ops_with_their_gradients() {
        type Ad = Autodiff<Flex>;
        let x = rand::<Ad, 3>([3, 5, 8]).require_grad();
        let bias = rand::<Ad, 2>([3, 8]).require_grad();
        let y = add_expert_bias(x.clone(), bias.clone(), None, AfterBias::GeluTanh);
        let expected = gelu_tanh(x.clone() + broadcast_middle(bias.clone(), 5));
        y.clone().into_data().assert_eq(&expected.into_data(), true);
        let grads = y.sum().backward();
        let bias_grad = bias.grad(&grads).expect("the bias is tracked");
        assert_eq!(bias_grad.dims(), [3, 8]);
        assert!(x.grad(&grads).is_some());
    }

    #[test]
    fn a_dense_layer_is_its_linear_then_the_activation_bit_for_bit() {
        let device = Default::default();
        let mut layer = crate::init::linear::<Flex>(24, 40, true, &device);
        layer.bias = Some(burn::module::Param::from_tensor(rand([40])));
        let x = rand::<Flex, 2>([9, 24]);
        for after in [AfterBias::Nothing, AfterBias::GeluTanh] {
            let ours = linear_then(x.clone(), &layer, after);
            ours.into_data().assert_eq(&after.apply(linear(x.clone(), &layer)).into_data(), true);
        }
        let unbiased = Linear { bias: None, ..layer };
        linear_then(x.clone(), &unbiased, AfterBias::GeluTanh)
            .into_data()
            .assert_eq(&gelu_tanh(linear(x, &unbiased)).into_data(), true);
    }
}
