//! TC-DiT's MLP layer (official `models_TCDiT.py` `SparseMoEBlock` and
//! `MoEGate`): every token picks its top-k experts by softmax gate score; the
//! weights are the raw probabilities (not renormalised), and in training a
//! load-balancing loss is returned whose gradient reaches the gate.

use burn::config::Config;
use burn::module::{Module, Param};
use burn::tensor::{backend::Backend, Distribution, IndexingUpdateOp, Tensor};

use crate::activation::softmax_last;
use crate::compaction::{compact, filled_slots};
use crate::expert_bank::{ExpertBank, ExpertKind};
use crate::matmul::matmul;
use crate::mlp::SwiGluMlp;
use crate::routing::{Routing, RoutingStats};
use crate::token_pool::TokenPool;
use crate::topk::top_k_indices;

/// Weight of the load-balancing loss (official `aux_loss_alpha`).
pub const AUX_LOSS_ALPHA: f64 = 0.01;

/// Hyper-parameters of a TC layer.
#[derive(Config, Debug)]
pub struct TokenChoiceConfig {
    /// Model width.
    pub d_model: usize,
    /// Hidden width of each expert.
    pub d_hidden: usize,
    /// Routed experts.
    pub n_experts: usize,
    /// Experts per token (the official `MoE_config.capacity`).
    pub top_k: usize,
    /// GELU or SwiGLU experts.
    pub expert_kind: ExpertKind,
    /// Shared SwiGLU expert of hidden width `d_model * n` (official
    /// `MoeMLP(D, D * n_shared)`), when `Some(n)` with `n > 0`.
    #[config(default = "None")]
    pub n_shared_experts: Option<usize>,
}

impl TokenChoiceConfig {
    /// A layer with the official initialisation: gate `kaiming_uniform_(a=sqrt(5))`
    /// (uniform in `+-1/sqrt(d_model)`), every `nn.Linear` Xavier-uniform.
    pub fn init<B: Backend>(&self, device: &B::Device) -> TokenChoiceLayer<B> {
        let bound = 1.0 / (self.d_model as f64).sqrt();
        TokenChoiceLayer {
            gate: Param::from_tensor(Tensor::random(
                [self.n_experts, self.d_model],
                Distribution::Uniform(-bound, bound),
                device,
            )),
            experts: ExpertBank::new(self.expert_kind, self.n_experts, self.d_model, self.d_hidden, device),
            shared_experts: self
                .n_shared_experts
                .filter(|&n| n > 0)
                .map(|n| SwiGluMlp::new(self.d_model, self.d_model * n, device)),
            top_k: self.top_k,
        }
    }
}

/// The TC-DiT MLP layer.
#[derive(Module, Debug)]
pub struct TokenChoiceLayer<B: Backend> {
    /// `[n_experts, d_model]` (official `gate.weight`).
    pub gate: Param<Tensor<B, 2>>,
    /// The routed experts.
    pub experts: ExpertBank<B>,
    /// Shared SwiGLU expert, when configured.
    pub shared_experts: Option<SwiGluMlp<B>>,
    /// Experts per token.
    pub top_k: usize,
}

impl<B: Backend> TokenChoiceLayer<B> {
    /// Number of routed experts.
    pub fn n_experts(&self) -> usize {
        self.experts.n_experts()
    }

    /// Token-choice routing. The per-expert token lists have different
    /// lengths; they are padded to the longest (read on the host once per
    /// layer) with zero-weight rows so that all experts still run as one
    /// batched matmul (whose padding the CPU backend skips in inference). An
    /// expert with no token gets a zero gradient, as in the official
    /// training path.
    ///
    /// # Shapes
    /// - `x`: `[batch, tokens, d_model]` -> `[batch, tokens, d_model]`
    pub fn forward(&self, x: Tensor<B, 3>, routing: Routing) -> (Tensor<B, 3>, RoutingStats<B>) {
        let pool = TokenPool::new(x.clone());
        let n_experts = self.n_experts();
        let s = pool.len();
        let device = pool.x.device();
        let scores = softmax_last(matmul(pool.x.clone(), self.gate.val().transpose())); // [S, E]
        let choice = top_k_indices(scores.clone(), self.top_k); // [S, k]
        let assigned = Tensor::<B, 2>::zeros([s, n_experts], &device).scatter(
            1,
            choice,
            Tensor::ones([s, self.top_k], &device),
            IndexingUpdateOp::Add,
        ); // [S, E]
        let combine = scores.clone() * assigned.clone(); // [S, E]

        let counts = assigned.clone().sum_dim(0).reshape([n_experts]); // [E]

        // The one host synchronisation of this layer: each expert's tokens,
        // which size the padded expert batch.
        let filled: Vec<usize> = counts.clone().into_data().iter::<f32>().map(|c| c as usize).collect();
        let longest = filled.iter().copied().max().unwrap_or(0).max(1);
        // Each expert's tokens in pool order, then padding (row 0) weighted by zero.
        let rows = compact(assigned.clone().transpose().greater_elem(0.0), longest); // [E, longest]
        let valid = filled_slots(counts.clone().int(), longest); // [E, longest]
        let weights = combine.clone().transpose().gather(1, rows.clone()) * valid; // [E, longest]
        let y = pool.unflatten(pool.dispatch_padded(&self.experts, rows, weights, &filled, longest));
        let y = match &self.shared_experts {
            Some(shared) => y + shared.forward(x),
            None => y,
        };

        let aux_loss = routing.is_train().then(|| {
            // aux = alpha * sum_e mean_s(score[s, e]) * E * count_e / (S * k)
            let p = scores.mean_dim(0).reshape([n_experts]);
            let f = counts.clone().detach().div_scalar((s * self.top_k) as f64).mul_scalar(n_experts as f64);
            (p * f).sum().mul_scalar(AUX_LOSS_ALPHA)
        });
        let stats = RoutingStats {
            selection_mask: pool.unflatten(assigned),
            combine_weights: pool.unflatten(combine.detach()),
            tokens_per_expert: counts.int(),
            k: Some(self.top_k),
            capacity_logits: None,
            threshold_quantile: None,
            aux_loss,
        };
        (y, stats)
    }
}
