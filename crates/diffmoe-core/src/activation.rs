//! Activation functions with the exact formulas of the official code.

use burn::tensor::{activation, backend::Backend, Tensor};

/// GELU with the tanh approximation (`nn.GELU(approximate="tanh")`), the
/// activation of every GELU MLP of DiT and DiffMoE.
pub fn gelu_tanh<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    activation::gelu_approximate(x)
}
