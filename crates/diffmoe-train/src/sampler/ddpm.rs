//! Respaced DDPM sampling (official `p_sample_loop_progressive` and
//! `ddim_sample_loop_progressive` of `diffusion/gaussian_diffusion.py`, over
//! the `SpacedDiffusion` of `diffusion/respace.py`, as
//! `sample_ddp_feature.py` drives them).
//!
//! - Respacing keeps the steps of [`space_timesteps`]; the betas are
//!   recomputed from the kept `alphas_cumprod`, the loop runs over the
//!   respaced indices `N-1, ..., 0`, and the network receives the ORIGINAL
//!   step (`timestep_map`, no rescaling).
//! - The network predicts `eps` and, with a learned sigma, the variance
//!   interpolation `v` (learned range). `x_0 = sqrt(1/acp) x_t - sqrt(1/acp-1) eps`,
//!   optionally clipped to `[-1, 1]` (the official sampler script does not clip).
//! - Ancestral steps add `exp(log_var / 2) * noise` except at index 0; DDIM
//!   steps follow DDIM Eq. 12 with `eta` (0 is deterministic). Both draw a
//!   noise tensor at every step, index 0 and `eta = 0` included, as the
//!   official `randn_like` calls do, so a seeded stream stays aligned.
//! - Guidance uses the batched `forward_with_cfg` (the official script
//!   doubles the noise, `cat([z, z])`, and the labels, `cat([y, y_null])`,
//!   and keeps the first half of the samples at the end).

use std::num::ParseIntError;

use burn::tensor::{backend::Backend, Int, Tensor};

use diffmoe_model::CfgChannels;

use super::{Denoiser, ModelCall, NoiseSource, Record};
use crate::ddpm::DdpmSchedule;

/// Why a respacing string was rejected.
#[derive(Debug, thiserror::Error)]
pub enum RespacingError {
    /// A section is not an integer.
    #[error("timestep respacing `{spec}`: `{part}` is not a step count")]
    BadCount {
        /// The respacing string.
        spec: String,
        /// The offending section.
        part: String,
        /// The cause.
        #[source]
        source: ParseIntError,
    },
    /// A section asks for more steps than it spans.
    #[error("timestep respacing `{spec}`: cannot divide a section of {size} steps into {count}")]
    SectionTooSmall {
        /// The respacing string.
        spec: String,
        /// Steps in the section.
        size: usize,
        /// Steps asked for.
        count: usize,
    },
    /// `ddimN` with no integer stride giving exactly `N` steps.
    #[error("timestep respacing `{spec}`: no integer stride takes exactly {count} of {steps} steps")]
    NoDdimStride {
        /// The respacing string.
        spec: String,
        /// Steps asked for.
        count: usize,
        /// Steps of the original process.
        steps: usize,
    },
    /// The respacing keeps no step at all.
    #[error("timestep respacing `{spec}` keeps no step")]
    Empty {
        /// The respacing string.
        spec: String,
    },
}

/// The steps of the original process a respaced diffusion keeps (official
/// `space_timesteps`), in increasing order. `spec` is either comma-separated
/// step counts, one per equal section of the process (`"10"`, `"10,15,20"`),
/// or `"ddimN"` for the fixed integer stride of the DDIM paper.
///
/// Within a section of `size` steps, `count` steps are taken at
/// `round(k * (size - 1) / (count - 1))`, where the position accumulates by
/// repeated addition and `round` is Python's (ties to even): `"10"` of 1000
/// gives `[0, 111, 222, ..., 888, 999]`.
///
/// # Errors
/// If `spec` is not of that form or asks for more steps than a section has.
pub fn space_timesteps(num_timesteps: usize, spec: &str) -> Result<Vec<usize>, RespacingError> {
    let bad_count =
        |part: &str, source| RespacingError::BadCount { spec: spec.to_string(), part: part.to_string(), source };
    if let Some(count) = spec.strip_prefix("ddim") {
        let count: usize = count.trim().parse().map_err(|e| bad_count(count, e))?;
        return (1..num_timesteps)
            .find(|stride| num_timesteps.div_ceil(*stride) == count)
            .map(|stride| (0..num_timesteps).step_by(stride).collect())
            .ok_or(RespacingError::NoDdimStride { spec: spec.to_string(), count, steps: num_timesteps });
    }
    let counts: Vec<usize> =
        spec.split(',').map(|part| part.trim().parse().map_err(|e| bad_count(part, e))).collect::<Result<_, _>>()?;
    let size_per = num_timesteps / counts.len();
    let extra = num_timesteps % counts.len();
    let mut start = 0;
    let mut steps = Vec::new();
    for (i, &count) in counts.iter().enumerate() {
        let size = size_per + usize::from(i < extra);
        if size < count {
            return Err(RespacingError::SectionTooSmall { spec: spec.to_string(), size, count });
        }
        let stride = if count <= 1 { 1.0 } else { (size - 1) as f64 / (count - 1) as f64 };
        let mut position = 0.0f64;
        for _ in 0..count {
            steps.push(start + position.round_ties_even() as usize);
            position += stride;
        }
        start += size;
    }
    // The official function returns a set.
    steps.sort_unstable();
    steps.dedup();
    if steps.is_empty() {
        return Err(RespacingError::Empty { spec: spec.to_string() });
    }
    Ok(steps)
}

/// The reverse step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DdpmMethod {
    /// Ancestral sampling (official `p_sample`): the posterior mean plus
    /// `exp(log_var / 2) * noise`, no noise at index 0.
    Ancestral,
    /// DDIM (official `ddim_sample`, DDIM Eq. 12).
    Ddim {
        /// Stochasticity: 0 is the deterministic DDIM, 1 has the variance of
        /// the ancestral sampler with the fixed-small variance.
        eta: f64,
    },
}

/// Whether the `x_0` prediction is clipped before the posterior is formed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ClipDenoised {
    /// No clipping: what the official `sample_ddp_feature.py` asks for
    /// (latents are not confined to `[-1, 1]`).
    #[default]
    Off,
    /// Clamp to `[-1, 1]`: the default of the official loops (pixels).
    UnitRange,
}

/// How the variance of each reverse step is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ModelVariance {
    /// The network's second channel half interpolates the log-variance
    /// between the posterior's and `beta_t` (`learn_sigma`, the official
    /// default).
    #[default]
    LearnedRange,
    /// `beta_t` (posterior variance at step 0), what `create_diffusion`
    /// picks for a model without a learned sigma.
    FixedLarge,
}

/// Classifier-free guidance of the DDPM sampler.
#[derive(Debug, Clone)]
pub enum DdpmGuidance<B: Backend> {
    /// The conditional prediction alone.
    Unguided,
    /// The batched official `forward_with_cfg` on the doubled batch.
    Cfg {
        /// The guidance scale.
        scale: f64,
        /// The guided channels: the official sampler guides
        /// [`CfgChannels::First`]`(3)` (a DiT legacy quirk).
        channels: CfgChannels,
        /// `[batch]`: the labels of the unconditional half, normally all
        /// `num_classes` (the null label).
        null_labels: Tensor<B, 1, Int>,
    },
}

/// One reverse step as the sampler took it.
#[derive(Debug, Clone)]
pub struct DdpmStep<B: Backend> {
    /// The network call (`t` is the original step).
    pub call: ModelCall<B>,
    /// `[batch, C, H, W]`: the sample after the step (official `out["sample"]`).
    pub sample: Tensor<B, 4>,
    /// `[batch, C, H, W]`: the (clipped) `x_0` prediction (`out["pred_xstart"]`).
    pub pred_xstart: Tensor<B, 4>,
}

/// The result of a DDPM sampling run.
#[derive(Debug, Clone)]
pub struct DdpmSample<B: Backend> {
    /// `[batch, C, H, W]`: the final sample (with guidance, the conditional
    /// half of the doubled batch, as the official script keeps it).
    pub sample: Tensor<B, 4>,
    /// Every step in order, when [`Record::Trajectory`] was asked for; with
    /// guidance these hold the whole doubled batch. Empty otherwise.
    pub steps: Vec<DdpmStep<B>>,
}

/// A DDPM sampler over a respaced schedule.
#[derive(Debug, Clone)]
pub struct DdpmSampler {
    schedule: DdpmSchedule,
    timestep_map: Vec<usize>,
    method: DdpmMethod,
    clip: ClipDenoised,
    variance: ModelVariance,
}

impl DdpmSampler {
    /// A sampler over `base` respaced by `respacing` ([`space_timesteps`];
    /// an empty string keeps every step, as `create_diffusion("")` does),
    /// without clipping and with a learned-range variance.
    ///
    /// # Errors
    /// If `respacing` is malformed.
    pub fn new(base: &DdpmSchedule, respacing: &str, method: DdpmMethod) -> Result<Self, RespacingError> {
        let timestep_map = if respacing.trim().is_empty() {
            (0..base.steps()).collect()
        } else {
            space_timesteps(base.steps(), respacing)?
        };
        Ok(Self {
            schedule: base.respaced(&timestep_map),
            timestep_map,
            method,
            clip: ClipDenoised::default(),
            variance: ModelVariance::default(),
        })
    }

    /// The same sampler with another clipping of `x_0`.
    pub fn with_clip(self, clip: ClipDenoised) -> Self {
        Self { clip, ..self }
    }

    /// The same sampler with another variance rule.
    pub fn with_variance(self, variance: ModelVariance) -> Self {
        Self { variance, ..self }
    }

    /// The respaced schedule.
    pub fn schedule(&self) -> &DdpmSchedule {
        &self.schedule
    }

    /// The original step of each respaced index.
    pub fn timestep_map(&self) -> &[usize] {
        &self.timestep_map
    }

    /// Number of reverse steps (= model calls).
    pub fn steps(&self) -> usize {
        self.timestep_map.len()
    }

    /// How much the step at the respaced `index` moves its sample per unit
    /// of its (clipped) `x_0` prediction: `coef1` of the posterior mean for
    /// ancestral steps; for DDIM, `sqrt(acp_prev) - sqrt(1 - acp_prev -
    /// sigma^2) / sqrt(1 / acp - 1)`, since the noise it re-derives from
    /// `x_0` carries `x_0` too. An error of `x_0` reaches the sample times
    /// this (a function of the schedule alone, like the step's other
    /// coefficients).
    ///
    /// # Panics
    /// If `index` is outside the schedule.
    pub fn xstart_coefficient(&self, index: usize) -> f64 {
        let s = &self.schedule;
        match self.method {
            DdpmMethod::Ancestral => s.posterior_mean_coef1[index],
            DdpmMethod::Ddim { eta } => {
                let (acp, prev) = (s.alphas_cumprod[index], s.alphas_cumprod_prev[index]);
                let sigma = eta * ((1.0 - prev) / (1.0 - acp)).sqrt() * (1.0 - acp / prev).sqrt();
                prev.sqrt() - (1.0 - prev - sigma * sigma).sqrt() / (1.0 / acp - 1.0).sqrt()
            }
        }
    }

    /// Runs the reverse process from `x_t` at the last respaced index down to
    /// index 0, drawing one noise tensor per step from `noise`.
    ///
    /// # Shapes
    /// - `x_t`, the initial noise: `[batch, C, H, W]`; `y` and the null labels: `[batch]`
    /// - the noise source is asked for `[batch, C, H, W]`, or `[2 batch, C, H, W]` with guidance
    /// - returns a `[batch, C, H, W]` sample
    pub fn sample<B: Backend>(
        &self,
        denoiser: &impl Denoiser<B>,
        x_t: Tensor<B, 4>,
        y: Tensor<B, 1, Int>,
        guidance: &DdpmGuidance<B>,
        noise: &mut impl NoiseSource<B>,
        record: Record,
    ) -> DdpmSample<B> {
        let [batch, ..] = x_t.dims();
        let (mut x, y) = match guidance {
            DdpmGuidance::Unguided => (x_t, y),
            DdpmGuidance::Cfg { null_labels, .. } => {
                (Tensor::cat(vec![x_t.clone(), x_t], 0), Tensor::cat(vec![y, null_labels.clone()], 0))
                // [2n, ...]
            }
        };
        let mut steps = Vec::new();
        for index in (0..self.steps()).rev() {
            let step = self.step(denoiser, x, y.clone(), index, guidance, noise);
            x = step.sample.clone();
            if record == Record::Trajectory {
                steps.push(step);
            }
        }
        DdpmSample { sample: x.narrow(0, 0, batch), steps }
    }

    /// One reverse step at the respaced `index` (`x` at that index to the
    /// next one down). With guidance, `x` and `y` are the doubled batch.
    ///
    /// # Shapes
    /// - `x`: `[batch, C, H, W]`, `y`: `[batch]` -> samples `[batch, C, H, W]`
    ///
    /// # Panics
    /// If `index` is outside the schedule, or the network's output channels
    /// do not fit the variance rule (`2 C` for a learned range).
    pub fn step<B: Backend>(
        &self,
        denoiser: &impl Denoiser<B>,
        x: Tensor<B, 4>,
        y: Tensor<B, 1, Int>,
        index: usize,
        guidance: &DdpmGuidance<B>,
        noise: &mut impl NoiseSource<B>,
    ) -> DdpmStep<B> {
        let s = &self.schedule;
        let dims @ [batch, channels, ..] = x.dims();
        let device = x.device();
        let t = vec![index; batch];
        // The network sees the original step, as a float (official `timestep_map[t]`).
        let t_model = Tensor::<B, 1>::full([batch], self.timestep_map[index] as f64, &device); // [batch]
        let out = match guidance {
            DdpmGuidance::Unguided => denoiser.predict(x.clone(), t_model.clone(), y.clone()),
            DdpmGuidance::Cfg { scale, channels, .. } => {
                denoiser.predict_with_cfg(x.clone(), t_model.clone(), y.clone(), *scale, *channels)
            }
        }; // [batch, C_out, H, W]
        let out_channels = out.dims()[1];
        let eps = out.clone().narrow(1, 0, channels); // [batch, C, H, W]
        let log_variance = match self.variance {
            ModelVariance::LearnedRange => {
                assert_eq!(out_channels, 2 * channels, "a learned-range variance needs 2 C output channels");
                s.learned_range_log_variance(out.clone().narrow(1, channels, channels), &t)
            }
            ModelVariance::FixedLarge => s.fixed_large_log_variance::<B>(&t, &device),
        };
        let pred_xstart = s.predict_xstart_from_eps(x.clone(), &t, eps);
        let pred_xstart = match self.clip {
            ClipDenoised::Off => pred_xstart,
            ClipDenoised::UnitRange => pred_xstart.clamp(-1.0, 1.0),
        };
        let noise = noise.next_noise(dims, &device);
        let sample = match self.method {
            DdpmMethod::Ancestral => {
                let mean = s.q_posterior_mean(pred_xstart.clone(), x.clone(), &t);
                if index == 0 {
                    mean
                } else {
                    mean + log_variance.mul_scalar(0.5).exp() * noise
                }
            }
            DdpmMethod::Ddim { eta } => {
                // The noise the (clipped) x_0 implies, then DDIM Eq. 12, in f32 like the official tensors.
                let eps = s.predict_eps_from_xstart(x.clone(), &t, pred_xstart.clone());
                let alpha_bar = s.extract::<B>(&t, |i| s.alphas_cumprod[i], &device); // [batch, 1, 1, 1]
                let alpha_bar_prev = s.extract::<B>(&t, |i| s.alphas_cumprod_prev[i], &device);
                let sigma =
                    ((alpha_bar_prev.clone().neg() + 1.0) / (alpha_bar.clone().neg() + 1.0)).sqrt().mul_scalar(eta)
                        * (alpha_bar / alpha_bar_prev.clone()).neg().add_scalar(1.0).sqrt();
                let mean = pred_xstart.clone() * alpha_bar_prev.clone().sqrt()
                    + (alpha_bar_prev.neg() + 1.0 - sigma.clone().powi_scalar(2)).sqrt() * eps;
                if index == 0 {
                    mean
                } else {
                    mean + sigma * noise
                }
            }
        };
        DdpmStep { call: ModelCall { x, t: t_model, y, out }, sample, pred_xstart }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ddpm::DDPM_STEPS;
    use crate::sampler::{GivenNoise, SeededNoise};
    use burn::backend::Flex;
    use burn::tensor::TensorData;

    type B = Flex;

    #[test]
    fn respacing_matches_the_official_examples() {
        let ten = space_timesteps(1000, "10").unwrap();
        assert_eq!(ten, vec![0, 111, 222, 333, 444, 555, 666, 777, 888, 999]);
        let eight = space_timesteps(1000, "8").unwrap();
        assert_eq!(eight, vec![0, 143, 285, 428, 571, 714, 856, 999]);
        assert_eq!(space_timesteps(1000, "1000").unwrap(), (0..1000).collect::<Vec<_>>());
        assert_eq!(space_timesteps(1000, "1").unwrap(), vec![0]);
        // Python rounds half to even: 2.5 -> 2 (cur = 0, 2.5, 5, 7.5, 10 over 11 steps).
        assert_eq!(space_timesteps(11, "5").unwrap(), vec![0, 2, 5, 8, 10]);
        // Sections: 300 steps into [10, 15, 20] (the official docstring's example).
        let sections = space_timesteps(300, "10,15,20").unwrap();
        assert_eq!(sections.len(), 45);
        assert_eq!((sections[0], sections[9], sections[10], sections[44]), (0, 99, 100, 299));
        assert_eq!(space_timesteps(1000, "ddim10").unwrap(), (0..1000).step_by(100).collect::<Vec<_>>());
        assert_eq!(space_timesteps(1000, "ddim25").unwrap(), (0..1000).step_by(40).collect::<Vec<_>>());
    }

    #[test]
    fn bad_respacings_are_errors() {
        assert!(matches!(space_timesteps(1000, "ten"), Err(RespacingError::BadCount { .. })));
        assert!(matches!(space_timesteps(10, "11"), Err(RespacingError::SectionTooSmall { .. })));
        assert!(matches!(space_timesteps(1000, "ddim999"), Err(RespacingError::NoDdimStride { .. })));
        assert!(matches!(space_timesteps(1000, "0"), Err(RespacingError::Empty { .. })));
    }

    #[test]
    fn respaced_schedule_keeps_the_original_alphas_cumprod() {
        let base = DdpmSchedule::linear(DDPM_STEPS);
        let sampler = DdpmSampler::new(&base, "8", DdpmMethod::Ancestral).unwrap();
        assert_eq!(sampler.steps(), 8);
        for (i, &orig) in sampler.timestep_map().iter().enumerate() {
            let rel = (sampler.schedule().alphas_cumprod[i] / base.alphas_cumprod[orig] - 1.0).abs();
            assert!(rel < 1e-12, "step {orig}: {rel}");
        }
        assert!((sampler.schedule().betas[0] - base.betas[0]).abs() < 1e-15);
        let full = DdpmSampler::new(&base, "", DdpmMethod::Ancestral).unwrap();
        assert_eq!(full.steps(), DDPM_STEPS);
        assert!(full.schedule().betas.iter().zip(&base.betas).all(|(a, b)| (a - b).abs() < 1e-15));
    }

    /// The exact noise predictor of a data distribution concentrated at 0:
    /// `x_t = sqrt(1 - acp_t) eps`, plus `offset` everywhere. It records the
    /// steps it is called with.
    struct Origin {
        schedule: DdpmSchedule,
        offset: f32,
        calls: std::cell::RefCell<Vec<f32>>,
    }

    impl Origin {
        fn new(schedule: &DdpmSchedule) -> Self {
            Self { schedule: schedule.clone(), offset: 0.0, calls: Default::default() }
        }
    }

    impl Denoiser<B> for Origin {
        fn predict(&self, x: Tensor<B, 4>, t: Tensor<B, 1>, _y: Tensor<B, 1, Int>) -> Tensor<B, 4> {
            let step = t.into_data().to_vec::<f32>().unwrap()[0];
            self.calls.borrow_mut().push(step);
            let scale = (1.0 - self.schedule.alphas_cumprod[step as usize]).sqrt();
            let eps = x.clone().div_scalar(scale).add_scalar(self.offset);
            // Variance channel 1: the largest variance (beta_t).
            Tensor::cat(vec![eps, x.ones_like()], 1)
        }

        fn predict_with_cfg(
            &self,
            x: Tensor<B, 4>,
            t: Tensor<B, 1>,
            y: Tensor<B, 1, Int>,
            _scale: f64,
            _channels: CfgChannels,
        ) -> Tensor<B, 4> {
            let [batch, ..] = x.dims();
            let half = x.narrow(0, 0, batch / 2);
            self.predict(Tensor::cat(vec![half.clone(), half], 0), t, y)
        }
    }

    fn start() -> Tensor<B, 4> {
        let values: Vec<f32> = (0..2 * 2 * 2 * 2).map(|i| ((i * 5 % 7) as f32 - 3.0) / 2.0).collect();
        Tensor::from_data(TensorData::new(values, [2, 2, 2, 2]), &Default::default())
    }

    fn labels() -> Tensor<B, 1, Int> {
        Tensor::from_data(TensorData::new(vec![1i64, 2], [2]), &Default::default())
    }

    fn max_abs(a: Tensor<B, 4>) -> f32 {
        a.abs().max().into_scalar()
    }

    #[test]
    fn ddim_recovers_a_point_mass_and_passes_original_steps() {
        let base = DdpmSchedule::linear(DDPM_STEPS);
        let model = Origin::new(&base);
        let sampler = DdpmSampler::new(&base, "10", DdpmMethod::Ddim { eta: 0.0 }).unwrap();
        let run = sampler.sample(
            &model,
            start(),
            labels(),
            &DdpmGuidance::Unguided,
            &mut SeededNoise::new(3),
            Record::Trajectory,
        );
        assert!(max_abs(run.sample) < 1e-4);
        assert_eq!(*model.calls.borrow(), vec![999.0, 888.0, 777.0, 666.0, 555.0, 444.0, 333.0, 222.0, 111.0, 0.0]);
        assert_eq!(run.steps.len(), 10);
        assert!(run.steps.iter().all(|s| max_abs(s.pred_xstart.clone()) < 1e-3));
    }

    #[test]
    fn ancestral_adds_no_noise_at_the_last_step_and_eta_zero_ignores_noise() {
        let base = DdpmSchedule::linear(DDPM_STEPS);
        let model = Origin::new(&base);
        let huge = |steps: usize, batch: usize| {
            GivenNoise::<B>::new(vec![Tensor::ones([batch, 2, 2, 2], &Default::default()).mul_scalar(1e3); steps])
        };
        let sampler = DdpmSampler::new(&base, "4", DdpmMethod::Ancestral).unwrap();
        let x = start();
        let mut noise = huge(1, 2);
        let step = sampler.step(&model, x.clone(), labels(), 0, &DdpmGuidance::Unguided, &mut noise);
        assert_eq!(noise.remaining(), 0, "a noise tensor is drawn even when unused");
        let mean = sampler.schedule().q_posterior_mean(step.pred_xstart.clone(), x.clone(), &[0, 0]);
        assert_eq!(max_abs(step.sample.clone() - mean), 0.0);
        // At a later index the ancestral step does add noise.
        let noisy = sampler.step(&model, x.clone(), labels(), 2, &DdpmGuidance::Unguided, &mut huge(1, 2));
        assert!(max_abs(noisy.sample) > 1.0);
        // DDIM with eta = 0 draws noise every step but never uses it.
        let ddim = DdpmSampler::new(&base, "4", DdpmMethod::Ddim { eta: 0.0 }).unwrap();
        let mut noise = huge(4, 2);
        let run = ddim.sample(&model, x.clone(), labels(), &DdpmGuidance::Unguided, &mut noise, Record::FinalOnly);
        assert_eq!(noise.remaining(), 0);
        assert!(max_abs(run.sample) < 1e-4);
        assert!(run.steps.is_empty());
    }

    #[test]
    fn guidance_doubles_the_batch_and_keeps_the_conditional_half() {
        let base = DdpmSchedule::linear(DDPM_STEPS);
        let model = Origin::new(&base);
        let sampler = DdpmSampler::new(&base, "5", DdpmMethod::Ancestral).unwrap().with_clip(ClipDenoised::UnitRange);
        let null_labels = Tensor::from_data(TensorData::new(vec![10i64, 10], [2]), &Default::default());
        let guidance = DdpmGuidance::Cfg { scale: 4.0, channels: CfgChannels::First(3), null_labels };
        let mut noise = SeededNoise::new(7);
        let run = sampler.sample(&model, start(), labels(), &guidance, &mut noise, Record::Trajectory);
        assert_eq!(run.sample.dims(), [2, 2, 2, 2]);
        assert_eq!(run.steps.len(), 5);
        let first = &run.steps[0];
        assert_eq!(first.call.x.dims(), [4, 2, 2, 2]);
        assert_eq!(first.call.y.clone().into_data().convert::<i64>().to_vec::<i64>().unwrap(), vec![1, 2, 10, 10]);
        assert!(run.steps.iter().all(|s| max_abs(s.pred_xstart.clone()) <= 1.0));
        let last = run.steps.last().unwrap().sample.clone();
        assert_eq!(max_abs(last.narrow(0, 0, 2) - run.sample), 0.0);
    }

    #[test]
    fn an_error_of_x0_reaches_the_sample_times_the_xstart_coefficient() {
        let base = DdpmSchedule::linear(DDPM_STEPS);
        for method in [DdpmMethod::Ancestral, DdpmMethod::Ddim { eta: 0.0 }, DdpmMethod::Ddim { eta: 0.5 }] {
            let sampler = DdpmSampler::new(&base, "3,2", method).unwrap();
            for index in 0..sampler.steps() {
                // Shifting the predicted noise by `d` shifts `x_0` by `-d sqrt(1 / acp - 1)`.
                let step = |offset: f32| {
                    let mut noise = GivenNoise::<B>::new(vec![Tensor::ones([2, 2, 2, 2], &Default::default())]);
                    let model = Origin { offset, ..Origin::new(&base) };
                    sampler.step(&model, start(), labels(), index, &DdpmGuidance::Unguided, &mut noise)
                };
                let (a, b) = (step(0.25), step(0.5));
                let x0_shift = (b.pred_xstart - a.pred_xstart).mean().into_scalar() as f64;
                let sample_shift: Vec<f32> = (b.sample - a.sample).into_data().to_vec().unwrap();
                let acp = sampler.schedule().alphas_cumprod[index];
                assert!((x0_shift + 0.25 * (1.0 / acp - 1.0).sqrt()).abs() < 1e-3 * x0_shift.abs().max(1.0));
                let expected = sampler.xstart_coefficient(index) * x0_shift;
                for v in sample_shift {
                    assert!(
                        (v as f64 - expected).abs() <= 1e-4 * x0_shift.abs().max(1.0),
                        "{method:?} index {index}: {v} against {expected}"
                    );
                }
            }
        }
    }

    #[test]
    fn seeded_noise_is_reproducible() {
        let device = Default::default();
        let a = NoiseSource::<B>::next_noise(&mut SeededNoise::new(11), [2, 3, 4, 4], &device);
        let b = NoiseSource::<B>::next_noise(&mut SeededNoise::new(11), [2, 3, 4, 4], &device);
        assert_eq!(max_abs(a.clone() - b), 0.0);
        let mean = a.clone().mean().into_scalar();
        assert!(mean.abs() < 0.5 && max_abs(a) > 0.5);
    }
}
