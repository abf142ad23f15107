//! DiffMoE's per-expert thresholds (Sec. 3.3, official `update_threshold`):
//! an EMA of the k-th largest predicted probability of each expert, averaged
//! across data-parallel replicas.

use burn::tensor::{activation, backend::Backend, Tensor};

use crate::topk::kth_largest_rows;

/// The official `ema_decay` buffer value.
pub const THRESHOLD_EMA_DECAY: f32 = 0.95;

/// Averages thresholds across data-parallel replicas: the official
/// `all_reduce(SUM) / world_size` after each update.
pub trait ThresholdSync<B: Backend> {
    /// # Shapes
    /// - `thresholds`: `[n_experts]` -> `[n_experts]`, the mean over replicas
    fn mean_across_replicas(&self, thresholds: Tensor<B, 1>) -> Tensor<B, 1>;
}

/// A single process: the average is the value itself.
#[derive(Debug, Clone, Copy, Default)]
pub struct LocalReplica;

impl<B: Backend> ThresholdSync<B> for LocalReplica {
    fn mean_across_replicas(&self, thresholds: Tensor<B, 1>) -> Tensor<B, 1> {
        thresholds
    }
}

/// The k-th largest `sigmoid(logit[:, e])` of every expert.
///
/// # Shapes
/// - `logits`: `[S, n_experts]` -> `[n_experts]`
///
/// # Panics
/// If `k` is 0 or larger than `S` (the official code raises there too).
pub(crate) fn threshold_quantile<B: Backend>(logits: Tensor<B, 2>, k: usize) -> Tensor<B, 1> {
    let [s, _] = logits.dims();
    assert!(k >= 1 && k <= s, "threshold quantile needs 1 <= k <= {s}, got k = {k}");
    kth_largest_rows(activation::sigmoid(logits.detach()).transpose(), k) // of [E, S]
}

/// `thr * decay + (1 - decay) * quantile`, as the official update computes it.
///
/// # Shapes
/// - `thresholds`, `quantile`: `[n_experts]`, `decay`: `[1]` -> `[n_experts]`
pub(crate) fn ema_update<B: Backend>(
    thresholds: Tensor<B, 1>,
    decay: Tensor<B, 1>,
    quantile: Tensor<B, 1>,
) -> Tensor<B, 1> {
    let one_minus = decay.clone().neg() + 1.0;
    thresholds * decay + one_minus * quantile
}
