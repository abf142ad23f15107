//! The capacity-predictor loss of DiffMoE (official `nn.BCEWithLogitsLoss()`
//! of the predicted logits against the selection mask, a mean over all
//! `batch * tokens * n_experts` entries, weighted by `CapacityPred_loss_weight`).

use burn::tensor::{backend::Backend, Tensor};

use diffmoe_core::RoutingStats;
use diffmoe_model::BlockRouting;

/// Mean binary cross-entropy with logits, in the numerically stable form
/// `max(x, 0) - x * z + log(1 + exp(-|x|))`.
///
/// # Shapes
/// - `logits`, `targets`: any equal shape -> `[1]`
pub fn bce_with_logits<B: Backend, const D: usize>(logits: Tensor<B, D>, targets: Tensor<B, D>) -> Tensor<B, 1> {
    let softplus = logits.clone().abs().neg().exp().log1p();
    (logits.clone().clamp_min(0.0) - logits * targets + softplus).mean()
}

/// The unweighted capacity loss of one layer's forward: the predictor's
/// logits against the selection mask, `None` for a layer without a
/// capacity predictor.
///
/// # Shapes
/// -> `[1]`
pub fn layer_capacity_loss<B: Backend>(stats: &RoutingStats<B>) -> Option<Tensor<B, 1>> {
    let logits = stats.capacity_logits.clone()?;
    Some(bce_with_logits(logits, stats.selection_mask.clone().detach()))
}

/// The unweighted capacity loss of every DiffMoE block of a forward.
pub fn capacity_terms<B: Backend>(routing: &[BlockRouting<B>]) -> Vec<(usize, Tensor<B, 1>)> {
    routing.iter().filter_map(|r| Some((r.block, layer_capacity_loss(&r.stats)?))).collect()
}
