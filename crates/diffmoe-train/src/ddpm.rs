//! The DDPM objective of DiT/ADM (official `diffusion/gaussian_diffusion.py`
//! created by `create_diffusion("")`): 1000 linear betas, epsilon prediction
//! with a learned-range variance, loss = MSE + variational bound, where the
//! bound at `t = 0` is the discretised-Gaussian decoder likelihood.
//!
//! The schedule is computed in f64 like the official numpy arrays; values are
//! rounded to f32 when taken per timestep, as `_extract_into_tensor` does.
//! The posterior helpers (`x_0` from `eps`, posterior mean, learned-range
//! variance) and respacing are shared with the samplers in `crate::sampler`.

use burn::tensor::{backend::Backend, Int, Tensor, TensorData};

use diffmoe_core::Routing;
use diffmoe_model::DiT;

use crate::flow::finish;
use crate::loss_terms::LossTerms;

/// Diffusion steps of the official training schedule.
pub const DDPM_STEPS: usize = 1000;

/// The f64 arrays of a Gaussian diffusion schedule.
#[derive(Debug, Clone)]
pub struct DdpmSchedule {
    /// `beta_t`.
    pub betas: Vec<f64>,
    /// `prod_{s <= t} (1 - beta_s)`.
    pub alphas_cumprod: Vec<f64>,
    /// `alphas_cumprod[t - 1]`, 1 at `t = 0`.
    pub alphas_cumprod_prev: Vec<f64>,
    /// Variance of `q(x_{t-1} | x_t, x_0)`.
    pub posterior_variance: Vec<f64>,
    /// Its log, with entry 0 replaced by entry 1 (the variance is 0 at t = 0).
    pub posterior_log_variance_clipped: Vec<f64>,
    /// Coefficient of `x_0` in the posterior mean.
    pub posterior_mean_coef1: Vec<f64>,
    /// Coefficient of `x_t` in the posterior mean.
    pub posterior_mean_coef2: Vec<f64>,
}

impl DdpmSchedule {
    /// The official linear schedule: `betas = linspace(1e-4, 0.02, steps)`
    /// (numpy `linspace`, f64; the scale `1000 / steps` is 1 for 1000 steps).
    pub fn linear(steps: usize) -> Self {
        let scale = 1000.0 / steps as f64;
        let (start, end) = (scale * 0.0001, scale * 0.02);
        let step = (end - start) / (steps - 1) as f64;
        let mut betas: Vec<f64> = (0..steps).map(|i| i as f64 * step + start).collect();
        *betas.last_mut().expect("at least one step") = end;
        Self::from_betas(betas)
    }

    /// A schedule from its betas (respacing recomputes betas from kept steps).
    pub fn from_betas(betas: Vec<f64>) -> Self {
        let mut alphas_cumprod = Vec::with_capacity(betas.len());
        let mut acc = 1.0;
        for b in &betas {
            acc *= 1.0 - b;
            alphas_cumprod.push(acc);
        }
        let alphas_cumprod_prev: Vec<f64> =
            std::iter::once(1.0).chain(alphas_cumprod[..betas.len() - 1].iter().copied()).collect();
        let n = betas.len();
        let posterior_variance: Vec<f64> =
            (0..n).map(|t| betas[t] * (1.0 - alphas_cumprod_prev[t]) / (1.0 - alphas_cumprod[t])).collect();
        let posterior_log_variance_clipped: Vec<f64> = (0..n)
            .map(|t| {
                if t == 0 {
                    posterior_variance.get(1).copied().unwrap_or(posterior_variance[0])
                } else {
                    posterior_variance[t]
                }
            })
            .map(f64::ln)
            .collect();
        let posterior_mean_coef1 =
            (0..n).map(|t| betas[t] * alphas_cumprod_prev[t].sqrt() / (1.0 - alphas_cumprod[t])).collect();
        let posterior_mean_coef2 = (0..n)
            .map(|t| (1.0 - alphas_cumprod_prev[t]) * (1.0 - betas[t]).sqrt() / (1.0 - alphas_cumprod[t]))
            .collect();
        Self {
            betas,
            alphas_cumprod,
            alphas_cumprod_prev,
            posterior_variance,
            posterior_log_variance_clipped,
            posterior_mean_coef1,
            posterior_mean_coef2,
        }
    }

    /// Number of steps.
    pub fn steps(&self) -> usize {
        self.betas.len()
    }

    /// `f(t_i)` for each sample, rounded to f32, shaped to broadcast over images.
    ///
    /// # Shapes
    /// - returns `[batch, 1, 1, 1]`
    pub(crate) fn extract<B: Backend>(
        &self,
        t: &[usize],
        f: impl Fn(usize) -> f64,
        device: &B::Device,
    ) -> Tensor<B, 4> {
        let values: Vec<f32> = t.iter().map(|&i| f(i) as f32).collect();
        Tensor::from_data(TensorData::new(values, [t.len(), 1, 1, 1]), device)
    }

    /// The schedule of a respaced diffusion (official `SpacedDiffusion`):
    /// only the steps in `kept` remain, and each kept step's beta is
    /// recomputed as `1 - acp_i / acp_prev_kept` so that the kept
    /// `alphas_cumprod` are exactly the original ones.
    ///
    /// # Panics
    /// If `kept` is empty, or names a step outside the schedule.
    pub fn respaced(&self, kept: &[usize]) -> Self {
        assert!(!kept.is_empty(), "a respaced schedule needs at least one step");
        let mut keep = vec![false; self.steps()];
        for &i in kept {
            assert!(i < self.steps(), "respaced step {i} is outside a schedule of {} steps", self.steps());
            keep[i] = true;
        }
        let mut last_alpha_cumprod = 1.0;
        let mut betas = Vec::with_capacity(kept.len());
        for (i, &acp) in self.alphas_cumprod.iter().enumerate() {
            if keep[i] {
                betas.push(1.0 - acp / last_alpha_cumprod);
                last_alpha_cumprod = acp;
            }
        }
        Self::from_betas(betas)
    }

    /// `x_0` predicted from the noise prediction (official
    /// `_predict_xstart_from_eps`): `sqrt(1/acp_t) x_t - sqrt(1/acp_t - 1) eps`.
    ///
    /// # Shapes
    /// - `x_t`, `eps`: `[batch, C, H, W]`, `t`: one step index per sample -> `[batch, C, H, W]`
    pub fn predict_xstart_from_eps<B: Backend>(
        &self,
        x_t: Tensor<B, 4>,
        t: &[usize],
        eps: Tensor<B, 4>,
    ) -> Tensor<B, 4> {
        let device = x_t.device();
        self.extract::<B>(t, |i| (1.0 / self.alphas_cumprod[i]).sqrt(), &device) * x_t
            - self.extract::<B>(t, |i| (1.0 / self.alphas_cumprod[i] - 1.0).sqrt(), &device) * eps
    }

    /// The noise implied by an `x_0` prediction (official
    /// `_predict_eps_from_xstart`): `(sqrt(1/acp_t) x_t - x_0) / sqrt(1/acp_t - 1)`.
    ///
    /// # Shapes
    /// - `x_t`, `pred_xstart`: `[batch, C, H, W]`, `t`: one step index per sample -> `[batch, C, H, W]`
    pub fn predict_eps_from_xstart<B: Backend>(
        &self,
        x_t: Tensor<B, 4>,
        t: &[usize],
        pred_xstart: Tensor<B, 4>,
    ) -> Tensor<B, 4> {
        let device = x_t.device();
        (self.extract::<B>(t, |i| (1.0 / self.alphas_cumprod[i]).sqrt(), &device) * x_t - pred_xstart)
            / self.extract::<B>(t, |i| (1.0 / self.alphas_cumprod[i] - 1.0).sqrt(), &device)
    }

    /// Mean of the posterior `q(x_{t-1} | x_t, x_0)` (official
    /// `q_posterior_mean_variance`): `coef1_t x_0 + coef2_t x_t`.
    ///
    /// # Shapes
    /// - `x_start`, `x_t`: `[batch, C, H, W]`, `t`: one step index per sample -> `[batch, C, H, W]`
    pub fn q_posterior_mean<B: Backend>(&self, x_start: Tensor<B, 4>, x_t: Tensor<B, 4>, t: &[usize]) -> Tensor<B, 4> {
        let device = x_t.device();
        self.extract::<B>(t, |i| self.posterior_mean_coef1[i], &device) * x_start
            + self.extract::<B>(t, |i| self.posterior_mean_coef2[i], &device) * x_t
    }

    /// The learned-range log-variance (official `LEARNED_RANGE`): the model's
    /// variance channels `v` in `[-1, 1]` interpolate, with `frac = (v + 1) / 2`,
    /// between the clipped posterior log-variance (`v = -1`) and `log beta_t`
    /// (`v = 1`).
    ///
    /// # Shapes
    /// - `v`: `[batch, C, H, W]`, `t`: one step index per sample -> `[batch, C, H, W]`
    pub fn learned_range_log_variance<B: Backend>(&self, v: Tensor<B, 4>, t: &[usize]) -> Tensor<B, 4> {
        let device = v.device();
        let min_log = self.extract::<B>(t, |i| self.posterior_log_variance_clipped[i], &device);
        let max_log = self.extract::<B>(t, |i| self.betas[i].ln(), &device);
        let frac = (v + 1.0) / 2.0;
        frac.clone() * max_log + (frac.neg() + 1.0) * min_log
    }

    /// The fixed "large" log-variance (official `FIXED_LARGE`, what
    /// `create_diffusion` picks without a learned sigma): `log beta_t`, with
    /// the posterior variance of step 1 at step 0 for a better decoder
    /// likelihood.
    ///
    /// # Shapes
    /// - `t`: one step index per sample -> `[batch, 1, 1, 1]`
    pub fn fixed_large_log_variance<B: Backend>(&self, t: &[usize], device: &B::Device) -> Tensor<B, 4> {
        let variance = |i: usize| match i {
            0 => self.posterior_variance.get(1).copied().unwrap_or(self.betas[0]),
            i => self.betas[i],
        };
        self.extract::<B>(t, |i| variance(i).ln(), device)
    }

    /// `q(x_t | x_0)`: `sqrt(acp_t) x_0 + sqrt(1 - acp_t) noise`.
    ///
    /// # Shapes
    /// - `x_start`, `noise`: `[batch, C, H, W]`, `t`: one step per sample
    pub fn q_sample<B: Backend>(&self, x_start: Tensor<B, 4>, t: &[usize], noise: Tensor<B, 4>) -> Tensor<B, 4> {
        let device = x_start.device();
        let a = self.extract::<B>(t, |i| self.alphas_cumprod[i].sqrt(), &device);
        let b = self.extract::<B>(t, |i| (1.0 - self.alphas_cumprod[i]).sqrt(), &device);
        a * x_start + b * noise
    }

    /// The DDPM training loss for given steps and noise. The model must
    /// predict a learned-range variance (`learn_sigma`); then
    /// `loss = sum of weighted capacity terms + mse.mean() + vb.mean()`, and
    /// the bound uses the detached mean prediction so it trains only the
    /// variance, as officially. Without a learned sigma only the MSE is used.
    ///
    /// # Shapes
    /// - `x_start`, `noise`: `[batch, C, H, W]`, `y`: `[batch]`, `t`: one step per sample
    pub fn training_loss<B: Backend>(
        &self,
        model: &DiT<B>,
        x_start: Tensor<B, 4>,
        y: Tensor<B, 1, Int>,
        t: &[usize],
        noise: Tensor<B, 4>,
    ) -> LossTerms<B> {
        let [n, c, ..] = x_start.dims();
        let device = x_start.device();
        let x_t = self.q_sample(x_start.clone(), t, noise.clone());
        let t_model =
            Tensor::<B, 1>::from_data(TensorData::new(t.iter().map(|&i| i as f32).collect::<Vec<_>>(), [n]), &device);
        let output = model.forward(x_t.clone(), t_model, y, Routing::Train);
        let out_channels = output.output.dims()[1];
        let eps = output.output.clone().narrow(1, 0, c);
        let mse = mean_flat((noise.clone() - eps.clone()).powi_scalar(2));
        let vb = (out_channels == 2 * c).then(|| {
            let v = output.output.clone().narrow(1, c, c);
            self.vb_terms_bpd(x_start, x_t.clone(), t, eps.detach(), v)
        });
        finish(model, output, mse, vb, x_t, noise)
    }

    /// The variational-bound term in bits per dimension (official
    /// `_vb_terms_bpd` with `clip_denoised=False`).
    fn vb_terms_bpd<B: Backend>(
        &self,
        x_start: Tensor<B, 4>,
        x_t: Tensor<B, 4>,
        t: &[usize],
        eps: Tensor<B, 4>,
        v: Tensor<B, 4>,
    ) -> Tensor<B, 1> {
        let device = x_start.device();
        let ex = |f: &dyn Fn(usize) -> f64| self.extract::<B>(t, f, &device);
        let true_mean = self.q_posterior_mean(x_start.clone(), x_t.clone(), t);
        let true_log_var = ex(&|i| self.posterior_log_variance_clipped[i]);
        let log_var = self.learned_range_log_variance(v, t);
        let pred_xstart = self.predict_xstart_from_eps(x_t.clone(), t, eps);
        let mean = self.q_posterior_mean(pred_xstart, x_t, t);
        let ln2 = std::f64::consts::LN_2;
        let kl = mean_flat(normal_kl(true_mean, true_log_var, mean.clone(), log_var.clone())).div_scalar(ln2);
        let nll = mean_flat(discretized_gaussian_log_likelihood(x_start, mean, log_var.mul_scalar(0.5)).neg())
            .div_scalar(ln2);
        let at_zero: Vec<bool> = t.iter().map(|&i| i == 0).collect();
        let mask = Tensor::<B, 1, burn::tensor::Bool>::from_data(TensorData::new(at_zero, [t.len()]), &device);
        kl.mask_where(mask, nll)
    }
}

/// Mean over all axes but the batch.
///
/// # Shapes
/// - `x`: `[batch, ...]` -> `[batch]`
fn mean_flat<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 1> {
    let [n, ..] = x.dims();
    x.reshape([n as i32, -1]).mean_dim(1).reshape([n])
}

/// KL divergence between two Gaussians given means and log-variances.
fn normal_kl<B: Backend>(
    mean1: Tensor<B, 4>,
    logvar1: Tensor<B, 4>,
    mean2: Tensor<B, 4>,
    logvar2: Tensor<B, 4>,
) -> Tensor<B, 4> {
    ((logvar2.clone() - logvar1.clone())
        + (logvar1 - logvar2.clone()).exp()
        + (mean1 - mean2).powi_scalar(2) * logvar2.neg().exp()
        - 1.0)
        * 0.5
}

/// The tanh approximation of the standard normal CDF.
fn approx_standard_normal_cdf<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    let k = (2.0 / std::f64::consts::PI).sqrt();
    ((x.clone() + x.powi_scalar(3) * 0.044715) * k).tanh().add_scalar(1.0) * 0.5
}

/// Log-likelihood of `x` (images in `[-1, 1]` quantised to 256 bins) under a
/// discretised Gaussian, with the edge bins open-ended.
fn discretized_gaussian_log_likelihood<B: Backend>(
    x: Tensor<B, 4>,
    means: Tensor<B, 4>,
    log_scales: Tensor<B, 4>,
) -> Tensor<B, 4> {
    let centered = x.clone() - means;
    let inv_stdv = log_scales.neg().exp();
    let cdf_plus = approx_standard_normal_cdf(inv_stdv.clone() * (centered.clone() + 1.0 / 255.0));
    let cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0));
    let log_cdf_plus = cdf_plus.clone().clamp_min(1e-12).log();
    let log_one_minus_cdf_min = (cdf_min.clone().neg() + 1.0).clamp_min(1e-12).log();
    let log_delta = (cdf_plus - cdf_min).clamp_min(1e-12).log();
    let upper = log_delta.mask_where(x.clone().greater_elem(0.999), log_one_minus_cdf_min);
    upper.mask_where(x.lower_elem(-0.999), log_cdf_plus)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_schedule_endpoints() {
        let s = DdpmSchedule::linear(1000);
        assert_eq!(s.betas[0], 1e-4);
        assert_eq!(s.betas[999], 0.02);
        assert_eq!(s.alphas_cumprod_prev[0], 1.0);
        assert_eq!(s.posterior_log_variance_clipped[0], s.posterior_variance[1].ln());
    }
}
