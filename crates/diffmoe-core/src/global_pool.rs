//! The DiffMoE layer (Sec. 3.2-3.3, official `models_DiffMoE.py`
//! `SparseMoEBlock`): expert choice over a batch-level global token pool,
//! with a capacity predictor and per-expert thresholds for dynamic inference.

use burn::config::Config;
use burn::module::{Module, Param};
use burn::tensor::{activation, backend::Backend, Int, Tensor};

use crate::activation::softmax_last;
use crate::capacity::{capacity_k, CapacityPredictor};
use crate::compaction::{compact, filled_slots};
use crate::expert_bank::{ExpertBank, ExpertKind};
use crate::init;
use crate::matmul::matmul;
use crate::mlp::Mlp;
use crate::routing::{Routing, RoutingStats};
use crate::threshold::{ema_update, threshold_quantile, ThresholdSync, THRESHOLD_EMA_DECAY};
use crate::token_pool::TokenPool;
use crate::topk::{top_counts_indices, top_k_indices};

/// Hyper-parameters of a DiffMoE layer.
#[derive(Config, Debug)]
pub struct DiffMoeConfig {
    /// Model width.
    pub d_model: usize,
    /// Hidden width of each expert (`int(d_model * mlp_ratio)`).
    pub d_hidden: usize,
    /// Routed experts.
    pub n_experts: usize,
    /// Training capacity: each expert takes `int((S / E) * capacity)` tokens.
    pub capacity: f64,
    /// GELU or SwiGLU experts.
    pub expert_kind: ExpertKind,
    /// Whether a shared expert is added. The official code reads
    /// `n_shared_experts` only as a flag and always builds a GELU
    /// `Mlp(D, 8 * D)` (`mlp_ratio * 2` with its default 4.0), whatever the
    /// expert kind.
    #[config(default = false)]
    pub shared_expert: bool,
}

impl DiffMoeConfig {
    /// Hidden width of the official shared expert: `int(d_model * 4.0 * 2)`.
    pub fn shared_hidden(&self) -> usize {
        self.d_model * 8
    }

    /// A layer with the official initialisation: gate `N(0, 0.006)`, every
    /// `nn.Linear` Xavier-uniform with zero bias, thresholds 0, decay 0.95.
    pub fn init<B: Backend>(&self, device: &B::Device) -> DiffMoeLayer<B> {
        DiffMoeLayer {
            gate_weight: Param::from_tensor(init::normal([self.n_experts, self.d_model], 0.006, device)),
            experts: ExpertBank::new(self.expert_kind, self.n_experts, self.d_model, self.d_hidden, device),
            capacity_predictor: CapacityPredictor::new(self.d_model, self.n_experts, device),
            shared_experts: self.shared_expert.then(|| Mlp::new(self.d_model, self.shared_hidden(), device)),
            expert_threshold: buffer(Tensor::zeros([self.n_experts], device)),
            ema_decay: buffer(Tensor::from_floats([THRESHOLD_EMA_DECAY], device)),
            capacity: self.capacity,
        }
    }
}

/// Which tokens an expert takes in the threshold modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Selection {
    /// Its `k_e` best tokens by gate score (official `forward_eval`).
    TopByGate,
    /// Exactly its tokens above the threshold (per-token routing).
    AboveThreshold,
}

/// How the threshold modes lay out expert slots: every expert gets `slots`
/// (the largest `k_e` rounded up to a bucket of an eighth of `S /
/// n_experts`, so that a backend that compiles per shape sees few shapes),
/// run `chunk` slots at a time: the fewest chunks of at most twice `S /
/// n_experts` slots (rounded up to a multiple of 8), as even as they come.
/// A chunk holds at most about twice as many expert rows as the pool has
/// tokens, and a slot axis a little longer than `S / n_experts` (the usual
/// case at inference) runs in one pass over the experts' weights, not in a
/// second pass for a few rows per expert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SlotPlan {
    /// Slots per expert, `>= max_e k_e`, at most `S`.
    slots: usize,
    /// Slots per batched expert matmul.
    chunk: usize,
}

impl SlotPlan {
    fn new(pool: usize, n_experts: usize, k_max: usize) -> Self {
        let round_up = |n: usize, m: usize| n.div_ceil(m) * m;
        let share = round_up(pool.div_ceil(n_experts.max(1)), 8).min(pool).max(1);
        let bucket = (share / 8).max(1);
        let slots = round_up(k_max, bucket).min(pool);
        let chunks = slots.div_ceil(2 * share).max(1);
        let chunk = round_up(slots.div_ceil(chunks), 8).min(slots).max(1);
        Self { slots, chunk }
    }
}

/// A non-trainable tensor saved with the module (a PyTorch buffer).
pub(crate) fn buffer<B: Backend, const D: usize>(t: Tensor<B, D>) -> Param<Tensor<B, D>> {
    Param::from_tensor(t).set_require_grad(false)
}

/// The DiffMoE MLP layer.
#[derive(Module, Debug)]
pub struct DiffMoeLayer<B: Backend> {
    /// `[n_experts, d_model]`: `logits = x @ gate_weight^T`.
    pub gate_weight: Param<Tensor<B, 2>>,
    /// The routed experts.
    pub experts: ExpertBank<B>,
    /// Predicts which tokens each expert will take.
    pub capacity_predictor: CapacityPredictor<B>,
    /// GELU `Mlp(D, 8D)` added unweighted to every token, when configured.
    pub shared_experts: Option<Mlp<B>>,
    /// `[n_experts]` buffer: threshold on `sigmoid(capacity logit)` for dynamic routing.
    pub expert_threshold: Param<Tensor<B, 1>>,
    /// `[1]` buffer: the EMA decay of the thresholds (0.95).
    pub ema_decay: Param<Tensor<B, 1>>,
    /// Training capacity (tokens per expert relative to `S / E`).
    pub capacity: f64,
}

impl<B: Backend> DiffMoeLayer<B> {
    /// Number of routed experts.
    pub fn n_experts(&self) -> usize {
        self.experts.n_experts()
    }

    /// Runs the layer; pure: thresholds are updated by the caller from the
    /// returned statistics ([`Self::with_updated_thresholds`]).
    ///
    /// * `Train` / `Static`: the pool of `S = batch * tokens` tokens, gate
    ///   `softmax` over experts, and every expert takes its top
    ///   `k = int((S / E) * capacity)` tokens by gate score; the output of a token
    ///   is `sum_e score[e, s] * expert_e(x_s)` over the experts that took it.
    /// * `Dynamic`: `k_e = #{s : sigmoid(logit[s, e]) > threshold_e + offset}`
    ///   over the whole batch, then expert `e` takes its top `k_e` tokens by
    ///   gate score (the official rule: not necessarily the tokens above the
    ///   threshold).
    /// * `PerToken`: expert `e` takes exactly the tokens with
    ///   `sigmoid(logit[s, e]) > threshold_e + offset`.
    ///
    /// In the two threshold modes the `k_e` are read on the host once per
    /// layer (one synchronisation) to size the batched expert matmul.
    ///
    /// # Shapes
    /// - `x`: `[batch, tokens, d_model]` -> `[batch, tokens, d_model]`
    ///
    /// # Panics
    /// In `Train`/`Static` routing, if `k` is 0 (a pool too small for the capacity).
    pub fn forward(&self, x: Tensor<B, 3>, routing: Routing) -> (Tensor<B, 3>, RoutingStats<B>) {
        let pool = TokenPool::new(x.clone());
        let logits = self.capacity_predictor.forward(pool.x.clone()); // [S, E]
        let scores = softmax_last(matmul(pool.x.clone(), self.gate_weight.val().transpose())).transpose(); // [E, S]
        let (y, stats) = match routing {
            Routing::Train | Routing::Static => self.route_top_k(&pool, scores, logits),
            Routing::Dynamic { threshold_offset } => {
                self.route_by_threshold(&pool, scores, logits, threshold_offset, Selection::TopByGate)
            }
            Routing::PerToken { threshold_offset } => {
                self.route_by_threshold(&pool, scores, logits, threshold_offset, Selection::AboveThreshold)
            }
        };
        let y = pool.unflatten(y);
        let y = match &self.shared_experts {
            Some(shared) => y + shared.forward(x),
            None => y,
        };
        (y, stats)
    }

    /// Training and static routing: every expert takes its top-k of the pool.
    fn route_top_k(
        &self,
        pool: &TokenPool<B>,
        scores: Tensor<B, 2>,
        logits: Tensor<B, 2>,
    ) -> (Tensor<B, 2>, RoutingStats<B>) {
        let k = capacity_k(pool.len(), self.n_experts(), self.capacity);
        assert!(k >= 1, "DiffMoE capacity {} gives k = 0 for a pool of {} tokens", self.capacity, pool.len());
        let indices = top_k_indices(scores.clone(), k); // [E, k]
        let weights = scores.gather(1, indices.clone()); // [E, k]
        let y = pool.dispatch(&self.experts, indices.clone(), weights.clone());
        let valid = Tensor::ones([self.n_experts(), k], &pool.x.device());
        let mut stats = pool.expert_choice_stats(indices, weights, valid);
        stats.k = Some(k);
        stats.threshold_quantile = Some(threshold_quantile(logits.clone(), k));
        stats.capacity_logits = Some(pool.unflatten(logits));
        (y, stats)
    }

    /// The threshold modes: expert `e` processes `k_e` tokens, the number
    /// whose predicted probability exceeds its threshold (plus `offset`).
    /// Every expert lays its tokens in its first `k_e` of `max_e k_e` slots
    /// (padded to a bucket, [`SlotPlan`]): its top `k_e` by gate score for the
    /// official rule, the tokens above its threshold for per-token routing.
    /// The slots past `k_e` are weighted by zero, so all
    /// experts still run as batched matmuls: over chunks of the slot axis,
    /// so that the layer's memory stays that of at most about `2 S` expert
    /// rows however the tokens fall. On the CPU backend the products skip
    /// the padding (`sum_e k_e` rows computed, not `E * max_e k_e`: a
    /// trained model's experts take unequal shares at a given noise level).
    fn route_by_threshold(
        &self,
        pool: &TokenPool<B>,
        scores: Tensor<B, 2>,
        logits: Tensor<B, 2>,
        offset: f64,
        selection: Selection,
    ) -> (Tensor<B, 2>, RoutingStats<B>) {
        let n_experts = self.n_experts();
        let device = pool.x.device();
        let thresholds = self.expert_threshold.val().add_scalar(offset).unsqueeze_dim::<2>(0); // [1, E]
        let above = activation::sigmoid(logits.clone()).greater(thresholds).transpose(); // [E, S]
        let counts = above.clone().int().sum_dim(1).reshape([n_experts]); // [E]

        // The one host synchronisation of the layer: each expert's tokens,
        // which size the expert batch and bound the rows computed.
        let filled: Vec<usize> = counts.clone().into_data().iter::<i64>().map(|c| c.max(0) as usize).collect();
        let k_max = filled.iter().copied().max().unwrap_or(0);
        let (y, mut stats) = if k_max == 0 {
            let d_model = pool.x.dims()[1];
            let none = Tensor::<B, 2, Int>::zeros([n_experts, 1], &device);
            let zero = Tensor::zeros([n_experts, 1], &device);
            (Tensor::zeros([pool.len(), d_model], &device), pool.expert_choice_stats(none, zero.clone(), zero))
        } else {
            let plan = SlotPlan::new(pool.len(), n_experts, k_max);
            let indices = match selection {
                Selection::TopByGate => top_counts_indices(scores.clone(), counts.clone(), plan.slots),
                Selection::AboveThreshold => compact(above, plan.slots),
            }; // [E, slots]: expert e's tokens in its first k_e slots
            let valid = filled_slots(counts.clone(), plan.slots); // [E, slots]
            let weights = scores.gather(1, indices.clone()) * valid.clone(); // [E, slots]
            let y = pool.dispatch_padded(&self.experts, indices.clone(), weights.clone(), &filled, plan.chunk);
            (y, pool.expert_choice_stats(indices, weights, valid))
        };
        stats.tokens_per_expert = counts;
        stats.capacity_logits = Some(pool.unflatten(logits));
        (y, stats)
    }

    /// The thresholds after the official EMA update with this forward's
    /// quantile: `thr * 0.95 + 0.05 * q`, then averaged across replicas.
    ///
    /// # Shapes
    /// - `quantile`: `[n_experts]` -> `[n_experts]`
    pub fn updated_thresholds(&self, quantile: Tensor<B, 1>, sync: &impl ThresholdSync<B>) -> Tensor<B, 1> {
        let updated =
            ema_update(self.expert_threshold.val().detach(), self.ema_decay.val().detach(), quantile.detach());
        sync.mean_across_replicas(updated)
    }

    /// This layer with its thresholds updated from a train-routing forward's
    /// statistics (see [`Self::updated_thresholds`]). Statistics without a
    /// quantile (dynamic routing) leave the thresholds as they are.
    pub fn with_updated_thresholds(mut self, stats: &RoutingStats<B>, sync: &impl ThresholdSync<B>) -> Self {
        if let Some(q) = &stats.threshold_quantile {
            let updated = self.updated_thresholds(q.clone(), sync);
            self.expert_threshold = self.expert_threshold.map(|_| updated.set_require_grad(false));
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::threshold::LocalReplica;
    use burn::backend::Flex;
    use burn::tensor::Distribution;

    fn layer(capacity: f64) -> DiffMoeLayer<Flex> {
        DiffMoeConfig::new(8, 16, 4, capacity, ExpertKind::Gelu).init(&Default::default())
    }

    #[test]
    fn every_expert_takes_exactly_k_tokens_in_training() {
        let layer = layer(1.5);
        let x = Tensor::<Flex, 3>::random([3, 8, 8], Distribution::Default, &Default::default());
        let (y, stats) = layer.forward(x, Routing::Train);
        assert_eq!(y.dims(), [3, 8, 8]);
        let k = capacity_k(24, 4, 1.5);
        assert_eq!(stats.k, Some(k));
        let counts: Vec<i64> = stats.tokens_per_expert.to_data().convert::<i64>().to_vec().unwrap();
        assert_eq!(counts, vec![k as i64; 4]);
        let mask_total: f32 = stats.selection_mask.sum().into_scalar();
        assert_eq!(mask_total as usize, 4 * k);
    }

    #[test]
    fn slot_plans_bound_the_rows_of_a_chunk_by_the_pool() {
        // S = 8192 tokens, 8 experts: a share of 1024 slots, buckets of 128.
        assert_eq!(SlotPlan::new(8192, 8, 1000), SlotPlan { slots: 1024, chunk: 1024 });
        // A little over the share: one chunk, not a second one for the tail.
        assert_eq!(SlotPlan::new(8192, 8, 1025), SlotPlan { slots: 1152, chunk: 1152 });
        // Over twice the share: even chunks of at most twice the share.
        assert_eq!(SlotPlan::new(8192, 8, 2100), SlotPlan { slots: 2176, chunk: 1088 });
        // Every token to one expert: S slots, 2048 per chunk.
        assert_eq!(SlotPlan::new(8192, 8, 8192), SlotPlan { slots: 8192, chunk: 2048 });
        // Tiny pools: never more slots than tokens.
        assert_eq!(SlotPlan::new(24, 4, 3), SlotPlan { slots: 3, chunk: 3 });
        assert_eq!(SlotPlan::new(5, 16, 5), SlotPlan { slots: 5, chunk: 5 });
        for (pool, experts, k) in [(1024, 16, 1), (1024, 16, 77), (1024, 16, 300), (16384, 16, 16384), (7, 3, 2)] {
            let plan = SlotPlan::new(pool, experts, k);
            assert!(plan.slots >= k && plan.slots <= pool);
            assert!(plan.chunk >= 1 && plan.chunk <= plan.slots, "{plan:?}");
            assert!(experts * plan.chunk <= 2 * pool + 24 * experts, "{plan:?}");
        }
    }

    #[test]
    fn threshold_update_is_the_official_ema() {
        let layer = layer(1.0);
        let x = Tensor::<Flex, 3>::random([2, 8, 8], Distribution::Default, &Default::default());
        let (_, stats) = layer.forward(x, Routing::Train);
        let q: Vec<f32> = stats.threshold_quantile.clone().unwrap().to_data().to_vec().unwrap();
        let layer = layer.with_updated_thresholds(&stats, &LocalReplica);
        let thr: Vec<f32> = layer.expert_threshold.val().to_data().to_vec().unwrap();
        for (t, q) in thr.iter().zip(&q) {
            assert!((t - (1.0 - 0.95f32) * q).abs() < 1e-7);
        }
    }

    #[test]
    fn dynamic_routing_counts_tokens_above_threshold() {
        let mut layer = layer(1.0);
        // Threshold 0: every token is above (sigmoid > 0); threshold 1: none.
        layer.expert_threshold = buffer(Tensor::from_floats([0.0, 1.0, 0.0, 1.0], &Default::default()));
        let x = Tensor::<Flex, 3>::random([2, 8, 8], Distribution::Default, &Default::default());
        let (_, stats) = layer.forward(x, Routing::DYNAMIC);
        let counts: Vec<i64> = stats.tokens_per_expert.to_data().convert::<i64>().to_vec().unwrap();
        assert_eq!(counts, vec![16, 0, 16, 0]);
    }

    /// `sigmoid(capacity logit) > threshold` for every token and expert.
    fn above_threshold(layer: &DiffMoeLayer<Flex>, x: Tensor<Flex, 3>, offset: f64) -> Tensor<Flex, 3> {
        let pool = TokenPool::new(x);
        let logits = layer.capacity_predictor.forward(pool.x.clone());
        let thr = layer.expert_threshold.val().add_scalar(offset).unsqueeze_dim::<2>(0);
        pool.unflatten(activation::sigmoid(logits).greater(thr).float())
    }

    /// A layer whose thresholds split the tokens of a random batch: each
    /// expert's threshold is the median predicted probability.
    fn calibrated(x: &Tensor<Flex, 3>) -> DiffMoeLayer<Flex> {
        let mut layer = layer(1.0);
        let pool = TokenPool::new(x.clone());
        let probs = activation::sigmoid(layer.capacity_predictor.forward(pool.x.clone())); // [S, E]
        let median = probs.transpose().sort(1).narrow(1, pool.len() / 2, 1).reshape([4]);
        layer.expert_threshold = buffer(median);
        layer
    }

    #[test]
    fn per_token_routing_takes_exactly_the_tokens_above_threshold() {
        let x = Tensor::<Flex, 3>::random([3, 8, 8], Distribution::Default, &Default::default());
        let layer = calibrated(&x);
        for offset in [0.0, 0.05, -0.05] {
            let (_, stats) = layer.forward(x.clone(), Routing::PerToken { threshold_offset: offset });
            let expected = above_threshold(&layer, x.clone(), offset);
            let diff: f32 = (stats.selection_mask.clone() - expected.clone()).abs().max().into_scalar();
            assert_eq!(diff, 0.0, "offset {offset}");
            let counts: Vec<i64> = stats.tokens_per_expert.to_data().convert::<i64>().to_vec().unwrap();
            let expected_counts: Vec<f32> = expected.sum_dim(1).sum_dim(0).reshape([4]).to_data().to_vec().unwrap();
            assert_eq!(counts, expected_counts.iter().map(|&c| c as i64).collect::<Vec<_>>());
            // The weights are the gate scores of the chosen tokens.
            let zero_outside: f32 =
                (stats.combine_weights.clone() * (stats.selection_mask.clone().neg() + 1.0)).abs().max().into_scalar();
            assert_eq!(zero_outside, 0.0);
        }
        // A higher threshold never adds a token.
        let (_, lo) = layer.forward(x.clone(), Routing::PER_TOKEN);
        let (_, hi) = layer.forward(x, Routing::PerToken { threshold_offset: 0.1 });
        let added: f32 = (hi.selection_mask - lo.selection_mask).max().into_scalar();
        assert!(added <= 0.0);
    }

    #[test]
    fn per_token_routing_does_not_depend_on_the_batch() {
        let device = Default::default();
        let x = Tensor::<Flex, 3>::random([4, 8, 8], Distribution::Default, &device);
        let layer = calibrated(&x);
        let (batched, _) = layer.forward(x.clone(), Routing::PER_TOKEN);
        for n in 0..4 {
            let (alone, _) = layer.forward(x.clone().narrow(0, n, 1), Routing::PER_TOKEN);
            let diff: f32 = (alone - batched.clone().narrow(0, n, 1)).abs().max().into_scalar();
            assert!(diff <= 1e-6, "sample {n} differs by {diff} alone and in the batch");
        }
        // The official dynamic rule is cross-sample: counts are per batch.
        let (_, whole) = layer.forward(x.clone(), Routing::DYNAMIC);
        let (_, part) = layer.forward(x.narrow(0, 0, 1), Routing::DYNAMIC);
        let total = |s: &RoutingStats<Flex>| s.tokens_per_expert.clone().sum().into_scalar();
        assert!(total(&part) <= total(&whole));
    }

    #[test]
    fn dynamic_threshold_offset_trades_tokens() {
        let x = Tensor::<Flex, 3>::random([2, 8, 8], Distribution::Default, &Default::default());
        let layer = calibrated(&x);
        let count = |offset: f64| {
            let (_, stats) = layer.forward(x.clone(), Routing::Dynamic { threshold_offset: offset });
            stats.tokens_per_expert.sum().into_scalar()
        };
        // Median thresholds: about half the pool per expert at offset 0.
        assert!(count(0.0) > 0 && count(0.0) < 4 * 16);
        assert_eq!(count(-2.0), 4 * 16, "below every probability: every token");
        assert_eq!(count(2.0), 0, "above every probability: no token");
        assert!(count(0.1) <= count(0.0) && count(0.0) <= count(-0.1));
    }
}
