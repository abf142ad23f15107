//! The sample grid a run writes every `sample_every` steps and at the end:
//! the EMA model, fixed noise (`train.grid.seed`) and fixed labels (one
//! column per class, `per_class` rows), so that grids of a run are directly
//! comparable. Flow runs use the official Euler sampler, DDPM runs respaced
//! ancestral sampling (through `crate::generate`, sample `i` from the noise
//! stream `(train.grid.seed, i)`). MoE layers route as in training (DiffMoE's "static
//! top-K" of the paper): its cost is fixed, while threshold routing early in a
//! run can send every token to every expert. `diffmoe sample` offers the
//! dynamic routing.

use burn::tensor::backend::Backend;

use diffmoe_core::Routing;
use diffmoe_model::{CfgChannels, DiT, Objective, RunConfig};

use crate::ddpm::DDPM_STEPS;
use crate::generate::{Generator, SampleError, SampleSettings, SamplerChoice};
use crate::sampler::ClipDenoised;

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

/// Samples the grid of `model`; `clip` says whether DDPM `x_0` predictions
/// are clamped to `[-1, 1]` (pixels) or not (latents).
///
/// # Errors
/// If the grid settings do not fit the model (a class out of range).
pub fn grid_images<B: Backend>(
    model: &DiT<B>,
    config: &RunConfig,
    clip: ClipDenoised,
) -> Result<GridImages, SampleError> {
    let grid = &config.train.grid;
    let m = &config.model;
    let classes = grid_classes(config);
    let columns = classes.len();
    let labels: Vec<usize> = (0..columns * grid.per_class).map(|i| classes[i % columns]).collect();
    let sampler = match config.objective {
        Objective::Flow => SamplerChoice::Euler { steps: grid.steps },
        Objective::Ddpm => SamplerChoice::Ddpm { steps: grid.steps.min(DDPM_STEPS) },
    };
    let settings = SampleSettings {
        sampler,
        // A model trained without label dropout has no null label to guide with.
        cfg_scale: if m.class_dropout_prob > 0.0 { grid.cfg_scale } else { 1.0 },
        cfg_channels: CfgChannels::All,
        routing: Routing::Static,
        seed: grid.seed,
        clip,
    };
    let sample = Generator::new(model, config.objective, settings)?.generate(&labels, 0, None)?;
    let shape = sample.dims();
    let images = sample.into_data().convert::<f32>().to_vec().expect("f32 samples");
    Ok(GridImages { images, shape, columns })
}
