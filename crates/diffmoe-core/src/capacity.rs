//! Capacity: the top-k of expert choice, and DiffMoE's capacity predictor
//! (Sec. 3.3, official `SparseMoEBlock.capacity_predictor`).

use burn::module::Module;
use burn::nn::Linear;
use burn::tensor::{backend::Backend, Tensor};

use crate::activation::silu;
use crate::init;
use crate::matmul::linear;

/// Tokens per expert of expert-choice routing over `tokens` tokens:
/// `int((tokens / n_experts) * capacity)`, with the official float division,
/// float product and truncation (`48/16*1.3 = 3.9000000000000004 -> 3`).
pub fn capacity_k(tokens: usize, n_experts: usize, capacity: f64) -> usize {
    ((tokens as f64 / n_experts as f64) * capacity) as usize
}

/// `Linear(D, D) - SiLU - Linear(D, E)` on the detached MoE input: a logit per
/// token and expert for "expert e would pick this token".
#[derive(Module, Debug)]
pub struct CapacityPredictor<B: Backend> {
    /// Official `capacity_predictor.0`: `[d_model] -> [d_model]`.
    pub fc1: Linear<B>,
    /// Official `capacity_predictor.2`: `[d_model] -> [n_experts]`.
    pub fc2: Linear<B>,
}

impl<B: Backend> CapacityPredictor<B> {
    /// A predictor with the official initialisation (Xavier-uniform, zero bias).
    pub fn new(d_model: usize, n_experts: usize, device: &B::Device) -> Self {
        Self { fc1: init::linear(d_model, d_model, true, device), fc2: init::linear(d_model, n_experts, true, device) }
    }

    /// The input is detached here, so the predictor learns only from its own
    /// loss and that loss sends no gradient into the trunk.
    ///
    /// # Shapes
    /// - `x`: `[S, d_model]` -> `[S, n_experts]` logits
    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        linear(silu(linear(x.detach(), &self.fc1)), &self.fc2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn k_truncates_like_python() {
        assert_eq!(capacity_k(48, 4, 1.7), 20); // 20.4
        assert_eq!(capacity_k(48, 16, 1.3), 3); // 3.9000000000000004
        assert_eq!(capacity_k(32, 8, 1.0), 4);
        assert_eq!(capacity_k(32, 4, 2.0), 16);
        assert_eq!(capacity_k(3, 4, 1.0), 0);
    }
}
