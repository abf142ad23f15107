//! Samplers of DiffMoE (Shi et al., 2025): the rectified-flow sampler and,
//! for DDPM models, the respaced ancestral and DDIM samplers, each with
//! classifier-free guidance, written once against the small [`Denoiser`]
//! trait so that they know nothing about the network.
//!
//! - `flow.rs` mirrors the official `RectifiedFlow.sample`
//!   (`diffusion/rectified_flow.py`): Euler and Heun from `t = 0` (noise) to
//!   `t = 1` (data), CFG by two separate model calls.
//! - `ddpm.rs` mirrors `p_sample_loop` / `ddim_sample_loop` of
//!   `diffusion/gaussian_diffusion.py` over the respaced schedule of
//!   `diffusion/respace.py`, CFG by the batched `forward_with_cfg` as the
//!   official `sample_ddp_feature.py` prepares it.
//! - `noise.rs`: where the per-step noise of the DDPM samplers comes from
//!   (fixed tensors for parity, or a seeded host generator).
//!
//! Sampling never changes the model: [`DiT::forward`] is pure, and the
//! threshold EMA the official code applies in train mode is the caller's
//! business (it does not affect static routing anyway).

mod ddpm;
mod flow;
mod noise;

pub use ddpm::{
    space_timesteps, ClipDenoised, DdpmGuidance, DdpmMethod, DdpmSample, DdpmSampler, DdpmStep, ModelVariance,
    RespacingError,
};
pub use flow::{FlowGuidance, FlowSample, FlowSampler, FlowSolver};
pub use noise::{GivenNoise, NoiseSource, SeededNoise};

use burn::tensor::{backend::Backend, Int, Tensor};

use diffmoe_core::Routing;
use diffmoe_model::{CfgChannels, DiT};

/// Anything that maps `(x_t, t, y)` to the network output; implemented for
/// [`DiT`] with a chosen routing by [`DiTDenoiser`].
pub trait Denoiser<B: Backend> {
    /// The raw network output (all output channels, learned variance included).
    ///
    /// # Shapes
    /// - `x`: `[batch, C, H, W]`, `t`: `[batch]`, `y`: `[batch]` -> `[batch, C_out, H, W]`
    fn predict(&self, x: Tensor<B, 4>, t: Tensor<B, 1>, y: Tensor<B, 1, Int>) -> Tensor<B, 4>;

    /// Batched classifier-free guidance as the official `forward_with_cfg`
    /// does it: the first half of `x` is evaluated twice (cond labels, then
    /// null labels, in one batch), and the guided channels are copied into
    /// both halves.
    ///
    /// # Shapes
    /// - `x`: `[2n, C, H, W]`, `t`: `[2n]`, `y`: `[2n]` -> `[2n, C_out, H, W]`
    fn predict_with_cfg(
        &self,
        x: Tensor<B, 4>,
        t: Tensor<B, 1>,
        y: Tensor<B, 1, Int>,
        scale: f64,
        channels: CfgChannels,
    ) -> Tensor<B, 4>;
}

/// A [`DiT`] evaluated with one routing mode: [`Routing::Dynamic`] is the
/// official sampler's `model.eval()` (threshold routing for DiffMoE, which is
/// cross-sample: it depends on the whole batch); [`Routing::Static`] is the
/// "global static top-K" of DiffMoE (the official sampler under
/// `model.train()`). The other families route the same way in both.
#[derive(Debug, Clone, Copy)]
pub struct DiTDenoiser<'a, B: Backend> {
    /// The network.
    pub model: &'a DiT<B>,
    /// How its MoE layers route.
    pub routing: Routing,
}

impl<'a, B: Backend> DiTDenoiser<'a, B> {
    /// Wraps a model with a routing mode.
    pub fn new(model: &'a DiT<B>, routing: Routing) -> Self {
        Self { model, routing }
    }
}

impl<B: Backend> Denoiser<B> for DiTDenoiser<'_, B> {
    fn predict(&self, x: Tensor<B, 4>, t: Tensor<B, 1>, y: Tensor<B, 1, Int>) -> Tensor<B, 4> {
        self.model.forward(x, t, y, self.routing).output
    }

    fn predict_with_cfg(
        &self,
        x: Tensor<B, 4>,
        t: Tensor<B, 1>,
        y: Tensor<B, 1, Int>,
        scale: f64,
        channels: CfgChannels,
    ) -> Tensor<B, 4> {
        self.model.forward_with_cfg(x, t, y, scale, channels, self.routing)
    }
}

/// What a sampler keeps besides the final sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Record {
    /// Only the final sample (the normal case: nothing else is kept alive).
    #[default]
    FinalOnly,
    /// Every model call and, for DDPM, every step's sample and `x_0`
    /// prediction (parity checks, visualising a trajectory).
    Trajectory,
}

/// One network evaluation made by a sampler.
#[derive(Debug, Clone)]
pub struct ModelCall<B: Backend> {
    /// `[batch, C, H, W]`: the input.
    pub x: Tensor<B, 4>,
    /// `[batch]`: the time the network received (flow: `t` in `[0, 1]`;
    /// DDPM: the original, un-respaced step).
    pub t: Tensor<B, 1>,
    /// `[batch]`: the labels.
    pub y: Tensor<B, 1, Int>,
    /// `[batch, C_out, H, W]`: the raw output (for DDPM with CFG, the
    /// `forward_with_cfg` output).
    pub out: Tensor<B, 4>,
}
