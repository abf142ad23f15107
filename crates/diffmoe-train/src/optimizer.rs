//! AdamW with PyTorch's `torch.optim.AdamW` update, the optimizer of the
//! official `train.py` (lr 1e-4, betas (0.9, 0.999), eps 1e-8, no weight
//! decay). Written here rather than taken from burn so that its state is
//! keyed by parameter name (and so saved in a checkpoint as plain tensors)
//! and so that the update follows PyTorch's order of operations:
//!
//! ```text
//! p   <- p * (1 - lr * wd)
//! m   <- lerp(m, g, 1 - beta1)
//! v   <- v * beta2 + (1 - beta2) * g * g
//! p   <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
//! ```
//!
//! On burn's CPU backend the update runs as one in-place pass
//! (`adamw_kernel.rs`), with the same bits.

use std::collections::BTreeMap;

use burn::module::Param;
use burn::tensor::{backend::AutodiffBackend, backend::Backend, Tensor, TensorData};

use diffmoe_model::{DiT, OptimizerConfig};

use crate::adamw_kernel::{adamw_update, AdamWStep};
use crate::gradient_buffer::GradientBuffer;
use crate::param_path::{map_named, NamedMapper};

/// The first and second moments of one parameter, flattened to `[numel]`.
#[derive(Debug, Clone)]
pub struct Moments<B: Backend> {
    /// `exp_avg`.
    pub exp_avg: Tensor<B, 1>,
    /// `exp_avg_sq`.
    pub exp_avg_sq: Tensor<B, 1>,
}

/// Host copy of the optimizer state, for checkpoints.
#[derive(Debug, Clone, PartialEq)]
pub struct OptimizerState {
    /// Optimizer steps taken (PyTorch's per-parameter `step`, equal for all).
    pub step: u64,
    /// Per parameter name: `(exp_avg, exp_avg_sq)`, flattened.
    pub moments: BTreeMap<String, (Vec<f32>, Vec<f32>)>,
}

/// AdamW over the parameters of a `DiT`.
#[derive(Debug, Clone)]
pub struct AdamW<B: AutodiffBackend> {
    config: OptimizerConfig,
    step: u64,
    moments: BTreeMap<String, Moments<B::InnerBackend>>,
}

struct Update<'a, B: AutodiffBackend> {
    grads: GradientBuffer<B>,
    moments: &'a mut BTreeMap<String, Moments<B::InnerBackend>>,
    config: OptimizerConfig,
    lr: f64,
    step: u64,
}

impl<B: AutodiffBackend> NamedMapper<B> for Update<'_, B> {
    fn map<const D: usize>(&mut self, key: String, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let Some(grad) = self.grads.take(&key) else { return param };
        let (id, tensor, mapper) = param.consume();
        let require_grad = tensor.is_require_grad();
        let dims = tensor.dims();
        let numel = grad.dims()[0];
        let c = self.config;
        let p = tensor.inner().reshape([numel]); // [numel]
        let state = self
            .moments
            .remove(&key)
            .unwrap_or_else(|| Moments { exp_avg: grad.zeros_like(), exp_avg_sq: grad.zeros_like() });
        let [beta1, beta2] = c.betas;
        let t = self.step as i32;
        let step = AdamWStep {
            decay: (c.weight_decay != 0.0).then_some(1.0 - self.lr * c.weight_decay),
            one_minus_beta1: 1.0 - beta1,
            beta2,
            one_minus_beta2: 1.0 - beta2,
            bias_correction2_sqrt: (1.0 - beta2.powi(t)).sqrt(),
            epsilon: c.epsilon,
            step_size: self.lr / (1.0 - beta1.powi(t)),
        };
        let [p, exp_avg, exp_avg_sq] = adamw_update([p, grad, state.exp_avg, state.exp_avg_sq], &step);
        self.moments.insert(key, Moments { exp_avg, exp_avg_sq });
        let mut updated = Tensor::<B, D>::from_inner(p.reshape(dims));
        if require_grad {
            updated = updated.require_grad();
        }
        Param::from_mapped_value(id, updated, mapper)
    }
}

impl<B: AutodiffBackend> AdamW<B> {
    /// A fresh optimizer.
    pub fn new(config: OptimizerConfig) -> Self {
        Self { config, step: 0, moments: BTreeMap::new() }
    }

    /// Optimizer steps taken.
    pub fn steps_taken(&self) -> u64 {
        self.step
    }

    /// One update of every parameter that has a gradient in `grads`, at
    /// learning rate `lr`; parameters without one are left alone (and keep
    /// their moments), as PyTorch skips parameters whose `.grad` is `None`.
    pub fn step(&mut self, model: DiT<B>, grads: GradientBuffer<B>, lr: f64) -> DiT<B> {
        self.step += 1;
        let mut update = Update { grads, moments: &mut self.moments, config: self.config, lr, step: self.step };
        map_named(model, &mut update)
    }

    /// The state on the host.
    pub fn export(&self) -> OptimizerState {
        let host = |t: &Tensor<B::InnerBackend, 1>| -> Vec<f32> {
            t.to_data().convert::<f32>().to_vec().expect("f32 moments")
        };
        OptimizerState {
            step: self.step,
            moments: self.moments.iter().map(|(k, m)| (k.clone(), (host(&m.exp_avg), host(&m.exp_avg_sq)))).collect(),
        }
    }

    /// An optimizer resuming from `state`. Names and sizes are checked
    /// against `model` by the caller (see `checkpoint`).
    pub fn import(config: OptimizerConfig, state: OptimizerState, device: &B::Device) -> Self {
        let tensor = |v: Vec<f32>| {
            let n = v.len();
            Tensor::<B::InnerBackend, 1>::from_data(TensorData::new(v, [n]), device)
        };
        let moments = state
            .moments
            .into_iter()
            .map(|(k, (m, v))| (k, Moments { exp_avg: tensor(m), exp_avg_sq: tensor(v) }))
            .collect();
        Self { config, step: state.step, moments }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Flex};
    use diffmoe_model::preset;

    type B = Autodiff<Flex>;

    /// Two AdamW steps on one scalar parameter against values worked out by
    /// hand from PyTorch's update rule.
    #[test]
    fn matches_the_pytorch_update_on_a_tiny_problem() {
        let config = preset("dense-dit-tiny-flow").unwrap().model;
        let device = Default::default();
        let model = config.init::<B>(&device);
        // Loss = sum(w) over the final layer's bias: its gradient is all ones.
        let bias = model.final_layer.linear.bias.as_ref().unwrap().val();
        let before: Vec<f32> = bias.clone().inner().into_data().to_vec().unwrap();
        let grads = bias.sum().backward();
        let mut buffer = GradientBuffer::<B>::new();
        buffer.accumulate(&model, &grads);
        let mut opt = AdamW::<B>::new(OptimizerConfig::default());
        let model = opt.step(model, buffer, 1e-3);
        let after: Vec<f32> =
            model.final_layer.linear.bias.as_ref().unwrap().val().inner().into_data().to_vec().unwrap();
        // Step 1 with g = 1: m = 0.1, v = 0.001, m_hat = 1, v_hat = 1: p -= lr * 1 / (1 + eps).
        for (b, a) in before.iter().zip(&after) {
            let expected = (*b as f64 - 1e-3 / (1.0 + 1e-8)) as f32;
            assert!((a - expected).abs() <= 1e-7, "{a} vs {expected}");
        }
        assert_eq!(opt.export().moments.len(), 1);
        assert_eq!(opt.steps_taken(), 1);
    }
}
