//! Multi-head self-attention of DiT (official `models/modules.py` `Attention`):
//! qkv projection with bias, scaled dot-product attention with scale
//! `1/sqrt(head_dim)`, output projection. `head_dim` may differ from `D / H`.

use burn::module::Module;
use burn::nn::Linear;
use burn::tensor::{activation, backend::Backend, Tensor};

use diffmoe_core::{init, on_rows};

/// Self-attention.
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    /// `[d_model] -> [3 * heads * head_dim]` (official `attn.qkv`).
    pub qkv: Linear<B>,
    /// `[heads * head_dim] -> [d_model]` (official `attn.proj`).
    pub proj: Linear<B>,
    /// Number of heads.
    pub num_heads: usize,
    /// Width of each head.
    pub head_dim: usize,
}

impl<B: Backend> Attention<B> {
    /// The official initialisation (Xavier-uniform, zero bias).
    pub fn new(d_model: usize, num_heads: usize, head_dim: usize, device: &B::Device) -> Self {
        Self {
            qkv: init::linear(d_model, 3 * num_heads * head_dim, true, device),
            proj: init::linear(num_heads * head_dim, d_model, true, device),
            num_heads,
            head_dim,
        }
    }

    /// # Shapes
    /// - `x`: `[batch, tokens, d_model]` -> `[batch, tokens, d_model]`
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [n, t, _] = x.dims();
        let (h, hd) = (self.num_heads, self.head_dim);
        let qkv = on_rows(x, |x| self.qkv.forward(x)).reshape([n, t, 3, h, hd]).permute([2, 0, 3, 1, 4]); // [3, N, H, T, hd]
        let part = |i: usize| qkv.clone().narrow(0, i, 1).reshape([n, h, t, hd]);
        let (q, k, v) = (part(0), part(1), part(2));
        let scale = (hd as f64).powf(-0.5);
        // Scaling q rather than the scores: one pass over [N, H, T, hd]
        // instead of one over [N, H, T, T].
        let weights = activation::softmax(q.mul_scalar(scale).matmul(k.swap_dims(2, 3)), 3); // [N, H, T, T]
        let out = weights.matmul(v).swap_dims(1, 2).reshape([n, t, h * hd]); // [N, T, H*hd]
        on_rows(out, |out| self.proj.forward(out))
    }
}
