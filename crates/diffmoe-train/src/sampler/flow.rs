//! The rectified-flow sampler (official `RectifiedFlow.sample` of
//! `diffusion/rectified_flow.py`): `t` runs from 0 (noise) to 1 (data) in
//! `steps` equal steps of `dt = 1 / steps`.
//!
//! - Euler: `z += dt * v(z, i / steps)`.
//! - Heun: `v1 = v(z, t_i)`, `z~ = z + dt * v1`, `v2 = v(z~, t_{i+1})`,
//!   `z += dt / 2 * (v1 + v2)`; the last evaluation is at `t = 1`.
//! - Classifier-free guidance makes two separate model calls per velocity
//!   (conditional labels first, then the null labels, each with the batch as
//!   is) and mixes `v = vu + scale * (vc - vu)` on all channels (the
//!   official rule; [`CfgChannels::First`] guides only the first channels
//!   and keeps the conditional velocity on the others). This differs from the
//!   batched, 3-channel `forward_with_cfg` of the DDPM sampler; with
//!   DiffMoE's cross-sample dynamic routing the two calls also route apart.
//! - With a learned sigma only the first `C` output channels are the
//!   velocity (official `chunk(2, dim=1)[0]`).
//!
//! The official `torchdiff-*` modes (torchdiffeq on `linspace(0, 1,
//! steps)`) are replaced by this crate's own adaptive solver (`dopri5.rs`).

use burn::tensor::{backend::Backend, Int, Tensor};

use diffmoe_model::CfgChannels;

use super::{Denoiser, ModelCall, Record};

/// How each step integrates the velocity (the official `mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowSolver {
    /// One velocity evaluation per step (the official default, `'euler'`).
    Euler,
    /// Heun's second-order method: two evaluations per step (`'heun'`).
    Heun,
}

/// Classifier-free guidance of the flow sampler.
#[derive(Debug, Clone)]
pub enum FlowGuidance<B: Backend> {
    /// The conditional velocity alone (the official `null_cond=None`).
    Unguided,
    /// `v = vu + scale * (vc - vu)`, with `vu` from a second call on `null_labels`.
    Cfg {
        /// The guidance scale (`cfg`); 1 gives the conditional velocity.
        scale: f64,
        /// The guided channels: [`CfgChannels::All`] is the official flow
        /// rule; the others keep the conditional velocity.
        channels: CfgChannels,
        /// `[batch]`: the labels of the unconditional call, normally all
        /// `num_classes` (the null label).
        null_labels: Tensor<B, 1, Int>,
    },
}

impl<B: Backend> FlowGuidance<B> {
    /// The guidance of the samples `rows` of the batch.
    ///
    /// # Shapes
    /// - `rows`: `[n]` -> null labels `[n]`
    pub fn select(&self, rows: Tensor<B, 1, Int>) -> Self {
        match self {
            Self::Unguided => Self::Unguided,
            Self::Cfg { scale, channels, null_labels } => {
                Self::Cfg { scale: *scale, channels: *channels, null_labels: null_labels.clone().select(0, rows) }
            }
        }
    }
}

/// The result of a flow sampling run.
#[derive(Debug, Clone)]
pub struct FlowSample<B: Backend> {
    /// `[batch, C, H, W]`: `z` at `t = 1` (the official `images[-1]`).
    pub sample: Tensor<B, 4>,
    /// Every model call in call order, when [`Record::Trajectory`] was asked
    /// for (cond before uncond within one velocity evaluation); empty otherwise.
    pub calls: Vec<ModelCall<B>>,
    /// Velocity evaluations each sample took (the number of function
    /// evaluations, NFE; each is two model calls with guidance).
    pub evaluations: Vec<usize>,
}

/// The rectified-flow sampler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowSampler {
    /// Number of steps from `t = 0` to `t = 1`.
    pub steps: usize,
    /// The integrator.
    pub solver: FlowSolver,
}

impl FlowSampler {
    /// A sampler of `steps` steps.
    ///
    /// # Panics
    /// If `steps` is 0.
    pub fn new(steps: usize, solver: FlowSolver) -> Self {
        assert!(steps > 0, "a flow sampler needs at least one step");
        Self { steps, solver }
    }

    /// Model calls per run: one or two per step, doubled by guidance.
    pub fn model_calls<B: Backend>(&self, guidance: &FlowGuidance<B>) -> usize {
        let per_step = match self.solver {
            FlowSolver::Euler => 1,
            FlowSolver::Heun => 2,
        };
        let per_velocity = match guidance {
            FlowGuidance::Unguided => 1,
            FlowGuidance::Cfg { .. } => 2,
        };
        self.steps * per_step * per_velocity
    }

    /// Integrates from the noise `z` at `t = 0` to a sample at `t = 1`.
    ///
    /// # Shapes
    /// - `z`: `[batch, C, H, W]`, `y`: `[batch]`, null labels of `guidance`: `[batch]`
    /// - returns a `[batch, C, H, W]` sample
    pub fn sample<B: Backend>(
        &self,
        denoiser: &impl Denoiser<B>,
        z: Tensor<B, 4>,
        y: Tensor<B, 1, Int>,
        guidance: &FlowGuidance<B>,
        record: Record,
    ) -> FlowSample<B> {
        let mut calls = Vec::new();
        let [batch, ..] = z.dims();
        let device = z.device();
        let mut v = |z: Tensor<B, 4>, i: usize| {
            // The official `i / sample_steps` is a Python float, made f32 by `torch.tensor`.
            let t = Tensor::<B, 1>::full([batch], i as f64 / self.steps as f64, &device); // [batch]
            velocity(denoiser, z, t, &y, guidance, record, &mut calls)
        };
        // The official `dt` is an f32 tensor of `1 / sample_steps`.
        let dt = 1.0 / self.steps as f64;
        let mut z = z;
        for i in 0..self.steps {
            z = match self.solver {
                FlowSolver::Euler => {
                    let v1 = v(z.clone(), i);
                    z + v1.mul_scalar(dt)
                }
                FlowSolver::Heun => {
                    let v1 = v(z.clone(), i);
                    let z_next = z.clone() + v1.clone().mul_scalar(dt);
                    let v2 = v(z_next, i + 1);
                    // Official `z + 1/2 * dt * (v1 + v2)`: `0.5 * dt` is formed first.
                    z + (v1 + v2).mul_scalar(0.5 * dt)
                }
            };
        }
        let per_step = match self.solver {
            FlowSolver::Euler => 1,
            FlowSolver::Heun => 2,
        };
        FlowSample { sample: z, calls, evaluations: vec![self.steps * per_step; batch] }
    }
}

/// One velocity evaluation at the times `t` (one or two model calls).
///
/// # Shapes
/// - `z`: `[batch, C, H, W]`, `t`, `y`: `[batch]` -> `[batch, C, H, W]`
pub(super) fn velocity<B: Backend>(
    denoiser: &impl Denoiser<B>,
    z: Tensor<B, 4>,
    t: Tensor<B, 1>,
    y: &Tensor<B, 1, Int>,
    guidance: &FlowGuidance<B>,
    record: Record,
    calls: &mut Vec<ModelCall<B>>,
) -> Tensor<B, 4> {
    let channels = z.dims()[1];
    let mut call = |labels: &Tensor<B, 1, Int>| {
        let out = denoiser.predict(z.clone(), t.clone(), labels.clone()); // [batch, C_out, H, W]
        if record == Record::Trajectory {
            calls.push(ModelCall { x: z.clone(), t: t.clone(), y: labels.clone(), out: out.clone() });
        }
        let out_channels = out.dims()[1];
        assert!(
            out_channels == channels || out_channels == 2 * channels,
            "the velocity model returns {out_channels} channels for a {channels}-channel input"
        );
        out.narrow(1, 0, channels) // [batch, C, H, W]: the learned-sigma half dropped
    };
    let vc = call(y);
    match guidance {
        FlowGuidance::Unguided => vc,
        FlowGuidance::Cfg { scale, channels: guided, null_labels } => {
            let vu = call(null_labels);
            let guided = match guided {
                CfgChannels::All => channels,
                CfgChannels::First(n) => (*n).min(channels),
            };
            let mix = |vc: Tensor<B, 4>, vu: Tensor<B, 4>| vu.clone() + (vc - vu).mul_scalar(*scale);
            if guided == channels {
                mix(vc, vu)
            } else {
                let rest = vc.clone().narrow(1, guided, channels - guided);
                Tensor::cat(vec![mix(vc.narrow(1, 0, guided), vu.narrow(1, 0, guided)), rest], 1)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::TensorData;

    type B = Flex;

    /// A velocity field that ignores `z`: `v = target + y + 2 t`, so the exact
    /// flow moves every pixel by `target + y + 1` between `t = 0` and `t = 1`.
    /// Heun (the trapezoid rule) integrates the linear `t` term exactly,
    /// Euler (left Riemann sums) gets `(steps - 1) / steps` of it. The second
    /// channel half is junk that the sampler must ignore.
    struct LinearInTime {
        target: f32,
    }

    impl Denoiser<B> for LinearInTime {
        fn predict(&self, x: Tensor<B, 4>, t: Tensor<B, 1>, y: Tensor<B, 1, Int>) -> Tensor<B, 4> {
            let [n, ..] = x.dims();
            let shift = y.float().reshape([n, 1, 1, 1]);
            let t = t.reshape([n, 1, 1, 1]);
            let v = x.zeros_like() + shift + t.mul_scalar(2.0) + self.target;
            Tensor::cat(vec![v, x.ones_like().mul_scalar(1e3)], 1)
        }

        fn predict_with_cfg(
            &self,
            _x: Tensor<B, 4>,
            _t: Tensor<B, 1>,
            _y: Tensor<B, 1, Int>,
            _scale: f64,
            _channels: CfgChannels,
        ) -> Tensor<B, 4> {
            unreachable!("the flow sampler guides with separate calls")
        }
    }

    fn noise() -> Tensor<B, 4> {
        let values: Vec<f32> = (0..2 * 3 * 2 * 2).map(|i| ((i * 7 % 11) as f32 - 5.0) / 3.0).collect();
        Tensor::from_data(TensorData::new(values, [2, 3, 2, 2]), &Default::default())
    }

    fn labels(v: [i64; 2]) -> Tensor<B, 1, Int> {
        Tensor::from_data(TensorData::new(v.to_vec(), [2]), &Default::default())
    }

    /// Largest deviation of `a` from `noise() + shift`.
    fn moved_by(a: Tensor<B, 4>, shift: f32) -> f32 {
        (a - noise() - shift).abs().max().into_scalar()
    }

    #[test]
    fn heun_is_exact_for_linear_time_and_euler_is_a_left_sum() {
        let steps = 5;
        let model = LinearInTime { target: 0.5 };
        let run = |solver| {
            FlowSampler::new(steps, solver).sample(
                &model,
                noise(),
                labels([0, 0]),
                &FlowGuidance::Unguided,
                Record::FinalOnly,
            )
        };
        let heun = run(FlowSolver::Heun);
        assert!(moved_by(heun.sample, 1.5) < 1e-5);
        assert!(heun.calls.is_empty());
        let euler = run(FlowSolver::Euler);
        assert!(moved_by(euler.sample, 0.5 + (steps - 1) as f32 / steps as f32) < 1e-5);
    }

    #[test]
    fn calls_are_recorded_in_official_order() {
        let guidance = FlowGuidance::Cfg { scale: 2.0, channels: CfgChannels::All, null_labels: labels([10, 10]) };
        let sampler = FlowSampler::new(3, FlowSolver::Heun);
        let run = sampler.sample(&LinearInTime { target: 0.0 }, noise(), labels([1, 2]), &guidance, Record::Trajectory);
        assert_eq!(run.calls.len(), sampler.model_calls(&guidance));
        assert_eq!(run.calls.len(), 12);
        let times: Vec<f32> = run.calls.iter().map(|c| c.t.clone().into_data().to_vec::<f32>().unwrap()[0]).collect();
        let third = 1.0 / 3.0f32;
        let expected = [0.0, 0.0, third, third, third, third, 2.0 * third, 2.0 * third, 2.0 * third, 2.0 * third];
        assert_eq!(&times[..10], &expected);
        assert_eq!(&times[10..], &[1.0, 1.0], "the last Heun evaluation is at t = 1");
        let ys: Vec<i64> =
            run.calls.iter().map(|c| c.y.clone().into_data().convert::<i64>().to_vec::<i64>().unwrap()[0]).collect();
        assert_eq!(&ys[..4], &[1, 10, 1, 10], "conditional call first, then the null labels");
        assert_eq!(run.calls[0].out.dims(), [2, 6, 2, 2], "raw outputs are kept whole");
    }

    #[test]
    fn guidance_extrapolates_from_the_null_velocity() {
        // Conditional shift 1, unconditional 0: scale s moves by 0.5 + s + 1.
        let ys = labels([1, 1]);
        let null_labels = labels([0, 0]);
        let sampler = FlowSampler::new(4, FlowSolver::Heun);
        let model = LinearInTime { target: 0.5 };
        let cfg =
            |scale: f64| FlowGuidance::Cfg { scale, channels: CfgChannels::All, null_labels: null_labels.clone() };
        let one = sampler.sample(&model, noise(), ys.clone(), &cfg(1.0), Record::FinalOnly);
        let plain = sampler.sample(&model, noise(), ys.clone(), &FlowGuidance::Unguided, Record::FinalOnly);
        assert!((one.sample - plain.sample.clone()).abs().max().into_scalar() < 1e-5);
        assert!(moved_by(plain.sample, 2.5) < 1e-5);
        let three = sampler.sample(&model, noise(), ys, &cfg(3.0), Record::FinalOnly);
        assert!(moved_by(three.sample, 4.5) < 1e-4);
    }
}
