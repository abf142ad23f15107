//! The sample grid a run writes every `sample_every` steps and at the end:
//! the EMA model, fixed noise (`train.grid.seed`) and fixed labels (one
//! column per class, `per_class` rows), so that grids of a run are directly
//! comparable. Flow runs use the official Euler sampler, DDPM runs respaced
//! ancestral sampling. MoE layers route as in training (DiffMoE's "static
//! top-K" of the paper): its cost is fixed, while threshold routing early in a
//! run can send every token to every expert. `diffmoe sample` offers the
//! dynamic routing.

use burn::tensor::{backend::Backend, Int, Tensor, TensorData};

use diffmoe_core::Routing;
use diffmoe_model::{CfgChannels, DiT, RunConfig};

use crate::ddpm::DdpmSchedule;
use crate::sampler::{
    ClipDenoised, DdpmGuidance, DdpmMethod, DdpmSampler, DiTDenoiser, FlowGuidance, FlowSampler, FlowSolver,
    ModelVariance, NoiseSource, Record, SeededNoise,
};

/// Generated images laid out for a grid.
#[derive(Debug, Clone)]
pub struct GridImages {
    /// `[n, C, H, W]` row-major: sample `r * columns + c` has label `classes[c]`.
    pub images: Vec<f32>,
    /// `[n, C, H, W]`.
    pub shape: [usize; 4],
    /// Tiles per row (one per class).
    pub columns: usize,
}

/// The labels of the grid: `train.grid.classes`, or the first (up to) 10.
pub fn grid_classes(config: &RunConfig) -> Vec<usize> {
    let classes = &config.train.grid.classes;
    if classes.is_empty() {
        (0..config.model.num_classes.min(10)).collect()
    } else {
        classes.clone()
    }
}

/// Samples the grid of `model`. `ddpm` is the training schedule of a DDPM
/// run (`None` for flow); `clip` says whether `x_0` predictions are clamped
/// to `[-1, 1]` (pixels) or not (latents).
pub fn grid_images<B: Backend>(
    model: &DiT<B>,
    config: &RunConfig,
    ddpm: Option<&DdpmSchedule>,
    clip: ClipDenoised,
    device: &B::Device,
) -> GridImages {
    let grid = &config.train.grid;
    let m = &config.model;
    let classes = grid_classes(config);
    let columns = classes.len();
    let n = columns * grid.per_class;
    let shape = [n, m.in_channels, m.input_size, m.input_size];
    let labels: Vec<i64> = (0..n).map(|i| classes[i % columns] as i64).collect();
    let y = Tensor::<B, 1, Int>::from_data(TensorData::new(labels, [n]), device);
    let null = Tensor::<B, 1, Int>::full([n], m.num_classes as i64, device);
    let mut noise = SeededNoise::new(grid.seed);
    let z = noise.next_noise(shape, device);
    let denoiser = DiTDenoiser::new(model, Routing::Static);
    let guided = grid.cfg_scale != 1.0 && m.class_dropout_prob > 0.0;
    let sample = match ddpm {
        None => {
            let guidance = if guided {
                FlowGuidance::Cfg { scale: grid.cfg_scale, null_labels: null }
            } else {
                FlowGuidance::Unguided
            };
            FlowSampler::new(grid.steps, FlowSolver::Euler).sample(&denoiser, z, y, &guidance, Record::FinalOnly).sample
        }
        Some(schedule) => {
            let guidance = if guided {
                DdpmGuidance::Cfg { scale: grid.cfg_scale, channels: CfgChannels::All, null_labels: null }
            } else {
                DdpmGuidance::Unguided
            };
            let variance = if m.learn_sigma { ModelVariance::LearnedRange } else { ModelVariance::FixedLarge };
            let sampler =
                DdpmSampler::new(schedule, &grid.steps.min(schedule.steps()).to_string(), DdpmMethod::Ancestral)
                    .expect("a positive step count is a valid respacing")
                    .with_clip(clip)
                    .with_variance(variance);
            sampler.sample(&denoiser, z, y, &guidance, &mut noise, Record::FinalOnly).sample
        }
    };
    let images = sample.into_data().convert::<f32>().to_vec().expect("f32 samples");
    GridImages { images, shape, columns }
}
