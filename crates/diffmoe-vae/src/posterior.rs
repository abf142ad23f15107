//! diffusers `DiagonalGaussianDistribution` (`diffusers/models/autoencoders/vae.py`,
//! from LDM's `distributions.py`): the VAE posterior `latent_dist`.

use burn::tensor::{backend::Backend, Tensor};

/// Lower clamp of the log-variance (diffusers `torch.clamp(logvar, -30.0, 20.0)`).
pub const LOGVAR_MIN: f32 = -30.0;
/// Upper clamp of the log-variance.
pub const LOGVAR_MAX: f32 = 20.0;

/// A diagonal Gaussian over latents, built from the encoder's moments.
#[derive(Debug, Clone)]
pub struct DiagonalGaussian<B: Backend> {
    /// Channels `[0, C)` of the moments.
    pub mean: Tensor<B, 4>,
    /// Channels `[C, 2C)` of the moments, clamped to `[LOGVAR_MIN, LOGVAR_MAX]`.
    pub logvar: Tensor<B, 4>,
    /// `exp(0.5 * logvar)`.
    pub std: Tensor<B, 4>,
    /// `exp(logvar)`.
    pub var: Tensor<B, 4>,
}

impl<B: Backend> DiagonalGaussian<B> {
    /// `mean, logvar = moments.chunk(2, dim=1)`.
    ///
    /// # Shapes
    /// - `moments`: `[batch, 2 * latent_channels, height, width]`
    ///
    /// # Panics
    /// If the moments have an odd number of channels.
    pub fn from_moments(moments: Tensor<B, 4>) -> Self {
        let [_, channels, _, _] = moments.dims();
        assert!(channels % 2 == 0, "the moments need an even number of channels, got {channels}");
        let half = channels / 2;
        let mean = moments.clone().narrow(1, 0, half); // [batch, latent_channels, height, width]
        let logvar = moments.narrow(1, half, half).clamp(LOGVAR_MIN, LOGVAR_MAX);
        let std = logvar.clone().mul_scalar(0.5).exp();
        let var = logvar.clone().exp();
        Self { mean, logvar, std, var }
    }

    /// `mean + std * noise`, where diffusers draws `noise` with
    /// `randn_tensor(mean.shape, generator)`; here the caller supplies it.
    ///
    /// # Shapes
    /// - `noise`: `[batch, latent_channels, height, width]` -> same
    ///
    /// # Panics
    /// If `noise` does not have the mean's shape.
    pub fn sample(&self, noise: Tensor<B, 4>) -> Tensor<B, 4> {
        assert_eq!(noise.dims(), self.mean.dims(), "the noise must have the shape of the mean");
        self.mean.clone() + self.std.clone() * noise
    }

    /// The mean (what `AutoencoderKL.forward` decodes unless `sample_posterior`).
    ///
    /// # Shapes
    /// - returns `[batch, latent_channels, height, width]`
    pub fn mode(&self) -> Tensor<B, 4> {
        self.mean.clone()
    }

    /// KL divergence to `N(0, I)` per sample:
    /// `0.5 * sum_{c,h,w}(mean^2 + var - 1 - logvar)`.
    ///
    /// # Shapes
    /// - returns `[batch]`
    pub fn kl(&self) -> Tensor<B, 1> {
        let [batch, channels, height, width] = self.mean.dims();
        let terms = self.mean.clone().square() + self.var.clone() - 1.0 - self.logvar.clone();
        terms.reshape([batch, channels * height * width]).sum_dim(1).reshape([batch]).mul_scalar(0.5)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::TensorData;

    type B = Flex;

    fn moments(logvar: [f32; 4]) -> Tensor<B, 4> {
        let mean = [0.5f32, -1.0, 2.0, 0.0];
        let values: Vec<f32> = mean.iter().chain(logvar.iter()).copied().collect();
        Tensor::from_data(TensorData::new(values, [1, 2, 2, 2]), &Default::default())
    }

    #[test]
    fn logvar_is_clamped_to_its_bounds() {
        let d = DiagonalGaussian::from_moments(moments([-45.0, -29.5, 19.5, 33.0]));
        let logvar: Vec<f32> = d.logvar.into_data().to_vec().unwrap();
        assert_eq!(logvar, vec![-30.0, -29.5, 19.5, 20.0]);
        let var: Vec<f32> = d.var.into_data().to_vec().unwrap();
        let std: Vec<f32> = d.std.into_data().to_vec().unwrap();
        assert_eq!(var[3], 20f32.exp());
        assert_eq!(std[0], (-15f32).exp());
    }

    #[test]
    fn sample_is_mean_plus_std_times_noise_and_mode_is_mean() {
        let d = DiagonalGaussian::from_moments(moments([0.0, 2.0f32.ln() * 2.0, 0.0, 0.0]));
        let noise =
            Tensor::<B, 4>::from_data(TensorData::new(vec![1.0f32, 1.0, -1.0, 0.0], [1, 1, 2, 2]), &Default::default());
        let s: Vec<f32> = d.sample(noise).into_data().to_vec().unwrap();
        assert!((s[0] - 1.5).abs() < 1e-6 && (s[1] - 1.0).abs() < 1e-6 && s[2] == 1.0 && s[3] == 0.0, "{s:?}");
        let mode: Vec<f32> = d.mode().into_data().to_vec().unwrap();
        assert_eq!(mode, vec![0.5, -1.0, 2.0, 0.0]);
    }

    #[test]
    fn kl_of_the_standard_normal_is_zero_and_matches_the_formula() {
        let zero = Tensor::<B, 4>::zeros([3, 8, 2, 2], &Default::default());
        let kl: Vec<f32> = DiagonalGaussian::from_moments(zero).kl().into_data().to_vec().unwrap();
        assert_eq!(kl, vec![0.0; 3]);
        let logvar = [-45.0f32, 1.0, -0.5, 0.0];
        let kl: f32 = DiagonalGaussian::from_moments(moments(logvar)).kl().into_scalar();
        let expected: f64 = [0.5f64, -1.0, 2.0, 0.0]
            .iter()
            .zip(logvar.map(|l| l.clamp(-30.0, 20.0) as f64))
            .map(|(m, l)| m * m + l.exp() - 1.0 - l)
            .sum::<f64>()
            * 0.5;
        assert!((kl as f64 - expected).abs() < 1e-5 * expected.abs(), "{kl} vs {expected}");
    }
}
