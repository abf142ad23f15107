//! Multi-head scaled dot-product self-attention over packed q, k and v
//! projections (official `models/modules.py` `Attention`, after `qkv` and
//! before `proj`): `softmax(q k^T / sqrt(head_dim)) v` for every head.
//!
//! On the CPU backend (`Flex`, and `Autodiff<Flex>` in training) it is one
//! op with its own backward step ([`crate::attention_kernel`]): no score
//! matrix in memory, no head copied out of the projection. Elsewhere it is
//! the composition of burn's products and softmax.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{unary, Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::tensor::{backend::Backend, Shape, Tensor, TensorPrimitive};
use burn_flex::{Flex, FlexTensor};

use crate::attention_kernel::{self, HeadsShape};
use crate::fused::{flex_contiguous, flex_from_vec, on_cpu};
use crate::{matmul, softmax_last};

/// Self-attention of `heads` heads of width `head_dim` over each sequence
/// of `qkv`, with scale `1 / sqrt(head_dim)`.
///
/// # Shapes
/// - `qkv`: `[batch, tokens, 3 * heads * head_dim]`, columns
///   `(q | k | v, head, head_dim)` as the official `attn.qkv` lays them out
///   -> `[batch, tokens, heads * head_dim]`, columns `(head, head_dim)`
///
/// # Panics
/// If the width of `qkv` is not `3 * heads * head_dim`.
pub fn self_attention<B: Backend>(qkv: Tensor<B, 3>, heads: usize, head_dim: usize) -> Tensor<B, 3> {
    let [images, tokens, width] = qkv.dims();
    assert_eq!(width, 3 * heads * head_dim, "self_attention: qkv width {width} for {heads} heads of {head_dim}");
    let shape = HeadsShape { images, tokens, heads, head_dim };
    let scale = (head_dim as f64).powf(-0.5);
    if images * tokens * heads * head_dim == 0 {
        return composed(qkv, shape, scale);
    }
    on_cpu(qkv, |x| flex_forward(shape, scale as f32, x), |x| autodiff_forward(shape, scale as f32, x))
        .unwrap_or_else(|qkv| composed(qkv, shape, scale))
}

/// burn's products and softmax (GPU backends, other float types).
fn composed<B: Backend>(qkv: Tensor<B, 3>, shape: HeadsShape, scale: f64) -> Tensor<B, 3> {
    let HeadsShape { images: n, tokens: t, heads: h, head_dim: hd } = shape;
    let parts = qkv.reshape([n, t, 3, h, hd]).permute([2, 0, 3, 1, 4]); // [3, N, H, T, hd]
    let part = |i: usize| parts.clone().narrow(0, i, 1).reshape([n, h, t, hd]);
    let (q, k, v) = (part(0), part(1), part(2));
    // Scaling q rather than the scores: one pass over [N, H, T, hd]
    // instead of one over [N, H, T, T].
    let weights = softmax_last(matmul(q.mul_scalar(scale), k.swap_dims(2, 3))); // [N, H, T, T]
    matmul(weights, v).swap_dims(1, 2).reshape([n, t, h * hd])
}

fn flex_forward(shape: HeadsShape, scale: f32, qkv: FlexTensor) -> FlexTensor {
    let qkv = flex_contiguous(qkv);
    let out = attention_kernel::forward(shape, scale, qkv.storage());
    flex_from_vec(out, Shape::new([shape.images, shape.tokens, shape.out_width()]))
}

/// Backward step of self-attention: keeps the packed projections, from
/// which it recomputes the probabilities.
#[derive(Debug)]
struct SelfAttentionBackward {
    shape: HeadsShape,
    scale: f32,
}

impl Backward<Flex, 1> for SelfAttentionBackward {
    type State = FlexTensor;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let qkv = ops.state;
        unary::<Flex, _>(ops.parents, ops.node, grads, |g| {
            let g = flex_contiguous(g);
            let d_qkv = attention_kernel::backward(self.shape, self.scale, qkv.storage(), g.storage());
            flex_from_vec(d_qkv, qkv.layout().shape().clone())
        });
    }
}

fn autodiff_forward(shape: HeadsShape, scale: f32, qkv: Tensor<Autodiff<Flex>, 3>) -> Tensor<Autodiff<Flex>, 3> {
    let qkv = qkv.into_primitive().tensor();
    let op = SelfAttentionBackward { shape, scale };
    let out = match op.prepare::<NoCheckpointing>([qkv.node.clone()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => {
            let input = flex_contiguous(qkv.primitive);
            let y = flex_forward(shape, scale, input.clone());
            prep.finish(input, y)
        }
        OpsKind::UnTracked(prep) => prep.finish(flex_forward(shape, scale, qkv.primitive)),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accuracy::{assert_as_accurate, in_f64};
    use burn::tensor::Distribution;

    type Ad = Autodiff<Flex>;

    #[test]
    fn the_cpu_op_equals_the_composition_forward_and_backward() {
        let device = Default::default();
        for (n, t, h, hd) in [(3, 20, 2, 8), (2, 33, 4, 5)] {
            let qkv =
                Tensor::<Ad, 3>::random([n, t, 3 * h * hd], Distribution::Normal(0.0, 1.5), &device).require_grad();
            let w = Tensor::<Ad, 3>::random([n, t, h * hd], Distribution::Normal(0.0, 1.0), &device);
            let shape = HeadsShape { images: n, tokens: t, heads: h, head_dim: hd };
            let scale = (hd as f64).powf(-0.5);
            let run = |op: &dyn Fn(Tensor<Ad, 3>) -> Tensor<Ad, 3>| {
                let y = op(qkv.clone());
                let grads = (y.clone() * w.clone().cast(y.dtype())).sum().backward();
                [y.inner(), qkv.grad(&grads).expect("qkv takes part in the graph")].map(Tensor::into_data)
            };
            // The composition of burn's own ops (`matmul` and `softmax_last`
            // of this crate would take the CPU kernels).
            let ops = |x: Tensor<Ad, 3>| {
                let parts = x.reshape([n, t, 3, h, hd]).permute([2, 0, 3, 1, 4]);
                let part = |i: usize| parts.clone().narrow(0, i, 1).reshape([n, h, t, hd]);
                let scores = part(0).matmul(part(1).swap_dims(2, 3)).mul_scalar(scale);
                burn::tensor::activation::softmax(scores, 3).matmul(part(2)).swap_dims(1, 2).reshape([n, t, h * hd])
            };
            let [y, dx] = run(&|x| self_attention(x, h, hd));
            let [y_ops, dx_ops] = run(&ops);
            let [y_exact, dx_exact] = run(&|x| ops(in_f64(x)));
            assert_as_accurate("output", &y, &y_ops, &y_exact);
            assert_as_accurate("gradient", &dx, &dx_ops, &dx_exact);
            // Without autodiff, and through the fallback.
            let plain = self_attention(qkv.clone().inner(), h, hd);
            let fallback = composed(qkv.clone().inner(), shape, scale);
            assert_as_accurate("untracked output", &plain.into_data(), &fallback.into_data(), &y_exact);
        }
    }

    #[test]
    #[should_panic(expected = "qkv width")]
    fn a_mismatched_width_is_refused() {
        self_attention(Tensor::<Flex, 3>::zeros([1, 2, 10], &Default::default()), 2, 2);
    }
}
