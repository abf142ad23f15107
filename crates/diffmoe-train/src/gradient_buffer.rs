//! Gradients gathered from one or more backward passes, by parameter name:
//! the buffer that gradient accumulation sums into, that replicas all-reduce,
//! whose global norm is logged and clipped, and that the optimizer consumes.

use std::collections::BTreeMap;

use burn::module::Param;
use burn::tensor::{backend::AutodiffBackend, backend::Backend, Tensor};
use rayon::prelude::*;

use diffmoe_core::{flex_contiguous, flex_f32};
use diffmoe_model::DiT;

use crate::adamw_kernel::TASK_ELEMS;
use crate::param_path::{visit_named, NamedVisitor};

/// The sum of the squares of every element of `tensors`, in f64, when they
/// are f32 tensors of the CPU backend. The partial sums of fixed chunks are
/// added in order, so the result does not depend on the threads.
fn cpu_sum_of_squares<'a, B: Backend + 'a>(tensors: impl Iterator<Item = &'a Tensor<B, 1>>) -> Option<f64> {
    let mut total = 0.0;
    for t in tensors {
        let t = flex_contiguous(flex_f32(t.clone()).ok()?);
        let values: &[f32] = t.storage();
        let partial: Vec<f64> = values.par_chunks(TASK_ELEMS).map(sum_of_squares).collect();
        total += partial.iter().sum::<f64>();
    }
    Some(total)
}

/// `sum(v^2)` in f64 over eight lanes, so that the additions vectorise
/// (one running sum waits on each addition in turn).
fn sum_of_squares(values: &[f32]) -> f64 {
    const LANES: usize = 8;
    let mut lanes = [0.0f64; LANES];
    let mut chunks = values.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane += f64::from(v) * f64::from(v);
        }
    }
    let tail: f64 = chunks.remainder().iter().map(|&v| f64::from(v) * f64::from(v)).sum();
    lanes.iter().sum::<f64>() + tail
}

/// Flattened gradients `[numel]` per trainable parameter, summed over the
/// backward passes added so far.
#[derive(Debug)]
pub struct GradientBuffer<B: AutodiffBackend> {
    grads: BTreeMap<String, Tensor<B::InnerBackend, 1>>,
}

impl<B: AutodiffBackend> Default for GradientBuffer<B> {
    fn default() -> Self {
        Self { grads: BTreeMap::new() }
    }
}

struct Collect<'a, B: AutodiffBackend> {
    grads: &'a B::Gradients,
    into: &'a mut BTreeMap<String, Tensor<B::InnerBackend, 1>>,
}

impl<B: AutodiffBackend> NamedVisitor<B> for Collect<'_, B> {
    fn visit<const D: usize>(&mut self, key: String, param: &Param<Tensor<B, D>>) {
        let Some(grad) = param.val().grad(self.grads) else { return };
        let numel = grad.shape().num_elements();
        let grad = grad.reshape([numel]); // [numel]
        let summed = match self.into.remove(&key) {
            Some(previous) => previous + grad,
            None => grad,
        };
        self.into.insert(key, summed);
    }
}

impl<B: AutodiffBackend> GradientBuffer<B> {
    /// An empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the gradients of one backward pass through `model` (summed, as
    /// PyTorch's `.grad` accumulates).
    pub fn accumulate(&mut self, model: &DiT<B>, grads: &B::Gradients) {
        visit_named(model, &mut Collect::<B> { grads, into: &mut self.grads });
    }

    /// Whether nothing has been accumulated.
    pub fn is_empty(&self) -> bool {
        self.grads.is_empty()
    }

    /// `[1]`: the squared global L2 norm over all parameters, on the device.
    /// On the CPU backend one pass over the gradients, summed in f64 (the
    /// tensor ops square into a temporary first: a third of a second per
    /// step over DiffMoE-S-E16's 140M parameters); in f32 tensor ops
    /// elsewhere.
    pub fn squared_norm(&self) -> Option<Tensor<B::InnerBackend, 1>> {
        let device = self.grads.values().next()?.device();
        if let Some(sum) = cpu_sum_of_squares(self.grads.values()) {
            return Some(Tensor::from_floats([sum as f32], &device));
        }
        self.grads.values().map(|g| g.clone().powi_scalar(2).sum()).reduce(|a, b| a + b)
    }

    /// Multiplies every gradient by `factor` (gradient clipping).
    pub fn scale(&mut self, factor: f64) {
        for g in self.grads.values_mut() {
            *g = g.clone().mul_scalar(factor);
        }
    }

    /// The gradient of a parameter.
    pub fn get(&self, name: &str) -> Option<&Tensor<B::InnerBackend, 1>> {
        self.grads.get(name)
    }

    /// Every gradient by name, for in-place reduction across replicas.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&String, &mut Tensor<B::InnerBackend, 1>)> {
        self.grads.iter_mut()
    }

    /// Removes the gradient of a parameter (the optimizer consumes them).
    pub(crate) fn take(&mut self, name: &str) -> Option<Tensor<B::InnerBackend, 1>> {
        self.grads.remove(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Flex, NdArray};
    use burn::tensor::Distribution;
    use diffmoe_model::preset;

    /// The gradients of one flow-loss backward pass of the tiny DiffMoE model.
    fn tiny_gradients<B: AutodiffBackend>() -> GradientBuffer<B> {
        let config = preset("diffmoe-tiny-e8-flow").unwrap().model;
        let device = Default::default();
        B::seed(&device, 7);
        let model = config.init::<B>(&device);
        let shape = [2, config.in_channels, config.input_size, config.input_size];
        let x = Tensor::random(shape, Distribution::Normal(0.0, 1.0), &device);
        let noise = Tensor::random(shape, Distribution::Normal(0.0, 1.0), &device);
        let t = Tensor::random([2], Distribution::Uniform(0.0, 1.0), &device);
        let y = Tensor::from_ints([1, 3], &device);
        let terms = crate::flow_loss(&model, x, y, noise, t);
        let mut grads = GradientBuffer::new();
        grads.accumulate(&model, &terms.total.backward());
        grads
    }

    #[test]
    fn squared_norm_sums_every_gradient_on_the_cpu_path_as_the_tensor_ops_do() {
        let grads = tiny_gradients::<Autodiff<Flex>>();
        let cpu: f32 = grads.squared_norm().unwrap().into_scalar();
        let ops: f32 =
            grads.grads.values().map(|g| g.clone().powi_scalar(2).sum()).reduce(|a, b| a + b).unwrap().into_scalar();
        let host: f64 = grads
            .grads
            .values()
            .flat_map(|g| g.to_data().to_vec::<f32>().unwrap())
            .map(|v| f64::from(v) * f64::from(v))
            .sum();
        assert!(cpu > 0.0);
        assert!((f64::from(cpu) - host).abs() <= 1e-7 * host, "the CPU path sums in f64: {cpu} against {host}");
        assert!((cpu - ops).abs() <= 1e-5 * ops, "CPU path {cpu} against the tensor ops' {ops}");
        // Another backend takes the tensor ops.
        let other = tiny_gradients::<Autodiff<NdArray>>();
        assert!(cpu_sum_of_squares(other.grads.values()).is_none());
        assert!(other.squared_norm().unwrap().into_scalar() > 0.0);
    }
}
