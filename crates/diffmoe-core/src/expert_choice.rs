//! EC-DiT's MLP layer (official `models_ECDiT.py` `SparseMoEBlock`): expert
//! choice inside each sample. Every expert takes its top
//! `k = int((tokens / E) * capacity)` tokens of each sample by gate score.

use burn::config::Config;
use burn::module::{Module, Param};
use burn::tensor::{backend::Backend, Int, Tensor};

use crate::activation::softmax_last;
use crate::capacity::capacity_k;
use crate::expert_bank::{ExpertBank, ExpertKind};
use crate::init;
use crate::matmul::matmul;
use crate::mlp::SwiGluMlp;
use crate::routing::RoutingStats;
use crate::rows::on_rows;
use crate::token_pool::TokenPool;
use crate::topk::top_k_indices;

/// Hyper-parameters of an EC layer.
#[derive(Config, Debug)]
pub struct ExpertChoiceConfig {
    /// Model width.
    pub d_model: usize,
    /// Hidden width of each expert.
    pub d_hidden: usize,
    /// Routed experts.
    pub n_experts: usize,
    /// Each expert takes `int((tokens / E) * capacity)` tokens per sample.
    pub capacity: f64,
    /// GELU or SwiGLU experts.
    pub expert_kind: ExpertKind,
    /// Shared SwiGLU expert of hidden width `d_model * n_shared_experts`
    /// (official `MoeMLP(D, D * n_shared)`), when > 0.
    #[config(default = 0)]
    pub n_shared_experts: usize,
}

impl ExpertChoiceConfig {
    /// A layer with the official initialisation (gate `N(0, 0.006)`, every
    /// `nn.Linear` Xavier-uniform with zero bias).
    pub fn init<B: Backend>(&self, device: &B::Device) -> ExpertChoiceLayer<B> {
        ExpertChoiceLayer {
            gate_weight: Param::from_tensor(init::normal([self.n_experts, self.d_model], 0.006, device)),
            experts: ExpertBank::new(self.expert_kind, self.n_experts, self.d_model, self.d_hidden, device),
            shared_experts: (self.n_shared_experts > 0)
                .then(|| SwiGluMlp::new(self.d_model, self.d_model * self.n_shared_experts, device)),
            capacity: self.capacity,
        }
    }
}

/// The EC-DiT MLP layer. Train and inference compute the same thing.
#[derive(Module, Debug)]
pub struct ExpertChoiceLayer<B: Backend> {
    /// `[n_experts, d_model]`.
    pub gate_weight: Param<Tensor<B, 2>>,
    /// The routed experts.
    pub experts: ExpertBank<B>,
    /// Shared SwiGLU expert, when configured.
    pub shared_experts: Option<SwiGluMlp<B>>,
    /// Capacity per sample.
    pub capacity: f64,
}

impl<B: Backend> ExpertChoiceLayer<B> {
    /// Number of routed experts.
    pub fn n_experts(&self) -> usize {
        self.experts.n_experts()
    }

    /// # Shapes
    /// - `x`: `[batch, tokens, d_model]` -> `[batch, tokens, d_model]`
    ///
    /// # Panics
    /// If `k` is 0 (fewer tokens per sample than the capacity allows).
    pub fn forward(&self, x: Tensor<B, 3>) -> (Tensor<B, 3>, RoutingStats<B>) {
        let [batch, tokens, _] = x.dims();
        let n_experts = self.n_experts();
        let device = x.device();
        let k = capacity_k(tokens, n_experts, self.capacity);
        assert!(k >= 1 && k <= tokens, "EC capacity {} gives k = {k} for {tokens} tokens", self.capacity);
        let scores =
            softmax_last(on_rows(x.clone(), |x| matmul(x, self.gate_weight.val().transpose()))).swap_dims(1, 2); // [N, E, T]
        let local = top_k_indices(scores.clone(), k); // [N, E, k]
        let weights = scores.gather(2, local.clone()); // [N, E, k]
                                                       // Sample-local token indices to pool rows: s = n * tokens + t.
        let offset = Tensor::<B, 1, Int>::arange(0..batch as i64, &device).mul_scalar(tokens as i64);
        let rows = local + offset.reshape([batch, 1, 1]); // [N, E, k]
        let rows = rows.swap_dims(0, 1).reshape([n_experts, batch * k]); // [E, N*k]
        let weights = weights.swap_dims(0, 1).reshape([n_experts, batch * k]); // [E, N*k]

        let pool = TokenPool::new(x.clone());
        let y = pool.unflatten(pool.dispatch(&self.experts, rows.clone(), weights.clone()));
        let valid = Tensor::ones([n_experts, batch * k], &device);
        let mut stats = pool.expert_choice_stats(rows, weights, valid);
        stats.k = Some(k);
        let y = match &self.shared_experts {
            Some(shared) => y + shared.forward(x),
            None => y,
        };
        (y, stats)
    }
}
