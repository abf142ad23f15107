//! The terms of one training loss evaluation.

use burn::tensor::{backend::Backend, Tensor};

use diffmoe_model::DiTOutput;

/// Every term of a loss, as the official `terms` dict holds them, plus what
/// the training step needs (the total to backpropagate and the routing).
#[derive(Debug, Clone)]
pub struct LossTerms<B: Backend> {
    /// `[batch]`: mean squared error per sample.
    pub mse: Tensor<B, 1>,
    /// `[batch]`: DDPM variational bound in bits per dimension (learned sigma only).
    pub vb: Option<Tensor<B, 1>>,
    /// Per DiffMoE block: (block index, unweighted BCE of the capacity predictor `[1]`).
    pub capacity: Vec<(usize, Tensor<B, 1>)>,
    /// `[1]`: the weighted sum of the capacity terms (official `cp_loss`).
    pub capacity_loss: Tensor<B, 1>,
    /// `[1]`: sum of TC auxiliary losses (0 otherwise). Not part of `loss`,
    /// but part of `total`: the official `AddAuxiliaryLoss` adds its gradient.
    pub aux_loss: Tensor<B, 1>,
    /// `[1]`: the reported loss (official `terms["loss"]`).
    pub loss: Tensor<B, 1>,
    /// `[1]`: what the training step backpropagates: `loss + aux_loss`.
    pub total: Tensor<B, 1>,
    /// The model input (`z_t` or `x_t`), `[batch, C, H, W]`.
    pub model_input: Tensor<B, 4>,
    /// The regression target (flow: `x1 - z0`; DDPM: the noise), `[batch, C, H, W]`.
    pub target: Tensor<B, 4>,
    /// The model output and routing statistics.
    pub output: DiTOutput<B>,
}
