//! The training loop's randomness (noise, times, label dropout, grid noise),
//! drawn on the host from ChaCha8 generators keyed by
//! `(seed, micro-step, replica, stream)`, and the sampling noise of
//! `diffmoe sample`, keyed by `(seed, sample index)`.
//!
//! Keying every draw by the step instead of carrying one generator through
//! the run makes the random state of a checkpoint just its step: a resumed
//! run draws exactly what an uninterrupted one would, on any backend and
//! whatever the loader's thread count. ChaCha's output is specified, so the
//! draws are the same on every platform.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

/// What a generator is for; each purpose gets an independent stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// The diffusion noise (`z0` for flow, `epsilon` for DDPM).
    Noise = 1,
    /// Flow times or DDPM steps.
    Time = 2,
    /// Classifier-free-guidance label dropout.
    LabelDropout = 3,
    /// The initial noise of the sample grids.
    Grid = 4,
    /// The noise of one sample of a sampling run (keyed by the sample index
    /// in place of the step): its initial noise, then each step's.
    Sample = 5,
}

/// The generator of `stream` at `step` on replica `rank`.
pub fn step_rng(seed: u64, step: u64, rank: usize, stream: Stream) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&step.to_le_bytes());
    key[16..24].copy_from_slice(&(rank as u64).to_le_bytes());
    key[24..].copy_from_slice(&(stream as u64).to_le_bytes());
    ChaCha8Rng::from_seed(key)
}

/// `n` standard normal draws.
pub fn normal(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.sample::<f32, _>(StandardNormal)).collect()
}

/// `n` uniform draws in `[0, 1)`.
pub fn uniform(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random::<f32>()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_reproducible_and_distinct() {
        let a = normal(&mut step_rng(7, 3, 0, Stream::Noise), 4);
        assert_eq!(a, normal(&mut step_rng(7, 3, 0, Stream::Noise), 4));
        assert_ne!(a, normal(&mut step_rng(7, 4, 0, Stream::Noise), 4));
        assert_ne!(a, normal(&mut step_rng(7, 3, 1, Stream::Noise), 4));
        assert_ne!(a, normal(&mut step_rng(7, 3, 0, Stream::Time), 4));
        assert!(uniform(&mut step_rng(0, 0, 0, Stream::Time), 100).iter().all(|u| (0.0..1.0).contains(u)));
    }
}
