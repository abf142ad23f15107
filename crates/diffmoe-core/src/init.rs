//! Parameter initialisers of the official code (`initialize_weights`).

use burn::module::Param;
use burn::nn::Linear;
use burn::tensor::{backend::Backend, Distribution, Tensor};

/// `xavier_uniform_` of a weight with the given fan-in and fan-out, for a
/// tensor of any shape (stacked expert banks use the per-expert fans).
pub fn xavier_uniform<B: Backend, const D: usize>(
    shape: [usize; D],
    fan_in: usize,
    fan_out: usize,
    device: &B::Device,
) -> Tensor<B, D> {
    let bound = (6.0 / (fan_in + fan_out) as f64).sqrt();
    Tensor::random(shape, Distribution::Uniform(-bound, bound), device)
}

/// `nn.init.normal_(std)`.
pub fn normal<B: Backend, const D: usize>(shape: [usize; D], std: f64, device: &B::Device) -> Tensor<B, D> {
    Tensor::random(shape, Distribution::Normal(0.0, std), device)
}

/// An `nn.Linear` as the official `_basic_init` leaves it: Xavier-uniform
/// weight and zero bias. Burn stores the weight as `[d_input, d_output]`.
pub fn linear<B: Backend>(d_input: usize, d_output: usize, bias: bool, device: &B::Device) -> Linear<B> {
    Linear {
        weight: Param::from_tensor(xavier_uniform([d_input, d_output], d_input, d_output, device)),
        bias: bias.then(|| Param::from_tensor(Tensor::zeros([d_output], device))),
    }
}
