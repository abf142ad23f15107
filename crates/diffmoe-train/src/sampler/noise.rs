//! Where the per-step noise of the DDPM samplers comes from. The official
//! `p_sample` and `ddim_sample` call `torch.randn_like(x)` once per step
//! (`diffusion/gaussian_diffusion.py`); the fixtures replace that call by
//! fixed tensors, which [`GivenNoise`] feeds back, while [`SeededNoise`]
//! draws reproducible noise on the host, independent of the backend, and
//! [`PerSampleNoise`] gives every sample a generator of its own, so that a
//! sample's noise does not depend on the batch it is drawn in.

use std::collections::VecDeque;
use std::ops::Range;

use burn::tensor::{backend::Backend, Tensor, TensorData};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

use crate::step_rng::{normal, step_rng, Stream};

/// A stream of standard-normal tensors, one per sampling step.
pub trait NoiseSource<B: Backend> {
    /// The noise of the next step.
    ///
    /// # Shapes
    /// - returns `shape` (`[batch, C, H, W]`)
    fn next_noise(&mut self, shape: [usize; 4], device: &B::Device) -> Tensor<B, 4>;
}

/// Noise given in advance, one tensor per step, handed out in order (the
/// parity fixtures' patched `randn_like`).
#[derive(Debug, Clone)]
pub struct GivenNoise<B: Backend> {
    steps: VecDeque<Tensor<B, 4>>,
}

impl<B: Backend> GivenNoise<B> {
    /// The per-step tensors in step order.
    pub fn new(steps: Vec<Tensor<B, 4>>) -> Self {
        Self { steps: steps.into() }
    }

    /// The steps of a stacked tensor.
    ///
    /// # Shapes
    /// - `stacked`: `[steps, batch, C, H, W]`
    pub fn from_stacked(stacked: Tensor<B, 5>) -> Self {
        let [steps, ..] = stacked.dims();
        Self::new((0..steps).map(|i| stacked.clone().narrow(0, i, 1).squeeze_dim::<4>(0)).collect())
    }

    /// Steps not handed out yet.
    pub fn remaining(&self) -> usize {
        self.steps.len()
    }
}

impl<B: Backend> NoiseSource<B> for GivenNoise<B> {
    /// # Panics
    /// If the steps are used up, or the next one does not have `shape`:
    /// the caller gave noise for another sampler.
    fn next_noise(&mut self, shape: [usize; 4], _device: &B::Device) -> Tensor<B, 4> {
        let noise = self.steps.pop_front().expect("the given noise has fewer steps than the sampler");
        assert_eq!(noise.dims(), shape, "the given noise of this step has the wrong shape");
        noise
    }
}

/// Standard-normal noise from a seeded ChaCha8 generator on the host: the
/// same seed gives the same samples on every backend.
#[derive(Debug, Clone)]
pub struct SeededNoise {
    rng: ChaCha8Rng,
}

impl SeededNoise {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self { rng: ChaCha8Rng::seed_from_u64(seed) }
    }
}

impl<B: Backend> NoiseSource<B> for SeededNoise {
    fn next_noise(&mut self, shape: [usize; 4], device: &B::Device) -> Tensor<B, 4> {
        let len = shape.iter().product();
        let values: Vec<f32> = (0..len).map(|_| StandardNormal.sample(&mut self.rng)).collect();
        Tensor::from_data(TensorData::new(values, shape), device)
    }
}

/// One standard-normal generator per sample, keyed by `(seed, sample
/// index)`: the initial noise of sample `i` and the noise of each of its
/// steps are the same whatever batch it is sampled in, so a run in batches
/// of any size draws the same numbers.
#[derive(Debug, Clone)]
pub struct PerSampleNoise {
    rngs: Vec<ChaCha8Rng>,
}

impl PerSampleNoise {
    /// The generators of the samples `samples` of a run seeded with `seed`.
    pub fn new(seed: u64, samples: Range<u64>) -> Self {
        Self { rngs: samples.map(|i| step_rng(seed, i, 0, Stream::Sample)).collect() }
    }
}

impl<B: Backend> NoiseSource<B> for PerSampleNoise {
    /// Row `i` is the next draw of sample `i`'s generator. A doubled batch
    /// (the DDPM sampler's guided `[cond; uncond]` batch) gets the same rows
    /// twice: the official `forward_with_cfg` evaluates the first half only.
    ///
    /// # Panics
    /// If `shape[0]` is neither the number of samples nor twice it.
    fn next_noise(&mut self, shape: [usize; 4], device: &B::Device) -> Tensor<B, 4> {
        let [rows, c, h, w] = shape;
        let n = self.rngs.len();
        assert!(rows == n || rows == 2 * n, "noise for {rows} rows asked of {n} sample generators");
        let per = c * h * w;
        let mut values: Vec<f32> = self.rngs.iter_mut().flat_map(|rng| normal(rng, per)).collect();
        if rows == 2 * n {
            values.extend_from_within(..);
        }
        Tensor::from_data(TensorData::new(values, shape), device)
    }
}
