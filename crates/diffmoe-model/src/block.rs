//! The adaLN-Zero DiT block (DiT Sec. 3.2; official `DiTBlock` of
//! `models_*.py`) with a dense or MoE MLP.

use burn::module::Module;
use burn::nn::Linear;
use burn::tensor::{backend::Backend, Tensor};

use diffmoe_core::{
    broadcast_middle, linear, on_rows, silu, DiffMoeLayer, ExpertChoiceLayer, FeedForward, Routing, RoutingStats,
    TokenChoiceLayer,
};

use crate::attention::Attention;

/// The MLP of a block.
// Variants are not boxed: burn's `Module` derive needs them as they are,
// and a model holds one per block.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum BlockMlp<B: Backend> {
    /// Dense GELU or SwiGLU MLP.
    Dense(FeedForward<B>),
    /// TC-DiT token choice.
    TokenChoice(TokenChoiceLayer<B>),
    /// EC-DiT per-sample expert choice.
    ExpertChoice(ExpertChoiceLayer<B>),
    /// DiffMoE global token pool.
    DiffMoe(DiffMoeLayer<B>),
}

impl<B: Backend> BlockMlp<B> {
    /// # Shapes
    /// - `x`: `[batch, tokens, d_model]` -> `[batch, tokens, d_model]`
    pub fn forward(&self, x: Tensor<B, 3>, routing: Routing) -> (Tensor<B, 3>, Option<RoutingStats<B>>) {
        match self {
            Self::Dense(mlp) => (mlp.forward(x), None),
            Self::TokenChoice(layer) => {
                let (y, stats) = layer.forward(x, routing);
                (y, Some(stats))
            }
            Self::ExpertChoice(layer) => {
                let (y, stats) = layer.forward(x);
                (y, Some(stats))
            }
            Self::DiffMoe(layer) => {
                let (y, stats) = layer.forward(x, routing);
                (y, Some(stats))
            }
        }
    }
}

/// LayerNorm without affine parameters, eps 1e-6, over the last axis.
///
/// # Shapes
/// - `x`: `[batch, tokens, d_model]` -> same
pub fn layer_norm<B: Backend>(x: Tensor<B, 3>) -> Tensor<B, 3> {
    let (var, mean) = x.clone().var_mean_bias(2);
    (x - mean).div(var.add_scalar(1e-6).sqrt())
}

/// `x * (1 + scale) + shift`, the conditioning broadcast over tokens.
///
/// # Shapes
/// - `x`: `[batch, tokens, d_model]`, `shift`, `scale`: `[batch, d_model]`
pub fn modulate<B: Backend>(x: Tensor<B, 3>, shift: Tensor<B, 2>, scale: Tensor<B, 2>) -> Tensor<B, 3> {
    let tokens = x.dims()[1];
    x * broadcast_middle(scale.add_scalar(1.0), tokens) + broadcast_middle(shift, tokens)
}

/// One DiT block.
#[derive(Module, Debug)]
pub struct DiTBlock<B: Backend> {
    /// Official `adaLN_modulation.1`: `SiLU(c) -> [6 * d_model]`, chunked into
    /// shift/scale/gate of attention, then shift/scale/gate of the MLP.
    pub adaln_modulation: Linear<B>,
    /// Self-attention.
    pub attn: Attention<B>,
    /// The MLP.
    pub mlp: BlockMlp<B>,
}

impl<B: Backend> DiTBlock<B> {
    /// # Shapes
    /// - `x`: `[batch, tokens, d_model]`, `c`: `[batch, d_model]` -> `[batch, tokens, d_model]`
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        c: Tensor<B, 2>,
        routing: Routing,
    ) -> (Tensor<B, 3>, Option<RoutingStats<B>>) {
        let mut m = linear(silu(c), &self.adaln_modulation).chunk(6, 1).into_iter();
        let mut next = || m.next().expect("six modulation chunks");
        let (shift_msa, scale_msa, gate_msa) = (next(), next(), next());
        let (shift_mlp, scale_mlp, gate_mlp) = (next(), next(), next());
        let h = self.attn.forward(modulate(layer_norm(x.clone()), shift_msa, scale_msa));
        let tokens = x.dims()[1];
        let x = x + broadcast_middle(gate_msa, tokens) * h;
        let (h, stats) = self.mlp.forward(modulate(layer_norm(x.clone()), shift_mlp, scale_mlp), routing);
        (x + broadcast_middle(gate_mlp, tokens) * h, stats)
    }
}

/// The final layer: adaLN (`shift, scale`, shift first), LayerNorm, modulate,
/// then a linear map to `patch * patch * out_channels` per token.
#[derive(Module, Debug)]
pub struct FinalLayer<B: Backend> {
    /// Official `final_layer.adaLN_modulation.1`: `[d_model] -> [2 * d_model]`.
    pub adaln_modulation: Linear<B>,
    /// Official `final_layer.linear`.
    pub linear: Linear<B>,
}

impl<B: Backend> FinalLayer<B> {
    /// # Shapes
    /// - `x`: `[batch, tokens, d_model]`, `c`: `[batch, d_model]` -> `[batch, tokens, p * p * out_channels]`
    pub fn forward(&self, x: Tensor<B, 3>, c: Tensor<B, 2>) -> Tensor<B, 3> {
        let mut m = linear(silu(c), &self.adaln_modulation).chunk(2, 1).into_iter();
        let shift = m.next().expect("two modulation chunks");
        let scale = m.next().expect("two modulation chunks");
        on_rows(modulate(layer_norm(x), shift, scale), |x| linear(x, &self.linear))
    }
}
