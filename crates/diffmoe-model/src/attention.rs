//! Multi-head self-attention of DiT (official `models/modules.py` `Attention`):
//! qkv projection with bias, scaled dot-product attention with scale
//! `1/sqrt(head_dim)`, output projection. `head_dim` may differ from `D / H`.

use burn::module::Module;
use burn::nn::Linear;
use burn::tensor::{backend::Backend, Tensor};

use diffmoe_core::{init, linear, matmul, on_rows, softmax_last};

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
        let [n, t, d] = x.dims();
        let (h, hd) = (self.num_heads, self.head_dim);
        let rows = x.reshape([n * t, d]);
        // Each head's q, k and v by its own slice of the qkv weight, stacked
        // head-major: the layout the attention products need, with no
        // token-head transposition to copy forward or backward (on the CPU
        // backend a 4-D transposition copies element by element).
        let weight = self.qkv.weight.val(); // [d, 3 * h * hd], columns (q|k|v, head, hd)
        let bias = self.qkv.bias.as_ref().map(|b| b.val());
        let column = |i: usize| {
            let y = matmul(rows.clone(), weight.clone().narrow(1, i * hd, hd));
            let y = match &bias {
                Some(b) => y + b.clone().narrow(0, i * hd, hd).unsqueeze(),
                None => y,
            };
            y.reshape([n, t, hd])
        };
        let heads = |part: usize| Tensor::stack::<4>((0..h).map(|j| column(part * h + j)).collect(), 1); // [N, H, T, hd]
        let (q, k, v) = (heads(0), heads(1), heads(2));
        let scale = (hd as f64).powf(-0.5);
        // Scaling q rather than the scores: one pass over [N, H, T, hd]
        // instead of one over [N, H, T, T].
        let weights = softmax_last(matmul(q.mul_scalar(scale), k.swap_dims(2, 3))); // [N, H, T, T]
        let out = matmul(weights, v); // [N, H, T, hd]
                                      // Heads side by side, [N, T, H * hd], as whole rows of hd.
        let out = Tensor::cat((0..h).map(|j| out.clone().narrow(1, j, 1).reshape([n, t, hd])).collect(), 2);
        on_rows(out, |out| linear(out, &self.proj))
    }
}
