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
//! - `dopri5.rs`: an adaptive Dormand-Prince (5th order, 4th order error
//!   estimate) solver of the flow ODE with SiT's default tolerances, each
//!   sample with its own step size.
//! - `noise.rs`: where the initial and per-step noise comes from (fixed
//!   tensors for parity, a seeded host generator, or one generator per
//!   sample so that a sample does not depend on its batch).
//!
//! Sampling never changes the model: [`DiT::forward`] is pure, and the
//! threshold EMA the official code applies in train mode is the caller's
//! business (it does not affect static routing anyway).

mod ddpm;
mod dopri5;
mod flow;
mod noise;

pub use ddpm::{
    space_timesteps, ClipDenoised, DdpmGuidance, DdpmMethod, DdpmSample, DdpmSampler, DdpmStep, ModelVariance,
    RespacingError,
};
pub use dopri5::{Dopri5Error, Dopri5Sampler};
pub use flow::{FlowGuidance, FlowSample, FlowSampler, FlowSolver};
pub use noise::{GivenNoise, NoiseSource, PerSampleNoise, SeededNoise};

use burn::tensor::{backend::Backend, Int, Tensor};

use diffmoe_core::Routing;
use diffmoe_model::{CfgChannels, DiT, DiTOutput};

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

/// Sees every network evaluation a [`DiTDenoiser`] makes: where the compute
/// of a sampling run goes is read from the routing statistics (see
/// `crate::ComputeRecorder`), and a progress display counts calls.
pub trait CallObserver<B: Backend> {
    /// One forward of the network.
    ///
    /// # Shapes
    /// - `t`, `y`: `[batch]` as the network received them; `out.output`: `[batch, C_out, H, W]`
    fn observe(&self, t: &Tensor<B, 1>, y: &Tensor<B, 1, Int>, out: &DiTOutput<B>);
}

/// A [`DiT`] evaluated with one routing mode: [`Routing::Dynamic`] is the
/// official sampler's `model.eval()` (threshold routing for DiffMoE, which is
/// cross-sample: it depends on the whole batch); [`Routing::Static`] is the
/// "global static top-K" of DiffMoE (the official sampler under
/// `model.train()`); [`Routing::PerToken`] makes every sample independent of
/// its batch. The other families route the same way in all of them.
#[derive(Clone, Copy)]
pub struct DiTDenoiser<'a, B: Backend> {
    /// The network.
    pub model: &'a DiT<B>,
    /// How its MoE layers route.
    pub routing: Routing,
    /// Told of every forward, when set.
    pub observer: Option<&'a dyn CallObserver<B>>,
}

impl<B: Backend> std::fmt::Debug for DiTDenoiser<'_, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiTDenoiser")
            .field("routing", &self.routing)
            .field("observed", &self.observer.is_some())
            .finish_non_exhaustive()
    }
}

impl<'a, B: Backend> DiTDenoiser<'a, B> {
    /// Wraps a model with a routing mode.
    pub fn new(model: &'a DiT<B>, routing: Routing) -> Self {
        Self { model, routing, observer: None }
    }

    /// The same denoiser, reporting every forward to `observer`.
    pub fn observed(self, observer: &'a dyn CallObserver<B>) -> Self {
        Self { observer: Some(observer), ..self }
    }

    fn seen(&self, t: &Tensor<B, 1>, y: &Tensor<B, 1, Int>, out: DiTOutput<B>) -> Tensor<B, 4> {
        if let Some(observer) = self.observer {
            observer.observe(t, y, &out);
        }
        out.output
    }
}

impl<B: Backend> Denoiser<B> for DiTDenoiser<'_, B> {
    fn predict(&self, x: Tensor<B, 4>, t: Tensor<B, 1>, y: Tensor<B, 1, Int>) -> Tensor<B, 4> {
        let out = self.model.forward(x, t.clone(), y.clone(), self.routing);
        self.seen(&t, &y, out)
    }

    fn predict_with_cfg(
        &self,
        x: Tensor<B, 4>,
        t: Tensor<B, 1>,
        y: Tensor<B, 1, Int>,
        scale: f64,
        channels: CfgChannels,
    ) -> Tensor<B, 4> {
        let out = self.model.forward_with_cfg(x, t.clone(), y.clone(), scale, channels, self.routing);
        self.seen(&t, &y, out)
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
