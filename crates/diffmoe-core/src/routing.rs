//! Routing modes and the routing statistics every MoE forward returns.

use burn::tensor::{backend::Backend, Int, Tensor};

/// How a MoE layer routes tokens, chosen explicitly by the caller (the official
/// code chooses by `module.training`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Routing {
    /// Training routing. DiffMoE: every expert takes its top-k tokens of the
    /// batch pool, and the statistics carry the threshold quantile the caller
    /// feeds to the EMA update. TC: the auxiliary loss is computed.
    Train,
    /// "Global static top-K" inference: the training routing of DiffMoE, but
    /// the caller leaves the thresholds untouched. Same as the eval forward
    /// for the other families.
    Static,
    /// Dynamic inference (official `forward_eval` of DiffMoE): expert `e`
    /// processes as many tokens as have `sigmoid(capacity logit)` above
    /// `threshold_e + threshold_offset` in the whole batch, chosen by gate
    /// score. Which tokens an expert takes depends on the whole batch. Same
    /// as the eval forward for the other families.
    Dynamic {
        /// Added to every expert's threshold: positive values make experts
        /// take fewer tokens (less compute), negative ones more. The official
        /// rule is 0.
        threshold_offset: f64,
    },
    /// Per-token inference (this project's rule): a token goes to expert `e`
    /// exactly when `sigmoid(capacity logit) > threshold_e + threshold_offset`,
    /// weighted by its gate score. A token's output depends on nothing but
    /// the token, so an image never depends on the other images of its batch.
    /// Same as the eval forward for the other families.
    PerToken {
        /// Added to every expert's threshold, as for [`Routing::Dynamic`].
        threshold_offset: f64,
    },
}

impl Routing {
    /// The official dynamic routing (no threshold offset).
    pub const DYNAMIC: Self = Self::Dynamic { threshold_offset: 0.0 };

    /// Per-token routing at the learned thresholds.
    pub const PER_TOKEN: Self = Self::PerToken { threshold_offset: 0.0 };

    /// Whether this is the training routing.
    pub fn is_train(self) -> bool {
        matches!(self, Self::Train)
    }

    /// The threshold offset of the threshold-based modes (0 for the others).
    pub fn threshold_offset(self) -> f64 {
        match self {
            Self::Dynamic { threshold_offset } | Self::PerToken { threshold_offset } => threshold_offset,
            Self::Train | Self::Static => 0.0,
        }
    }

    /// Whether the routing of a token depends on the other tokens of the
    /// batch for DiffMoE (its global pool): true for train, static and
    /// dynamic routing, false for per-token routing.
    pub fn is_cross_sample(self) -> bool {
        !matches!(self, Self::PerToken { .. })
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
