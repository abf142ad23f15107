//! Multi-head self-attention of DiT (official `models/modules.py` `Attention`):
//! qkv projection with bias, scaled dot-product attention with scale
//! `1/sqrt(head_dim)` ([`self_attention`]), output projection. `head_dim` may
//! differ from `D / H`.

use burn::module::Module;
use burn::nn::Linear;
use burn::tensor::{backend::Backend, Tensor};

use diffmoe_core::{init, linear, on_rows, self_attention};

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
        let qkv = on_rows(x, |x| linear(x, &self.qkv)); // [N, T, 3 * H * hd]
        let out = self_attention(qkv, self.num_heads, self.head_dim); // [N, T, H * hd]
        on_rows(out, |out| linear(out, &self.proj))
    }
}
