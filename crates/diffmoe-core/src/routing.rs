//! Routing modes and the routing statistics every MoE forward returns.

use burn::tensor::{backend::Backend, Int, Tensor};

/// How a MoE layer routes tokens, chosen explicitly by the caller (the official
/// code chooses by `module.training`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routing {
    /// Training routing. DiffMoE: every expert takes its top-k tokens of the
    /// batch pool, and the statistics carry the threshold quantile the caller
    /// feeds to the EMA update. TC: the auxiliary loss is computed.
    Train,
    /// "Global static top-K" inference: the training routing of DiffMoE, but
    /// the caller leaves the thresholds untouched. Same as `Eval` for the
    /// other families.
    Static,
    /// Dynamic inference (official `forward_eval` of DiffMoE): expert `e`
    /// processes as many tokens as have `sigmoid(capacity logit) > threshold_e`
    /// in the whole batch, chosen by gate score. Same as `Eval` for the other
    /// families.
    Dynamic,
}

impl Routing {
    /// Whether this is the training routing.
    pub fn is_train(self) -> bool {
        matches!(self, Self::Train)
    }
}

/// What a MoE layer decided in one forward. Nothing here needs gradients, but
/// for DiffMoE `capacity_logits` keeps its graph: the capacity-predictor loss is
/// computed from it.
#[derive(Debug, Clone)]
pub struct RoutingStats<B: Backend> {
    /// `[batch, tokens, n_experts]`: 1.0 where expert `e` processed the token
    /// (the official `ones`, the BCE target of the capacity predictor).
    pub selection_mask: Tensor<B, 3>,
    /// `[batch, tokens, n_experts]`: the weight of expert `e`'s output for the
    /// token (0 where it did not process it).
    pub combine_weights: Tensor<B, 3>,
    /// `[n_experts]`: how many tokens each expert processed.
    pub tokens_per_expert: Tensor<B, 1, Int>,
    /// The top-k of the routing: tokens per expert for DiffMoE and EC in
    /// training and static routing, experts per token for TC.
    pub k: Option<usize>,
    /// `[batch, tokens, n_experts]`: DiffMoE capacity-predictor logits.
    pub capacity_logits: Option<Tensor<B, 3>>,
    /// `[n_experts]`: DiffMoE, train and static routing: the k-th largest
    /// `sigmoid(capacity logit)` of each expert, the input of the threshold EMA.
    pub threshold_quantile: Option<Tensor<B, 1>>,
    /// `[1]`: TC load-balancing loss (train routing only), already scaled by
    /// its alpha; its gradient reaches the gate.
    pub aux_loss: Option<Tensor<B, 1>>,
}
