//! The experts of one MoE layer with their weights stacked along a leading
//! expert axis, so that every expert runs in one batched matmul over the
//! tokens gathered for it (the official code loops over experts in Python).
//!
//! Each expert's matrix is stored as the official `nn.Linear.weight`,
//! `[d_output, d_input]`, and multiplied through its transposed view
//! (`x @ w^T`, as `F.linear` does). The CPU products then read every weight
//! row, the input dimension, in one contiguous run, where the `[d_input,
//! d_output]` layout of burn's `Linear` makes them gather each expert's
//! matrix with a stride of a row. With few tokens per expert the products
//! stream their weights from memory: at 64 tokens, one thread, weights out
//! of cache, the contiguous reads made them 1.3-1.5x as fast
//! (docs/benchmarks.md, 2026-12-07).

use burn::module::{Module, Param};
use burn::tensor::{backend::Backend, Tensor};

use crate::activation::silu;
use crate::bias::{add_expert_bias, AfterBias};
use crate::init;
use crate::matmul::{matmul, matmul_filled_rows};

/// Which feed-forward network each expert (and each dense MLP) is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExpertKind {
    /// GELU (tanh) MLP with biases, `Mlp(D, H)` (official `use_swiglu=False`).
    Gelu,
    /// SwiGLU without biases, `MoeMLP(D, H)` (official `use_swiglu=True`).
    SwiGlu,
}

/// GELU experts: `fc2(gelu_tanh(fc1(x)))` for each expert.
#[derive(Module, Debug)]
pub struct GeluExperts<B: Backend> {
    /// `[n_experts, d_hidden, d_model]` (each official `fc1.weight`).
    pub fc1_weight: Param<Tensor<B, 3>>,
    /// `[n_experts, d_hidden]`.
    pub fc1_bias: Param<Tensor<B, 2>>,
    /// `[n_experts, d_model, d_hidden]` (each official `fc2.weight`).
    pub fc2_weight: Param<Tensor<B, 3>>,
    /// `[n_experts, d_model]`.
    pub fc2_bias: Param<Tensor<B, 2>>,
}

/// SwiGLU experts: `down(silu(gate(x)) * up(x))` for each expert.
#[derive(Module, Debug)]
pub struct SwiGluExperts<B: Backend> {
    /// `[n_experts, d_hidden, d_model]` (each official `gate_proj.weight`).
    pub gate_proj: Param<Tensor<B, 3>>,
    /// `[n_experts, d_hidden, d_model]` (each official `up_proj.weight`).
    pub up_proj: Param<Tensor<B, 3>>,
    /// `[n_experts, d_model, d_hidden]` (each official `down_proj.weight`).
    pub down_proj: Param<Tensor<B, 3>>,
}

/// The stacked experts of one layer.
#[derive(Module, Debug)]
pub enum ExpertBank<B: Backend> {
    /// GELU experts.
    Gelu(GeluExperts<B>),
    /// SwiGLU experts.
    SwiGlu(SwiGluExperts<B>),
}

impl<B: Backend> ExpertBank<B> {
    /// A bank with the official initialisation: every expert `nn.Linear` is
    /// Xavier-uniform with zero bias (`_basic_init`).
    pub fn new(kind: ExpertKind, n_experts: usize, d_model: usize, d_hidden: usize, device: &B::Device) -> Self {
        let up = |d: &B::Device| {
            Param::from_tensor(init::xavier_uniform([n_experts, d_hidden, d_model], d_model, d_hidden, d))
        };
        let down = |d: &B::Device| {
            Param::from_tensor(init::xavier_uniform([n_experts, d_model, d_hidden], d_hidden, d_model, d))
        };
        match kind {
            ExpertKind::Gelu => Self::Gelu(GeluExperts {
                fc1_weight: up(device),
                fc1_bias: Param::from_tensor(Tensor::zeros([n_experts, d_hidden], device)),
                fc2_weight: down(device),
                fc2_bias: Param::from_tensor(Tensor::zeros([n_experts, d_model], device)),
            }),
            ExpertKind::SwiGlu => {
                Self::SwiGlu(SwiGluExperts { gate_proj: up(device), up_proj: up(device), down_proj: down(device) })
            }
        }
    }

    /// The kind of the experts.
    pub fn kind(&self) -> ExpertKind {
        match self {
            Self::Gelu(_) => ExpertKind::Gelu,
            Self::SwiGlu(_) => ExpertKind::SwiGlu,
        }
    }

    /// `[n_experts, d_model, d_hidden]`.
    pub fn dims(&self) -> [usize; 3] {
        let [n_experts, d_hidden, d_model] = match self {
            Self::Gelu(e) => e.fc1_weight.dims(),
            Self::SwiGlu(e) => e.gate_proj.dims(),
        };
        [n_experts, d_model, d_hidden]
    }

    /// Number of experts.
    pub fn n_experts(&self) -> usize {
        self.dims()[0]
    }

    /// Runs expert `e` on row `e` of the input, all experts in one batched matmul.
    ///
    /// # Shapes
    /// - `x`: `[n_experts, tokens, d_model]` -> `[n_experts, tokens, d_model]`
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.forward_with(x, None)
    }

    /// Runs expert `e` on the first `filled[e]` rows of row `e` of the input
    /// (its tokens; the rows below are padding), in inference: on the CPU
    /// backend the padding is not computed
    /// ([`matmul_filled_rows`](crate::matmul::matmul_filled_rows), and the
    /// biases and activation of a GELU expert in one pass). The
    /// output rows of the padding are unspecified (but finite for finite
    /// weights and inputs): the caller weights them by zero.
    ///
    /// # Shapes
    /// - `x`: `[n_experts, slots, d_model]`, `filled`: `n_experts` counts
    ///   `<= slots` -> `[n_experts, slots, d_model]`
    pub fn forward_filled(&self, x: Tensor<B, 3>, filled: &[usize]) -> Tensor<B, 3> {
        self.forward_with(x, Some(filled))
    }

    /// The experts on the first `filled[e]` rows of expert `e` (all rows
    /// without `filled`).
    fn forward_with(&self, x: Tensor<B, 3>, filled: Option<&[usize]>) -> Tensor<B, 3> {
        // `x @ w^T`.
        let product = |x, weight: &Param<Tensor<B, 3>>| {
            let w_t = weight.val().swap_dims(1, 2);
            match filled {
                Some(filled) => matmul_filled_rows(x, w_t, filled),
                None => matmul(x, w_t),
            }
        };
        match self {
            Self::Gelu(e) => {
                let h = add_expert_bias(product(x, &e.fc1_weight), e.fc1_bias.val(), filled, AfterBias::GeluTanh); // [E, K, H]
                add_expert_bias(product(h, &e.fc2_weight), e.fc2_bias.val(), filled, AfterBias::Nothing)
                // [E, K, D]
            }
            Self::SwiGlu(e) => {
                let gate = silu(product(x.clone(), &e.gate_proj)); // [E, K, H]
                let up = product(x, &e.up_proj); // [E, K, H]
                product(gate * up, &e.down_proj) // [E, K, D]
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::{Distribution, Tolerance};

    /// Expert `e` of `bank` on `x`, written as the official `nn.Linear`s of
    /// its weights (`x @ weight^T + bias`) with burn's own ops.
    fn official_expert(bank: &ExpertBank<Flex>, e: usize, x: Tensor<Flex, 2>) -> Tensor<Flex, 2> {
        let weight = |w: &Param<Tensor<Flex, 3>>| {
            let [_, rows, cols] = w.dims();
            w.val().narrow(0, e, 1).reshape([rows, cols]).transpose()
        };
        let bias = |b: &Param<Tensor<Flex, 2>>| b.val().narrow(0, e, 1);
        match bank {
            ExpertBank::Gelu(w) => {
                let h = x.matmul(weight(&w.fc1_weight)) + bias(&w.fc1_bias);
                let h = burn::tensor::activation::gelu_approximate(h);
                h.matmul(weight(&w.fc2_weight)) + bias(&w.fc2_bias)
            }
            ExpertBank::SwiGlu(w) => {
                let gate = burn::tensor::activation::silu(x.clone().matmul(weight(&w.gate_proj)));
                (gate * x.matmul(weight(&w.up_proj))).matmul(weight(&w.down_proj))
            }
        }
    }

    #[test]
    fn each_expert_is_the_official_layer_of_its_weights() {
        let device = Default::default();
        for kind in [ExpertKind::Gelu, ExpertKind::SwiGlu] {
            let mut bank = ExpertBank::<Flex>::new(kind, 3, 8, 12, &device);
            assert_eq!(bank.dims(), [3, 8, 12]);
            if let ExpertBank::Gelu(w) = &mut bank {
                // Nonzero biases, so that they take part.
                w.fc1_bias = Param::from_tensor(Tensor::random([3, 12], Distribution::Normal(0.0, 1.0), &device));
                w.fc2_bias = Param::from_tensor(Tensor::random([3, 8], Distribution::Normal(0.0, 1.0), &device));
            }
            let x = Tensor::<Flex, 3>::random([3, 5, 8], Distribution::Normal(0.0, 1.0), &device);
            let y = bank.forward(x.clone());
            for e in 0..3 {
                let ours = y.clone().narrow(0, e, 1).reshape([5, 8]);
                let official = official_expert(&bank, e, x.clone().narrow(0, e, 1).reshape([5, 8]));
                ours.into_data().assert_approx_eq::<f32>(&official.into_data(), Tolerance::absolute(1e-5));
            }
        }
    }

    #[test]
    fn filled_experts_equal_the_experts_on_their_tokens() {
        let device = Default::default();
        for kind in [ExpertKind::Gelu, ExpertKind::SwiGlu] {
            let bank = ExpertBank::<Flex>::new(kind, 4, 8, 16, &device);
            let x = Tensor::<Flex, 3>::random([4, 6, 8], Distribution::Normal(0.0, 1.0), &device);
            let filled = [6, 0, 3, 1];
            let all = bank.forward(x.clone());
            let ours = bank.forward_filled(x, &filled);
            assert_eq!(ours.dims(), [4, 6, 8]);
            for (e, &f) in filled.iter().enumerate().filter(|(_, &f)| f > 0) {
                let rows = |t: &Tensor<Flex, 3>| t.clone().slice([e..e + 1, 0..f]).into_data();
                rows(&ours).assert_eq(&rows(&all), true);
            }
            let finite: Vec<f32> =
                bank.forward_filled(Tensor::zeros([4, 6, 8], &device), &filled).into_data().to_vec().unwrap();
            assert!(finite.iter().all(|v| v.is_finite()));
        }
    }
}
