//! An adaptive Dormand-Prince solver (dopri5: fifth-order steps with an
//! embedded fourth-order error estimate, first stage of a step = last stage
//! of the previous one) of the rectified-flow ODE `dz/dt = v(z, t)` from
//! `t = 0` (noise) to `t = 1` (data). SiT samples its flow models this way,
//! with torchdiffeq's `odeint(method="dopri5", atol=1e-6, rtol=1e-3)`; the
//! official DiffMoE `torchdiff-*` modes call the same solver.
//!
//! Step-size control follows torchdiffeq's `RKAdaptiveStepsizeODESolver`:
//!
//! - the first step by Hairer's rule (`_select_initial_step`, one extra
//!   velocity evaluation);
//! - error ratio `rms(err / (atol + rtol * max(|z0|, |z1|)))`, the step
//!   accepted when it is at most 1;
//! - next step `h * min(10, max(0.9 * ratio^(-1/5), 0.2))`, never shrunk
//!   after an accepted step.
//!
//! Two deliberate departures from torchdiffeq:
//!
//! - Every sample has its own time and step size (torchdiffeq takes one step
//!   size for the whole batch, from the error of all samples together).
//!   Each sample is its own ODE, so its tolerance holds for it alone, and,
//!   with a batch-independent network (per-token routing), a sample comes
//!   out the same alone or in any batch. The network is called on the
//!   samples still integrating, each at its own time.
//! - The last step is shortened to end exactly at `t = 1`; torchdiffeq steps
//!   past the end and interpolates back, evaluating the network at `t > 1`,
//!   outside the range it was trained on.

use burn::tensor::{backend::Backend, Bool, Int, Tensor, TensorData};

use super::flow::velocity;
use super::{Denoiser, FlowGuidance, FlowSample, ModelCall, Record};

/// The Dormand-Prince nodes `c_i`.
const C: [f64; 7] = [0.0, 1.0 / 5.0, 3.0 / 10.0, 4.0 / 5.0, 8.0 / 9.0, 1.0, 1.0];

/// The Dormand-Prince matrix `a_ij` (row `i` combines stages `0..i`); its
/// last row is also the fifth-order solution.
const A: [&[f64]; 7] = [
    &[],
    &[1.0 / 5.0],
    &[3.0 / 40.0, 9.0 / 40.0],
    &[44.0 / 45.0, -56.0 / 15.0, 32.0 / 9.0],
    &[19372.0 / 6561.0, -25360.0 / 2187.0, 64448.0 / 6561.0, -212.0 / 729.0],
    &[9017.0 / 3168.0, -355.0 / 33.0, 46732.0 / 5247.0, 49.0 / 176.0, -5103.0 / 18656.0],
    &[35.0 / 384.0, 0.0, 500.0 / 1113.0, 125.0 / 192.0, -2187.0 / 6784.0, 11.0 / 84.0],
];

/// Fifth-order weights minus the embedded fourth-order ones: the local
/// error estimate is `h * sum_j E[j] * k_j`.
const E: [f64; 7] = [
    35.0 / 384.0 - 5179.0 / 57600.0,
    0.0,
    500.0 / 1113.0 - 7571.0 / 16695.0,
    125.0 / 192.0 - 393.0 / 640.0,
    -2187.0 / 6784.0 + 92097.0 / 339200.0,
    11.0 / 84.0 - 187.0 / 2100.0,
    -1.0 / 40.0,
];

/// torchdiffeq's step-size controller: safety factor, largest growth and
/// largest shrink per step, and the order of the method.
const SAFETY: f64 = 0.9;
const MAX_GROWTH: f64 = 10.0;
const MAX_SHRINK: f64 = 0.2;
const ORDER: f64 = 5.0;

/// Why the solver gave up.
#[derive(Debug, thiserror::Error)]
pub enum Dopri5Error {
    /// A sample needed more steps than allowed.
    #[error("dopri5: sample {sample} did not reach t = 1 within {max_steps} steps (stopped at t = {t:.6}); loosen atol/rtol")]
    TooManySteps {
        /// The sample's row in the batch.
        sample: usize,
        /// Where it stopped.
        t: f64,
        /// The limit.
        max_steps: usize,
    },
    /// The network returned a NaN.
    #[error("dopri5: the velocity of sample {sample} is NaN at t = {t:.6}")]
    NotANumber {
        /// The sample's row in the batch.
        sample: usize,
        /// Where.
        t: f64,
    },
}

/// The adaptive solver.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dopri5Sampler {
    /// Absolute tolerance of each value of a sample.
    pub atol: f64,
    /// Relative tolerance.
    pub rtol: f64,
    /// Attempted steps (accepted or not) after which a sample is an error.
    pub max_steps: usize,
}

impl Default for Dopri5Sampler {
    /// SiT's defaults: `atol = 1e-6`, `rtol = 1e-3`.
    fn default() -> Self {
        Self { atol: 1e-6, rtol: 1e-3, max_steps: 10_000 }
    }
}

/// The samples still integrating, each with its own time and step.
struct Active<B: Backend> {
    /// Row of each in the batch.
    rows: Vec<usize>,
    /// `[n, C, H, W]`.
    z: Tensor<B, 4>,
    /// `[n, C, H, W]`: the velocity at `(z, t)`.
    f: Tensor<B, 4>,
    /// `[n]`.
    y: Tensor<B, 1, Int>,
    guidance: FlowGuidance<B>,
    t: Vec<f64>,
    h: Vec<f64>,
}

impl<B: Backend> Active<B> {
    /// Keeps the samples at positions `keep`.
    fn retain(self, keep: &[usize]) -> Self {
        let index = int_tensor::<B>(keep, &self.z.device());
        Self {
            rows: keep.iter().map(|&i| self.rows[i]).collect(),
            z: self.z.select(0, index.clone()),
            f: self.f.select(0, index.clone()),
            y: self.y.select(0, index.clone()),
            guidance: self.guidance.select(index),
            t: keep.iter().map(|&i| self.t[i]).collect(),
            h: keep.iter().map(|&i| self.h[i]).collect(),
        }
    }
}

impl Dopri5Sampler {
    /// A solver with the given tolerances.
    pub fn new(atol: f64, rtol: f64) -> Self {
        Self { atol, rtol, ..Self::default() }
    }

    /// Integrates each sample from the noise `z` at `t = 0` to `t = 1`.
    ///
    /// # Shapes
    /// - `z`: `[batch, C, H, W]`, `y`: `[batch]`, null labels of `guidance`: `[batch]`
    /// - returns a `[batch, C, H, W]` sample
    ///
    /// # Errors
    /// If a sample needs more than `max_steps` steps, or the network
    /// returns NaN.
    pub fn sample<B: Backend>(
        &self,
        denoiser: &impl Denoiser<B>,
        z: Tensor<B, 4>,
        y: Tensor<B, 1, Int>,
        guidance: &FlowGuidance<B>,
        record: Record,
    ) -> Result<FlowSample<B>, Dopri5Error> {
        let [batch, ..] = z.dims();
        let device = z.device();
        let mut calls: Vec<ModelCall<B>> = Vec::new();
        let mut evaluations = vec![0usize; batch];
        let mut steps = vec![0usize; batch];
        let mut done: Vec<Option<Tensor<B, 4>>> = vec![None; batch];

        let mut eval = |active: &Active<B>, z: Tensor<B, 4>, t: Vec<f64>, evaluations: &mut [usize]| {
            for &row in &active.rows {
                evaluations[row] += 1;
            }
            let t = float_tensor::<B>(&t, &device);
            velocity(denoiser, z, t, &active.y, &active.guidance, record, &mut calls)
        };

        let zeros = vec![0.0; batch];
        let rows: Vec<usize> = (0..batch).collect();
        let placeholder =
            Active { rows, z: z.clone(), f: z.clone(), y, guidance: guidance.clone(), t: zeros, h: vec![] };
        let f = eval(&placeholder, z.clone(), placeholder.t.clone(), &mut evaluations);
        let mut active = Active { f, ..placeholder };
        active.h = self.initial_steps(&active, &mut |a, z, t| eval(a, z, t, &mut evaluations))?;

        while !active.rows.is_empty() {
            let h: Vec<f64> = active.t.iter().zip(&active.h).map(|(t, h)| h.min(1.0 - t)).collect();
            let h4 = column::<B>(&h, &device); // [n, 1, 1, 1]
            let mut k = vec![active.f.clone()];
            for stage in 1..7 {
                let z = active.z.clone() + combine(&k, A[stage]) * h4.clone();
                let t = active.t.iter().zip(&h).map(|(t, h)| t + C[stage] * h).collect();
                k.push(eval(&active, z, t, &mut evaluations));
            }
            // The last stage is evaluated at the fifth-order solution.
            let z1 = active.z.clone() + combine(&k[..6], A[6]) * h4.clone();
            let error = combine(&k, &E) * h4;
            let tolerance =
                active.z.clone().abs().max_pair(z1.clone().abs()).mul_scalar(self.rtol).add_scalar(self.atol);
            let ratio = host(rms(error / tolerance));

            let mut accepted = Vec::with_capacity(h.len());
            for (i, &r) in ratio.iter().enumerate() {
                let row = active.rows[i];
                if r.is_nan() {
                    return Err(Dopri5Error::NotANumber { sample: row, t: active.t[i] });
                }
                steps[row] += 1;
                if steps[row] > self.max_steps {
                    return Err(Dopri5Error::TooManySteps { sample: row, t: active.t[i], max_steps: self.max_steps });
                }
                let accept = r <= 1.0;
                if accept {
                    // The shortened last step lands on t = 1 exactly.
                    active.t[i] = if h[i] >= 1.0 - active.t[i] { 1.0 } else { active.t[i] + h[i] };
                }
                active.h[i] = next_step(h[i], r);
                accepted.push(accept);
            }
            let mask = row_mask::<B>(&accepted, active.z.dims(), &device);
            active.z = active.z.mask_where(mask.clone(), z1);
            active.f = active.f.mask_where(mask, k.pop().expect("seven stages"));

            let (finished, running): (Vec<usize>, Vec<usize>) =
                (0..active.rows.len()).partition(|&i| active.t[i] >= 1.0);
            for &i in &finished {
                let index = int_tensor::<B>(&[i], &device);
                done[active.rows[i]] = Some(active.z.clone().select(0, index));
            }
            if !finished.is_empty() {
                active = active.retain(&running);
            }
        }
        let sample = Tensor::cat(done.into_iter().map(|z| z.expect("every sample reached t = 1")).collect(), 0);
        Ok(FlowSample { sample, calls, evaluations })
    }

    /// torchdiffeq's `_select_initial_step` for a fourth-order error
    /// estimate, per sample: a step with `|h f0|` about 1% of `|z0|`,
    /// refined by how fast the velocity changes over it.
    fn initial_steps<B: Backend>(
        &self,
        active: &Active<B>,
        eval: &mut impl FnMut(&Active<B>, Tensor<B, 4>, Vec<f64>) -> Tensor<B, 4>,
    ) -> Result<Vec<f64>, Dopri5Error> {
        let device = active.z.device();
        let scale = active.z.clone().abs().mul_scalar(self.rtol).add_scalar(self.atol);
        let d0 = host(rms(active.z.clone() / scale.clone()));
        let d1 = host(rms(active.f.clone() / scale.clone()));
        let h0: Vec<f64> =
            d0.iter().zip(&d1).map(|(&d0, &d1)| if d0 < 1e-5 || d1 < 1e-5 { 1e-6 } else { 0.01 * d0 / d1 }).collect();
        let z1 = active.z.clone() + active.f.clone() * column::<B>(&h0, &device);
        let t1 = active.t.iter().zip(&h0).map(|(t, h)| t + h).collect();
        let f1 = eval(active, z1, t1);
        let d2 = host(rms((f1 - active.f.clone()) / scale));
        let mut h = Vec::with_capacity(h0.len());
        for i in 0..h0.len() {
            if d2[i].is_nan() || d1[i].is_nan() {
                return Err(Dopri5Error::NotANumber { sample: active.rows[i], t: active.t[i] });
            }
            let d2 = d2[i] / h0[i];
            let h1 = if d1[i] <= 1e-15 && d2 <= 1e-15 {
                (h0[i] * 1e-3).max(1e-6)
            } else {
                (0.01 / d1[i].max(d2)).powf(1.0 / ORDER)
            };
            h.push((100.0 * h0[i]).min(h1));
        }
        Ok(h)
    }
}

/// torchdiffeq's `_optimal_step_size` for a fifth-order method.
fn next_step(h: f64, ratio: f64) -> f64 {
    if ratio == 0.0 {
        return h * MAX_GROWTH;
    }
    let shrink = if ratio < 1.0 { 1.0 } else { MAX_SHRINK };
    let factor = if ratio.is_finite() { SAFETY / ratio.powf(1.0 / ORDER) } else { 0.0 };
    h * factor.max(shrink).min(MAX_GROWTH)
}

/// `sum_j coeffs[j] * k[j]` (zero coefficients skipped).
///
/// # Shapes
/// - each `k[j]`: `[n, C, H, W]` -> `[n, C, H, W]`
fn combine<B: Backend>(k: &[Tensor<B, 4>], coeffs: &[f64]) -> Tensor<B, 4> {
    k.iter()
        .zip(coeffs)
        .filter(|(_, c)| **c != 0.0)
        .map(|(k, c)| k.clone().mul_scalar(*c))
        .reduce(|a, b| a + b)
        .expect("a stage with a non-zero coefficient")
}

/// Root mean square of each sample.
///
/// # Shapes
/// - `x`: `[n, C, H, W]` -> `[n]`
fn rms<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 1> {
    let [n, c, h, w] = x.dims();
    x.reshape([n, c * h * w]).powi_scalar(2).mean_dim(1).sqrt().reshape([n])
}

fn host<B: Backend>(x: Tensor<B, 1>) -> Vec<f64> {
    x.into_data().iter::<f64>().collect()
}

/// `[n]` host values as a `[n]` tensor (the network's time is f32).
fn float_tensor<B: Backend>(values: &[f64], device: &B::Device) -> Tensor<B, 1> {
    let values: Vec<f32> = values.iter().map(|&v| v as f32).collect();
    let n = values.len();
    Tensor::from_data(TensorData::new(values, [n]), device)
}

/// Per-sample host values as a `[n, 1, 1, 1]` tensor to scale samples by.
fn column<B: Backend>(values: &[f64], device: &B::Device) -> Tensor<B, 4> {
    let n = values.len();
    float_tensor::<B>(values, device).reshape([n, 1, 1, 1])
}

fn int_tensor<B: Backend>(rows: &[usize], device: &B::Device) -> Tensor<B, 1, Int> {
    let values: Vec<i64> = rows.iter().map(|&r| r as i64).collect();
    Tensor::from_data(TensorData::new(values, [rows.len()]), device)
}

/// `[n, C, H, W]` true on the rows where `rows[i]` holds.
fn row_mask<B: Backend>(rows: &[bool], dims: [usize; 4], device: &B::Device) -> Tensor<B, 4, Bool> {
    let n = rows.len();
    Tensor::<B, 1, Bool>::from_data(TensorData::new(rows.to_vec(), [n]), device).reshape([n, 1, 1, 1]).expand(dims)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use diffmoe_model::CfgChannels;

    type B = Flex;

    /// `v = -(y + 1/2) z + 3 t^2`: sample `i` decays at a rate set by its
    /// label, so labels make samples easy or stiff. Exact solution:
    /// `z(1) = z0 e^{-l} + int_0^1 3 s^2 e^{-l (1 - s)} ds`.
    struct Decay;

    impl Denoiser<B> for Decay {
        fn predict(&self, x: Tensor<B, 4>, t: Tensor<B, 1>, y: Tensor<B, 1, Int>) -> Tensor<B, 4> {
            let [n, ..] = x.dims();
            let rate = y.float().add_scalar(0.5).reshape([n, 1, 1, 1]);
            let drift = t.powi_scalar(2).mul_scalar(3.0).reshape([n, 1, 1, 1]);
            x.clone().neg() * rate + drift + x.zeros_like()
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

    fn exact(z0: f64, rate: f64) -> f64 {
        // int_0^1 3 s^2 e^{-l (1 - s)} ds by Simpson's rule on a fine grid.
        let n = 10_000;
        let f = |s: f64| 3.0 * s * s * (-rate * (1.0 - s)).exp();
        let h = 1.0 / n as f64;
        let inner: f64 = (1..n).map(|i| if i % 2 == 1 { 4.0 } else { 2.0 } * f(i as f64 * h)).sum();
        z0 * (-rate).exp() + h / 3.0 * (f(0.0) + inner + f(1.0))
    }

    fn start(values: &[f32]) -> Tensor<B, 4> {
        let n = values.len() / 4;
        Tensor::from_data(TensorData::new(values.to_vec(), [n, 1, 2, 2]), &Default::default())
    }

    fn labels(values: &[i64]) -> Tensor<B, 1, Int> {
        Tensor::from_data(TensorData::new(values.to_vec(), [values.len()]), &Default::default())
    }

    #[test]
    fn meets_its_tolerance_and_steps_each_sample_on_its_own() {
        let z0 = [1.0f32, -2.0, 0.5, 3.0, -1.0, 0.25, 2.0, -0.75];
        let solver = Dopri5Sampler::new(1e-7, 1e-6);
        let run =
            solver.sample(&Decay, start(&z0), labels(&[0, 20]), &FlowGuidance::Unguided, Record::FinalOnly).unwrap();
        let out: Vec<f32> = run.sample.into_data().to_vec().unwrap();
        for (i, (&z, &o)) in z0.iter().zip(&out).enumerate() {
            let rate = if i < 4 { 0.5 } else { 20.5 };
            let want = exact(z as f64, rate);
            assert!((o as f64 - want).abs() < 1e-4 * want.abs().max(1.0), "value {i}: {o} vs {want}");
        }
        // The stiff sample needs more evaluations; the easy one is not held back.
        assert!(run.evaluations[1] > run.evaluations[0], "{:?}", run.evaluations);
    }

    #[test]
    fn a_sample_comes_out_the_same_alone_and_in_a_batch() {
        let z0 = [1.0f32, -2.0, 0.5, 3.0, -1.0, 0.25, 2.0, -0.75, 0.1, 0.2, 0.3, 0.4];
        let solver = Dopri5Sampler::default();
        let batch =
            solver.sample(&Decay, start(&z0), labels(&[3, 0, 9]), &FlowGuidance::Unguided, Record::FinalOnly).unwrap();
        let alone =
            solver.sample(&Decay, start(&z0[4..8]), labels(&[0]), &FlowGuidance::Unguided, Record::Trajectory).unwrap();
        let diff: f32 = (batch.sample.narrow(0, 1, 1) - alone.sample).abs().max().into_scalar();
        assert_eq!(diff, 0.0);
        assert_eq!(alone.evaluations[0], batch.evaluations[1]);
        assert_eq!(alone.calls.len(), alone.evaluations[0]);
        // The network is never asked beyond t = 1.
        let last: f32 = alone.calls.iter().map(|c| c.t.clone().max().into_scalar()).fold(0.0, f32::max);
        assert!(last <= 1.0);
    }

    #[test]
    fn looser_tolerances_take_fewer_evaluations() {
        let z0 = [1.0f32, -2.0, 0.5, 3.0];
        let run = |rtol: f64| {
            Dopri5Sampler::new(rtol * 1e-3, rtol)
                .sample(&Decay, start(&z0), labels(&[4]), &FlowGuidance::Unguided, Record::FinalOnly)
                .unwrap()
                .evaluations[0]
        };
        assert!(run(1e-2) < run(1e-6));
    }

    #[test]
    fn nan_and_step_limits_are_errors() {
        struct Nan;
        impl Denoiser<B> for Nan {
            fn predict(&self, x: Tensor<B, 4>, _t: Tensor<B, 1>, _y: Tensor<B, 1, Int>) -> Tensor<B, 4> {
                x.zeros_like().add_scalar(f32::NAN)
            }
            fn predict_with_cfg(
                &self,
                x: Tensor<B, 4>,
                _t: Tensor<B, 1>,
                _y: Tensor<B, 1, Int>,
                _s: f64,
                _c: CfgChannels,
            ) -> Tensor<B, 4> {
                x
            }
        }
        let z0 = [1.0f32, -2.0, 0.5, 3.0];
        let error = Dopri5Sampler::default()
            .sample(&Nan, start(&z0), labels(&[0]), &FlowGuidance::Unguided, Record::FinalOnly)
            .unwrap_err();
        assert!(matches!(error, Dopri5Error::NotANumber { sample: 0, .. }), "{error}");
        let tight = Dopri5Sampler { atol: 1e-12, rtol: 1e-12, max_steps: 3 };
        let error =
            tight.sample(&Decay, start(&z0), labels(&[30]), &FlowGuidance::Unguided, Record::FinalOnly).unwrap_err();
        assert!(matches!(error, Dopri5Error::TooManySteps { max_steps: 3, .. }), "{error}");
    }

    #[test]
    fn the_step_controller_is_torchdiffeqs() {
        assert_eq!(next_step(0.1, 0.0), 1.0);
        // An accepted step never shrinks, a rejected one by at most 5x.
        assert_eq!(next_step(0.1, 0.99), 0.1);
        assert!((next_step(0.1, 1e6) - 0.02).abs() < 1e-12);
        assert!((next_step(0.1, 0.01) - 0.1 * 0.9 * 0.01f64.powf(-0.2)).abs() < 1e-12);
        assert_eq!(next_step(0.1, f64::INFINITY), 0.1 * MAX_SHRINK);
        // The tableau is consistent: each row of A sums to its node.
        for (row, c) in A.iter().zip(C) {
            assert!((row.iter().sum::<f64>() - c).abs() < 1e-12);
        }
        assert!(E.iter().sum::<f64>().abs() < 1e-12);
    }
}
