//! Activation functions with the exact formulas of the official code.

use burn::tensor::{activation, backend::Backend, Tensor};

/// GELU with the tanh approximation (`nn.GELU(approximate="tanh")`), the
/// activation of every GELU MLP of DiT and DiffMoE.
///
/// Computed as `x * sigmoid(2u)` with `u = sqrt(2/pi) * (x + 0.044715 x^3)`,
/// which equals `0.5 x (1 + tanh(u))` and needs neither `powf` nor `tanh`:
/// on the CPU backend those two libm calls per element were a fifth of a
/// training step.
pub fn gelu_tanh<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    /// `2 * sqrt(2 / pi)`.
    const TWO_SQRT_2_OVER_PI: f64 = 2.0 * core::f64::consts::FRAC_2_SQRT_PI * core::f64::consts::FRAC_1_SQRT_2;
    let cube = x.clone() * x.clone() * x.clone();
    let u2 = (x.clone() + cube.mul_scalar(0.044715)).mul_scalar(TWO_SQRT_2_OVER_PI);
    x * activation::sigmoid(u2)
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
