//! The adaLN-Zero DiT block (DiT Sec. 3.2; official `DiTBlock` of
//! `models_*.py`) with a dense or MoE MLP.

use burn::module::Module;
use burn::nn::Linear;
use burn::tensor::{backend::Backend, Tensor};

use diffmoe_core::{
    gated_residual, linear, modulated_layer_norm, on_rows, silu, DiffMoeLayer, ExpertChoiceLayer, FeedForward, Routing,
    RoutingStats, TokenChoiceLayer,
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
        let h = self.attn.forward(modulated_layer_norm(x.clone(), shift_msa, scale_msa));
        let x = gated_residual(x, gate_msa, h);
        let (h, stats) = self.mlp.forward(modulated_layer_norm(x.clone(), shift_mlp, scale_mlp), routing);
        (gated_residual(x, gate_mlp, h), stats)
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
        on_rows(modulated_layer_norm(x, shift, scale), |x| linear(x, &self.linear))
    }
}
