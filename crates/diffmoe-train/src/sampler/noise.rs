//! Where the per-step noise of the DDPM samplers comes from. The official
//! `p_sample` and `ddim_sample` call `torch.randn_like(x)` once per step
//! (`diffusion/gaussian_diffusion.py`); the fixtures replace that call by
//! fixed tensors, which [`GivenNoise`] feeds back, while [`SeededNoise`]
//! draws reproducible noise on the host, independent of the backend.

use std::collections::VecDeque;

use burn::tensor::{backend::Backend, Tensor, TensorData};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

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
