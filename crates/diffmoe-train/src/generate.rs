//! Generating samples from a trained model for a list of labels, with any
//! sampler, guidance and routing (`diffmoe sample`, and the grids a training
//! run writes).
//!
//! Sample `i` of a run starts from the noise of its own generator, keyed by
//! `(seed, i)` ([`PerSampleNoise`]), which also draws its DDPM step noise.
//! So a run's images do not depend on how it is cut into batches, as long as
//! the network does not couple the samples of a batch: dense, TC and EC
//! models never do, DiffMoE does not under per-token routing, while its
//! static and dynamic routing choose tokens over the whole batch (its global
//! pool) by design.

use burn::tensor::{backend::Backend, Int, Tensor, TensorData};

use diffmoe_core::Routing;
use diffmoe_model::{CfgChannels, DiT, Objective};

use crate::compute::StepAxis;
use crate::ddpm::{DdpmSchedule, DDPM_STEPS};
use crate::sampler::{
    CallObserver, ClipDenoised, DdpmGuidance, DdpmMethod, DdpmSampler, DiTDenoiser, Dopri5Error, Dopri5Sampler,
    FlowGuidance, FlowSampler, FlowSolver, ModelVariance, NoiseSource, PerSampleNoise, Record, RespacingError,
};

/// A sampler and its settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SamplerChoice {
    /// Flow, official Euler steps.
    Euler {
        /// Steps from noise to data.
        steps: usize,
    },
    /// Flow, official Heun steps (two velocity evaluations each).
    Heun {
        /// Steps from noise to data.
        steps: usize,
    },
    /// Flow, the adaptive Dormand-Prince solver.
    Dopri5 {
        /// Absolute tolerance (SiT: 1e-6).
        atol: f64,
        /// Relative tolerance (SiT: 1e-3).
        rtol: f64,
    },
    /// DDPM ancestral sampling over `steps` respaced steps.
    Ddpm {
        /// Respaced steps (`space_timesteps(1000, "steps")`).
        steps: usize,
    },
    /// DDIM over `steps` respaced steps.
    Ddim {
        /// Respaced steps.
        steps: usize,
        /// Stochasticity (0: deterministic).
        eta: f64,
    },
}

impl SamplerChoice {
    /// The objective whose model this sampler integrates.
    pub fn objective(self) -> Objective {
        match self {
            Self::Euler { .. } | Self::Heun { .. } | Self::Dopri5 { .. } => Objective::Flow,
            Self::Ddpm { .. } | Self::Ddim { .. } => Objective::Ddpm,
        }
    }

    /// Its command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Euler { .. } => "euler",
            Self::Heun { .. } => "heun",
            Self::Dopri5 { .. } => "dopri5",
            Self::Ddpm { .. } => "ddpm",
            Self::Ddim { .. } => "ddim",
        }
    }

    /// How the network calls of this sampler group into steps for the
    /// compute statistics; the adaptive solver's times are binned into
    /// `bins` equal intervals.
    pub fn step_axis(self, bins: usize) -> StepAxis {
        match self {
            Self::Euler { .. } | Self::Heun { .. } => StepAxis::Times { descending: false },
            Self::Dopri5 { .. } => StepAxis::Bins(bins.max(1)),
            Self::Ddpm { .. } | Self::Ddim { .. } => StepAxis::Times { descending: true },
        }
    }
}

/// How to sample.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampleSettings {
    /// The sampler.
    pub sampler: SamplerChoice,
    /// Classifier-free guidance scale; 1 samples without guidance.
    pub cfg_scale: f64,
    /// The guided channels ([`CfgChannels::All`] is correct,
    /// [`CfgChannels::First`]`(3)` the official quirk of DDPM sampling).
    pub cfg_channels: CfgChannels,
    /// How the MoE layers route.
    pub routing: Routing,
    /// Seed of the noise.
    pub seed: u64,
    /// Whether DDPM `x_0` predictions are clipped to `[-1, 1]` (pixels) or
    /// not (latents).
    pub clip: ClipDenoised,
}

/// Why sampling could not run.
#[derive(Debug, thiserror::Error)]
pub enum SampleError {
    /// The sampler does not fit the model's objective.
    #[error("the {sampler} sampler needs a {wanted:?} model, but this model was trained with the {objective:?} objective (flow: euler, heun, dopri5; DDPM: ddpm, ddim)")]
    SamplerObjective {
        /// The sampler.
        sampler: &'static str,
        /// The objective it needs.
        wanted: Objective,
        /// The model's.
        objective: Objective,
    },
    /// Guidance was asked of a model without a null label.
    #[error("classifier-free guidance (cfg scale {scale}) needs the null label, but this model was trained without label dropout (model.class_dropout_prob = 0); use cfg scale 1")]
    NoNullLabel {
        /// The scale asked for.
        scale: f64,
    },
    /// A label outside the model's classes.
    #[error("class {label} is out of range: the model has {num_classes} classes (0 to {})", num_classes - 1)]
    Label {
        /// The label.
        label: usize,
        /// Classes of the model.
        num_classes: usize,
    },
    /// A setting outside its range.
    #[error("{setting} = {value}: {reason}")]
    Setting {
        /// The setting.
        setting: &'static str,
        /// Its value.
        value: String,
        /// What is allowed.
        reason: &'static str,
    },
    /// The respacing is invalid.
    #[error(transparent)]
    Respacing(#[from] RespacingError),
    /// The adaptive solver gave up.
    #[error(transparent)]
    Solver(#[from] Dopri5Error),
}

/// A model ready to sample with fixed settings.
#[derive(Debug)]
pub struct Generator<'a, B: Backend> {
    model: &'a DiT<B>,
    settings: SampleSettings,
    ddpm: Option<DdpmSampler>,
}

impl<'a, B: Backend> Generator<'a, B> {
    /// Checks the settings against the model.
    ///
    /// # Errors
    /// If the sampler does not fit the objective, guidance is asked of a
    /// model without a null label, or a setting is out of range.
    pub fn new(model: &'a DiT<B>, objective: Objective, settings: SampleSettings) -> Result<Self, SampleError> {
        let wanted = settings.sampler.objective();
        if wanted != objective {
            return Err(SampleError::SamplerObjective { sampler: settings.sampler.name(), wanted, objective });
        }
        let setting = |setting, value: f64, reason| SampleError::Setting { setting, value: value.to_string(), reason };
        if !settings.cfg_scale.is_finite() {
            return Err(setting("cfg scale", settings.cfg_scale, "must be a finite number"));
        }
        if settings.cfg_scale != 1.0 && model.config.class_dropout_prob <= 0.0 {
            return Err(SampleError::NoNullLabel { scale: settings.cfg_scale });
        }
        if !settings.routing.threshold_offset().is_finite() {
            return Err(setting("threshold offset", settings.routing.threshold_offset(), "must be a finite number"));
        }
        let ddpm = match settings.sampler {
            SamplerChoice::Euler { steps } | SamplerChoice::Heun { steps } if steps == 0 => {
                return Err(setting("steps", 0.0, "at least 1"));
            }
            SamplerChoice::Dopri5 { atol, rtol } => {
                if !(atol > 0.0 && atol.is_finite()) {
                    return Err(setting("atol", atol, "must be a positive number"));
                }
                if !(rtol > 0.0 && rtol.is_finite()) {
                    return Err(setting("rtol", rtol, "must be a positive number"));
                }
                None
            }
            SamplerChoice::Ddpm { steps } | SamplerChoice::Ddim { steps, .. } => {
                if steps == 0 || steps > DDPM_STEPS {
                    return Err(setting("steps", steps as f64, "a DDPM sampler takes 1 to 1000 respaced steps"));
                }
                let method = match settings.sampler {
                    SamplerChoice::Ddim { eta, .. } if !(eta >= 0.0 && eta.is_finite()) => {
                        return Err(setting("eta", eta, "must be a number >= 0"));
                    }
                    SamplerChoice::Ddim { eta, .. } => DdpmMethod::Ddim { eta },
                    _ => DdpmMethod::Ancestral,
                };
                let variance =
                    if model.config.learn_sigma { ModelVariance::LearnedRange } else { ModelVariance::FixedLarge };
                let schedule = DdpmSchedule::linear(DDPM_STEPS);
                Some(
                    DdpmSampler::new(&schedule, &steps.to_string(), method)?
                        .with_clip(settings.clip)
                        .with_variance(variance),
                )
            }
            _ => None,
        };
        Ok(Self { model, settings, ddpm })
    }

    /// The settings.
    pub fn settings(&self) -> &SampleSettings {
        &self.settings
    }

    /// Network calls per batch, where the sampler's step count is fixed:
    /// flow guidance doubles the calls, DDPM guidance doubles the batch.
    pub fn calls_per_batch(&self) -> Option<usize> {
        let guided = self.settings.cfg_scale != 1.0;
        match self.settings.sampler {
            SamplerChoice::Euler { steps } => Some(steps * if guided { 2 } else { 1 }),
            SamplerChoice::Heun { steps } => Some(2 * steps * if guided { 2 } else { 1 }),
            SamplerChoice::Dopri5 { .. } => None,
            SamplerChoice::Ddpm { .. } | SamplerChoice::Ddim { .. } => self.ddpm.as_ref().map(DdpmSampler::steps),
        }
    }

    /// Samples of `labels`, which are samples `first, first + 1, ...` of the
    /// run (their noise streams). Every network call is reported to
    /// `observer`.
    ///
    /// # Shapes
    /// - returns `[labels.len(), in_channels, input_size, input_size]`
    ///
    /// # Errors
    /// If a label is out of range or the adaptive solver gives up.
    pub fn generate(
        &self,
        labels: &[usize],
        first: u64,
        observer: Option<&dyn CallObserver<B>>,
    ) -> Result<Tensor<B, 4>, SampleError> {
        let config = &self.model.config;
        if let Some(&label) = labels.iter().find(|&&l| l >= config.num_classes) {
            return Err(SampleError::Label { label, num_classes: config.num_classes });
        }
        let device = self.model.pos_embed.val().device();
        let n = labels.len();
        let shape = [n, config.in_channels, config.input_size, config.input_size];
        let y_values: Vec<i64> = labels.iter().map(|&l| l as i64).collect();
        let y = Tensor::<B, 1, Int>::from_data(TensorData::new(y_values, [n]), &device);
        let null = Tensor::<B, 1, Int>::full([n], config.num_classes as i64, &device);
        let mut noise = PerSampleNoise::new(self.settings.seed, first..first + n as u64);
        let z = noise.next_noise(shape, &device);
        let mut denoiser = DiTDenoiser::new(self.model, self.settings.routing);
        if let Some(observer) = observer {
            denoiser = denoiser.observed(observer);
        }
        let (scale, channels) = (self.settings.cfg_scale, self.settings.cfg_channels);
        let guided = scale != 1.0;
        let flow_guidance = || {
            if guided {
                FlowGuidance::Cfg { scale, channels, null_labels: null.clone() }
            } else {
                FlowGuidance::Unguided
            }
        };
        let sample = match self.settings.sampler {
            SamplerChoice::Euler { steps } => {
                FlowSampler::new(steps, FlowSolver::Euler).sample(&denoiser, z, y, &flow_guidance(), Record::FinalOnly)
            }
            SamplerChoice::Heun { steps } => {
                FlowSampler::new(steps, FlowSolver::Heun).sample(&denoiser, z, y, &flow_guidance(), Record::FinalOnly)
            }
            SamplerChoice::Dopri5 { atol, rtol } => {
                Dopri5Sampler::new(atol, rtol).sample(&denoiser, z, y, &flow_guidance(), Record::FinalOnly)?
            }
            SamplerChoice::Ddpm { .. } | SamplerChoice::Ddim { .. } => {
                let sampler = self.ddpm.as_ref().expect("DDPM samplers are built in new");
                let guidance = if guided {
                    DdpmGuidance::Cfg { scale, channels, null_labels: null.clone() }
                } else {
                    DdpmGuidance::Unguided
                };
                let run = sampler.sample(&denoiser, z, y, &guidance, &mut noise, Record::FinalOnly);
                return Ok(run.sample);
            }
        };
        Ok(sample.sample)
    }
}

impl<B: Backend> Generator<'_, B> {
    /// Samples `labels` in batches of `batch_size` (sample `i` of the run
    /// has label `labels[i]` and noise stream `i`), handing each batch to
    /// `sink` as host values `[n, C, H, W]` with the index of its first
    /// sample, after the device has finished it.
    ///
    /// # Errors
    /// A sampling error, or the first error of `sink`.
    pub fn generate_batches<E: From<SampleError>>(
        &self,
        labels: &[usize],
        batch_size: usize,
        observer: Option<&dyn CallObserver<B>>,
        mut sink: impl FnMut(usize, Vec<f32>) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut first = 0;
        for batch in labels.chunks(batch_size.max(1)) {
            let samples = self.generate(batch, first as u64, observer)?;
            let values = samples.into_data().convert::<f32>().to_vec::<f32>().expect("f32 samples");
            sink(first, values)?;
            first += batch.len();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::module::Param;
    use diffmoe_model::preset;

    use crate::param_path::{map_named, NamedMapper};
    use crate::step_rng::{normal, step_rng, Stream};

    type B = Flex;

    /// Seeded random weights (the official initialisation zeroes the
    /// output), and DiffMoE thresholds of 0.5, which send about half the
    /// tokens to each expert.
    struct Randomize(u64);

    impl NamedMapper<B> for Randomize {
        fn map<const D: usize>(&mut self, name: String, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            if name.ends_with("ema_decay") || name.ends_with("pos_embed") {
                return param;
            }
            self.0 += 1;
            let threshold = name.ends_with("expert_threshold");
            let key = self.0;
            param.map(|t| {
                let (shape, device) = (t.shape(), t.device());
                let values = if threshold {
                    vec![0.5; shape.num_elements()]
                } else {
                    let values = normal(&mut step_rng(11, key, 0, Stream::Noise), shape.num_elements());
                    values.into_iter().map(|v| 0.2 * v).collect()
                };
                Tensor::from_data(TensorData::new(values, shape), &device)
            })
        }
    }

    fn settings(sampler: SamplerChoice, routing: Routing) -> SampleSettings {
        SampleSettings {
            sampler,
            cfg_scale: 1.5,
            cfg_channels: CfgChannels::All,
            routing,
            seed: 5,
            clip: ClipDenoised::UnitRange,
        }
    }

    /// A tiny DiffMoE with random (not zero) adaLN and final layers, so that
    /// its output depends on the input, and thresholds that split the tokens.
    fn model(name: &str) -> DiT<B> {
        let mut config = preset(name).unwrap().model;
        config.input_size = 8;
        config.hidden_size = 32;
        config.depth = 2;
        config.num_heads = 2;
        map_named(config.init::<B>(&Default::default()), &mut Randomize(0))
    }

    #[test]
    fn samples_do_not_depend_on_the_batch_with_per_token_routing() {
        for (name, sampler) in [
            ("diffmoe-tiny-e8-flow", SamplerChoice::Heun { steps: 3 }),
            ("diffmoe-tiny-e8-flow", SamplerChoice::Dopri5 { atol: 1e-4, rtol: 1e-3 }),
            ("diffmoe-tiny-e8-ddpm", SamplerChoice::Ddpm { steps: 4 }),
            ("diffmoe-tiny-e8-ddpm", SamplerChoice::Ddim { steps: 4, eta: 0.5 }),
        ] {
            let model = model(name);
            let objective = preset(name).unwrap().objective;
            let generator = Generator::new(&model, objective, settings(sampler, Routing::PER_TOKEN)).unwrap();
            // The network's matmuls round differently for other batch sizes
            // (about 1e-7 relative); fixed-step samplers carry that along,
            // while the adaptive solver may then choose slightly different
            // steps, each within its tolerance (rtol 1e-3).
            let tolerance = match sampler {
                SamplerChoice::Dopri5 { rtol, .. } => rtol as f32,
                _ => 1e-5,
            };
            let labels = [3, 1, 4, 1, 0];
            let batch = generator.generate(&labels, 0, None).unwrap();
            let scale: f32 = batch.clone().abs().max().into_scalar();
            let check = |first: usize, n: usize| {
                let part = generator.generate(&labels[first..first + n], first as u64, None).unwrap();
                let diff: f32 = (batch.clone().narrow(0, first, n) - part).abs().max().into_scalar();
                assert!(
                    diff <= tolerance * scale.max(1.0),
                    "{name} {}: samples {first}..{} differ by {diff} in a batch of {n}",
                    sampler.name(),
                    first + n
                );
            };
            check(1, 1);
            check(4, 1);
            check(2, 2);
        }
    }

    #[test]
    fn settings_are_checked_against_the_model() {
        let flow = model("diffmoe-tiny-e8-flow");
        let ddim = SamplerChoice::Ddim { steps: 4, eta: 0.0 };
        let error = Generator::new(&flow, Objective::Flow, settings(ddim, Routing::Static)).unwrap_err();
        assert!(matches!(error, SampleError::SamplerObjective { sampler: "ddim", .. }), "{error}");
        let mut unguided = flow.clone();
        unguided.config.class_dropout_prob = 0.0;
        let euler = SamplerChoice::Euler { steps: 2 };
        let error = Generator::new(&unguided, Objective::Flow, settings(euler, Routing::Static)).unwrap_err();
        assert!(matches!(error, SampleError::NoNullLabel { .. }), "{error}");
        let generator = Generator::new(&flow, Objective::Flow, settings(euler, Routing::Static)).unwrap();
        let error = generator.generate(&[10], 0, None).unwrap_err();
        assert!(error.to_string().contains("class 10 is out of range"), "{error}");
        let zero = SamplerChoice::Euler { steps: 0 };
        assert!(Generator::new(&flow, Objective::Flow, settings(zero, Routing::Static)).is_err());
        let bad = SamplerChoice::Dopri5 { atol: 0.0, rtol: 1e-3 };
        assert!(Generator::new(&flow, Objective::Flow, settings(bad, Routing::Static)).is_err());
    }
}
