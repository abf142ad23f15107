//! Activation functions with the exact formulas of the official code.

use burn::tensor::{activation, backend::Backend, Tensor};

use crate::fused;

/// GELU with the tanh approximation (`nn.GELU(approximate="tanh")`), the
/// activation of every GELU MLP of DiT and DiffMoE.
///
/// One fused pass, forward and backward, on the CPU backend (`fused.rs`).
/// Elsewhere computed as `x * sigmoid(2u)` with
/// `u = sqrt(2/pi) * (x + 0.044715 x^3)`, which equals `0.5 x (1 + tanh(u))`
/// and needs neither `powf` nor `tanh`.
pub fn gelu_tanh<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    let x = match fused::pointwise(fused::GELU_TANH, x) {
        Ok(y) => return y,
        Err(x) => x,
    };
    /// `2 * sqrt(2 / pi)`.
    const TWO_SQRT_2_OVER_PI: f64 = 2.0 * core::f64::consts::FRAC_2_SQRT_PI * core::f64::consts::FRAC_1_SQRT_2;
    let cube = x.clone() * x.clone() * x.clone();
    let u2 = (x.clone() + cube.mul_scalar(0.044715)).mul_scalar(TWO_SQRT_2_OVER_PI);
    x * activation::sigmoid(u2)
}

/// SiLU, `x * sigmoid(x)` (`nn.SiLU`): one fused pass, forward and backward,
/// on the CPU backend (`fused.rs`), burn's `silu` elsewhere.
pub fn silu<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    fused::pointwise(fused::SILU, x).unwrap_or_else(activation::silu)
}

/// Softmax over the last axis: one fused pass, forward and backward, on the
/// CPU backend (`fused.rs`), burn's softmax elsewhere.
///
/// # Shapes
/// - `x`: `[..., n]` -> same
pub fn softmax_last<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    fused::softmax_last(x).unwrap_or_else(|x| activation::softmax(x, D - 1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    #[test]
    fn gelu_tanh_matches_the_tanh_formula() {
        let device = Default::default();
        let xs: Vec<f32> = (-800..=800).map(|i| i as f32 / 80.0).collect(); // [-10, 10]
        let x = Tensor::<Flex, 1>::from_floats(xs.as_slice(), &device);
        let got = gelu_tanh(x).into_data().to_vec::<f32>().unwrap();
        for (x, y) in xs.iter().zip(got) {
            let x = *x as f64;
            let u = (2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x);
            let expected = 0.5 * x * (1.0 + u.tanh());
            let err = (y as f64 - expected).abs();
            assert!(err <= 1e-6 * (1.0 + expected.abs()), "gelu_tanh({x}) = {y}, expected {expected}");
        }
    }
}
